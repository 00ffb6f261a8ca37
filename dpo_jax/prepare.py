"""`python -m dpo_jax.prepare --config configs/NAME.py --output DIR`: the latent cache.

Runs the training data pipeline once (data.format, data.train_files or data.tfds_name,
data.resolution, epoch 0's crops and flips, every caption) through the frozen VAE and text
encoders of model.pretrained, and writes the cache that `--config.data.cache_dir=DIR`
trains from (format: `dpo_jax.data.latent_cache`). Started on several hosts by the same
launchers as training, each host encodes and writes its own contiguous share of the pairs, and
the table of the distinct caption encodings among them, which its pair records refer to;
`python -m dpo_jax.tools.merge_captions` then makes one table of them.
"""
import os
import time

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError

# Per encode call; rounded up to a multiple of this host's devices.
DEFAULT_BATCH_PAIRS = 16
_PROGRESS_SECONDS = 30


def _encode_function(encoders, dtype):
  """A jitted (frozen params, batch) -> moments and embeddings, cast to the cache's dtype."""
  import jax  # After flag parsing: JAX is slow to load.
  from dpo_jax import encode

  def encode_batch(frozen, batch):
    out = encode.encode_pairs(encoders, frozen, batch)
    return {name: value.astype(dtype) for name, value in out.items()}

  return jax.jit(encode_batch)


def _empty_prompt_batch(pipe, resolution: int, batch_pairs: int) -> dict:
  """`batch_pairs` pairs of blank images captioned ""."""
  from dpo_jax import encode
  ids = encode.tokenize_prompts(pipe.tokenizers, [""] * batch_pairs)
  return {"pixels": np.zeros((batch_pairs, 2, resolution, resolution, 3), np.float32),
          **{f"input_ids_{i}": token_ids for i, token_ids in enumerate(ids)}}


def prepare(config, output: str, *, batch_pairs: int = DEFAULT_BATCH_PAIRS,
            dtype: str = "float16", overwrite: bool = False, process_index: int | None = None,
            process_count: int | None = None) -> dict[str, int]:
  """Writes this host's share of the cache in `output`; returns its counts (`skips`).

  `process_index` / `process_count` default to JAX's: the share is this process's.
  """
  import jax  # Here, not at the top: --help and flag errors should not wait for JAX.
  import jax.numpy as jnp

  from dpo_jax import encode, parallel, train
  from dpo_jax.data import latent_cache, loader, skips

  if config.model.pretrained is None:
    raise UserError("model.pretrained is not set; the cache is encoded by its VAE and text "
                    "encoders: pass --config.model.pretrained=PIPELINE_FOLDER")
  if dtype not in ("float16", "float32", "bfloat16"):
    raise UserError(f"--dtype={dtype} is not supported; use float16, bfloat16 or float32")
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if config.data.format == "unpaired":
    raise UserError("the latent cache holds pairs; data.format='unpaired' (KTO) trains from "
                    "its images directly: skip this step")
  if os.path.isfile(os.path.join(output, latent_cache.METADATA)) and not overwrite:
    raise UserError(f"{output} already holds a latent cache; choose another --output or pass "
                    "--overwrite")
  # The encoders in the dtypes training would encode in (model.vae_dtype,
  # model.text_encoder_dtype), so that the cache equals encoding in the step.
  pipe = train.load_pipeline(config)
  source = loader.make_source(config.data)
  os.makedirs(output, exist_ok=True)
  devices = jax.local_devices()
  batch_pairs = -(-batch_pairs // len(devices)) * len(devices)
  sharding = parallel.batch_sharding(parallel.make_mesh(-1, 1, devices))
  encoders, frozen = encode.pipeline_encoders(pipe)
  fingerprint = latent_cache.encoders_fingerprint(frozen["vae"], frozen["text_encoders"])
  frozen = jax.device_put(frozen, jax.sharding.NamedSharding(sharding.mesh,
                                                             jax.sharding.PartitionSpec()))
  encode_batch = _encode_function(encoders, jnp.dtype(dtype))

  if index == 0:
    # Through the same program as every batch, so that a prompt dropped at train time gets
    # the very numbers the step would compute for "".
    encoded = jax.device_get(encode_batch(frozen, jax.device_put(
        _empty_prompt_batch(pipe, config.data.resolution, batch_pairs), sharding)))
    empty = {name: encoded[name][0] for name in ("context", "pooled") if name in encoded}
    data = config.data
    latent_cache.write_metadata(output, {
        "kind": pipe.kind, "resolution": data.resolution, "dtype": dtype, "num_shards": count,
        "pretrained": config.model.pretrained, "fingerprint": fingerprint,
        "source": repr(source), "skipped_at_start": source.skipped_at_start,
        "data": {key: data.get(key) for key in (
            "format", "train_files", "tfds_name", "tfds_split", "model_filter", "random_crop",
            "random_flip", "shared_flip")} | {"seed": config.train.seed}}, empty)

  writer = latent_cache.ShardWriter(output, index, count)
  batches = loader.make_prepare_iterator(config, source, pipe.tokenizers,
                                         batch_pairs=batch_pairs, process_index=index,
                                         process_count=count)
  started = last_report = time.perf_counter()
  for batch in batches:
    rows = len(batch["pair_ids"])
    encoded = jax.device_get(encode_batch(frozen, jax.device_put(loader.padded(batch, batch_pairs),
                                                                 sharding)))
    for row in range(rows):
      writer.write({**{name: value[row] for name, value in encoded.items()},
                    "original_size": batch["original_size"][row],
                    "crop_top_left": batch["crop_top_left"][row],
                    "pair_ids": batch["pair_ids"][row]})
    if time.perf_counter() - last_report > _PROGRESS_SECONDS:
      last_report = time.perf_counter()
      print(f"host {index}: {writer.pairs} pairs encoded, "
            f"{writer.pairs / (last_report - started):.1f} pairs/s", flush=True)
  writer.close(batches.counts)
  print(f"host {index}/{count}: wrote {writer.pairs} pairs to "
        f"{latent_cache.shard_path(output, index, count)} ({skips.describe(batches.counts)}), "
        f"their {writer.captions} distinct caption encodings to "
        f"{os.path.basename(latent_cache.captions_path(output, index, count))}", flush=True)
  if index == 0 and count > 1:
    print("Each host stored the captions of its own share. Once every host has finished, "
          f"python -m dpo_jax.tools.merge_captions --cache_dir {output} (on one machine) "
          "stores each caption once for the whole cache", flush=True)
  return batches.counts


def run() -> None:
  config = cli.define_config_flag()
  output = flags.DEFINE_string("output", None, "The folder to write the cache in.")
  batch_pairs = flags.DEFINE_integer("batch_pairs", DEFAULT_BATCH_PAIRS,
                                     "Pairs per encode call on this host.")
  dtype = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"],
                            "Storage dtype of latent moments and embeddings.")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace a cache already in --output.")

  def command(argv):
    cli.check_arguments(argv, "--config, --config.KEY=VALUE, --output, --batch_pairs, --dtype "
                        "and --overwrite")
    if not output.value:
      raise UserError("--output is required: the folder to write the latent cache in")
    from dpo_jax import config_checks, parallel  # JAX is slow to load.
    config_checks.check_config(config.value)
    if config.value.data.get("cache_dir"):
      raise UserError("data.cache_dir is set: prepare reads the raw pairs; unset it")
    parallel.initialize_distributed(config.value)
    prepare(config.value, output.value, batch_pairs=batch_pairs.value, dtype=dtype.value,
            overwrite=overwrite.value)

  cli.run(command)


if __name__ == "__main__":
  run()
