"""Host-side throughput of the training data paths: Pick-a-Pic JPEGs, and the latent cache.

For the JPEG path, writes synthetic shards in the published schema whose JPEGs compress like
photos (multi-scale random fields plus sensor-like noise, quality 90, 512x512 / 768x768 /
1024x1024). For the cache path, writes a synthetic latent cache (`data/latent_cache.py`) of
random moments and embeddings with the real shapes: SD1.5 at 512, SDXL at 1024. Then times,
in this process:
  prepare  `transforms.prepare_pair` on pairs already in memory (decode, resize, crop, flip,
           scale to [-1, 1]), per source size and training resolution;
  loader   `loader.make_train_iterator` end to end (parquet row-group reads, prepare,
           tokenize, batch), with data.workers=0 and, if asked, more worker processes;
  cache    `loader.make_train_iterator` with data.cache_dir set (ArrayRecord reads in random
           order, a pair's record and its caption's entry, safetensors decode, prompt
           dropout, batch), with the same worker counts.
Each row is a Markdown table row. Run from the repository root:

  python benchmarks/data_throughput.py [--seconds 5] [--workers 0,2]
  python benchmarks/data_throughput.py --measurements=cache   # the cache rows alone
"""
import io
import os
import platform
import sys
import tempfile
import time
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpo_jax import default_config  # pylint: disable=g-import-not-at-top
from dpo_jax.data import latent_cache, loader, pickapic, transforms

MEASUREMENTS = ("prepare", "loader", "cache")

_PAIRS = flags.DEFINE_integer("pairs", 200, "Synthetic pairs to write.")
_ROW_GROUP = flags.DEFINE_integer("row_group_rows", 16, "Rows per parquet row group.")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "Timed seconds per measurement (after warm-up).")
_BATCH = flags.DEFINE_integer("batch_pairs", 8, "Pairs per batch for the loader rows.")
_RESOLUTIONS = flags.DEFINE_list("resolutions", ["512", "1024"], "Training resolutions.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data.workers values for the loader rows.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_MEASUREMENTS = flags.DEFINE_list("measurements", list(MEASUREMENTS),
                                  f"What to time, any of {','.join(MEASUREMENTS)}.")
flags.register_validator("measurements", lambda names: set(names) <= set(MEASUREMENTS),
                         f"--measurements takes names among {','.join(MEASUREMENTS)}")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float16", ["float16", "float32"],
                                 "Storage dtype of the synthetic cache (prepare's --dtype).")

# Source sizes and their share of the synthetic shards (Pick-a-Pic mixes SD1.x/2.x,
# Dreamlike and SDXL outputs).
SIZES = ((512, 0.5), (768, 0.15), (1024, 0.35))
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "tree", "city", "at", "night")

# Pick-a-Pic v2's training pairs once ties are dropped: what a full cache holds.
PICKAPIC_V2_PAIRS = 851_000


class CacheModel(NamedTuple):
  """What `python -m dpo_jax.prepare` would write per pair for one pipeline."""
  kind: str  # cache.json's "kind".
  context_width: int  # The text embedding width D of `context` [77, D].
  pooled_width: int | None  # SDXL's pooled embedding width, None for SD1.5.
  pairs: int  # Pairs written: ~100-160 MB, so random reads span more than a few pages.


# Per training resolution, the pipeline trained at it.
CACHE_MODELS = {512: CacheModel("sd", 768, None, 400), 1024: CacheModel("sdxl", 2048, 1280, 200)}
LATENT_CHANNELS = 4
LATENT_SCALE = 8  # The VAE's downsampling: latents are resolution / 8 on a side.
TEXT_TOKENS = 77


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return f"{names[0] if names else platform.processor()}, {os.cpu_count()} logical CPUs"


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
  """[size, size, 3] uint8: a 1/f-ish sum of upsampled random fields plus fine noise.

  Quality 90 gives ~80 KB at 512x512 and ~300 KB at 1024x1024, as SD outputs of some detail.
  """
  image = np.zeros((size, size, 3), np.float32)
  cells = 2
  while cells <= size // 2:
    # Channels share most of their structure, as in natural images.
    field = rng.normal(0, 1, (cells, cells, 3)) * 0.5 + rng.normal(0, 1, (cells, cells, 1))
    layer = Image.fromarray(np.clip(field * 80 / cells ** 0.3 + 128, 0, 255).astype(np.uint8))
    image += (np.asarray(layer.resize((size, size), Image.Resampling.BICUBIC), np.float32)
              - 128) / 2
    cells *= 2
  image += rng.normal(128, 5.0, (size, size, 3)) + rng.normal(0, 25, (1, 1, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_shards(folder: str, pairs: int, seed: int, files: int = 2) -> list[str]:
  rng = np.random.default_rng(seed)
  sizes, shares = zip(*SIZES)
  paths = []
  for f in range(files):
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0",
                            "model_1", "has_label", "are_different", "best_image_uid")}
    for i in range(pairs // files):
      size = int(rng.choice(sizes, p=shares))  # Both images of a pair come from one model.
      label_0 = float(rng.integers(2))
      caption = " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
      for key, value in (("caption", caption), ("jpg_0", jpeg(photo_like(rng, size))),
                         ("jpg_1", jpeg(photo_like(rng, size))), ("label_0", label_0),
                         ("label_1", 1 - label_0), ("model_0", f"m{size}"),
                         ("model_1", f"m{size}"), ("has_label", True),
                         ("are_different", True), ("best_image_uid", f"{f}-{i}")):
        rows[key].append(value)
    path = os.path.join(folder, f"train-{f:05d}-of-{files:05d}.parquet")
    pq.write_table(pa.table(rows), path, row_group_size=_ROW_GROUP.value)
    paths.append(path)
  return paths


def cpu_seconds() -> float:
  """CPU time of this process and its live descendants (grain workers), user + system."""
  parents, times = {}, {}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    parents[int(pid)] = int(fields[1])
    times[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  total = 0.0
  for pid in times:
    ancestor = pid
    while ancestor > 1 and ancestor != os.getpid():
      ancestor = parents.get(ancestor, 0)
    if ancestor == os.getpid():
      total += times[pid]
  return total


def timed(step, seconds: float, warmup: float = 1.0) -> tuple[float, float]:
  """(items per wall second, items per CPU second) of repeated `step()` calls.

  `step` returns how many items it produced. CPU time counts this process and its workers,
  so the second figure is the per-core rate whatever else runs on the machine.
  """
  end = time.perf_counter() + warmup
  while time.perf_counter() < end:
    step()
  items, wall, cpu = 0, time.perf_counter(), cpu_seconds()
  while time.perf_counter() - wall < seconds or not items:
    items += step()
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  return items / wall, items / cpu


def row(*cells) -> None:
  print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def header() -> None:
  """Starts a table, after a blank line."""
  print()
  row("measurement", "resolution", "pairs/s (wall)", "pairs per CPU-second")
  row("---", "---", "---", "---")


def bench_prepare(records: list[dict], resolutions: list[int], seconds: float) -> None:
  by_size = {}
  for record in records:
    by_size.setdefault(Image.open(io.BytesIO(record["winner"])).width, []).append(record)
  groups = [(f"{s}x{s}", by_size[s]) for s in sorted(by_size)] + [("mix", records)]
  for name, group in groups:
    kb = np.mean([len(r["winner"]) + len(r["loser"]) for r in group]) / 2 / 1024
    state = {"i": 0}

    def decode_only(group=group, state=state):
      record = group[state["i"] % len(group)]
      state["i"] += 1
      transforms.decode_image(record["winner"])
      transforms.decode_image(record["loser"])
      return 1

    rate, per_cpu = timed(decode_only, seconds)
    row(f"decode only, {name} JPEG (~{kb:.0f} KB)", "-", f"{rate:.1f}", f"{per_cpu:.1f}")
    for resolution in resolutions:
      def prepare(group=group, state=state, resolution=resolution):
        record = group[state["i"] % len(group)]
        state["i"] += 1
        out = transforms.prepare_pair(record, seed=0, resolution=resolution, random_crop=True,
                                      random_flip=True, empty_prompt_prob=0.2)
        assert "skip" not in out, out
        return 1

      rate, per_cpu = timed(prepare, seconds)
      row(f"prepare_pair, {name} JPEG (~{kb:.0f} KB)", resolution, f"{rate:.1f}",
          f"{per_cpu:.1f}")


def bench_loader(paths: list[str], resolutions: list[int], workers: list[int],
                 seconds: float) -> None:
  tokenizer = make_tokenizer()
  for resolution in resolutions:
    for count in workers:
      config = default_config.get_config()
      config.data.format = "pickapic"
      config.data.train_files = ",".join(paths)
      config.data.resolution = resolution
      config.data.random_crop = True
      config.data.workers = count
      config.train.batch_pairs = _BATCH.value
      iterator = loader.make_train_iterator(config, [tokenizer], process_index=0,
                                            process_count=1)

      def step(iterator=iterator):
        return len(next(iterator)["pair_ids"])

      rate, per_cpu = timed(step, seconds, warmup=max(3.0, seconds / 2))
      row(f"make_train_iterator (mix), workers={count}, batch {_BATCH.value}", resolution,
          f"{rate:.1f}", f"{per_cpu:.1f}")
      del iterator


def cached_pair(rng: np.random.Generator, model: CacheModel, resolution: int, dtype: str,
                pair_id: int) -> dict[str, np.ndarray]:
  """One record as `prepare` writes it, with random moments and embeddings."""
  side = resolution // LATENT_SCALE
  latents = (2, side, side, LATENT_CHANNELS)
  pair = {"latent_mean": rng.normal(0, 1, latents).astype(dtype),
          "latent_logvar": rng.normal(-8, 1, latents).astype(dtype),
          "context": rng.normal(0, 1, (TEXT_TOKENS, model.context_width)).astype(dtype),
          "original_size": np.full((2, 2), resolution, np.int32),
          "crop_top_left": np.zeros((2, 2), np.int32),
          "pair_ids": np.asarray(pair_id, np.int32)}
  if model.pooled_width:
    pair["pooled"] = rng.normal(0, 1, (model.pooled_width,)).astype(dtype)
  return pair


def write_cache(folder: str, resolution: int, dtype: str, seed: int) -> int:
  """A one-shard cache of `CACHE_MODELS[resolution]` in `folder`; returns its size in bytes."""
  model = CACHE_MODELS[resolution]
  rng = np.random.default_rng(seed)
  empty = {"context": rng.normal(0, 1, (TEXT_TOKENS, model.context_width)).astype(dtype)}
  if model.pooled_width:
    empty["pooled"] = rng.normal(0, 1, (model.pooled_width,)).astype(dtype)
  # No encoders here: the fingerprint and source only need to be strings.
  latent_cache.write_metadata(folder, {
      "kind": model.kind, "resolution": resolution, "dtype": dtype, "num_shards": 1,
      "pretrained": "synthetic", "fingerprint": "synthetic", "source": "synthetic",
      "skipped_at_start": {}}, empty)
  writer = latent_cache.ShardWriter(folder, 0, 1)
  for pair_id in range(model.pairs):
    writer.write(cached_pair(rng, model, resolution, dtype, pair_id))
  writer.close({"kept": model.pairs})
  # Its contexts are random, never repeated: the caption table holds one entry a pair.
  return (os.path.getsize(latent_cache.shard_path(folder, 0, 1))
          + os.path.getsize(latent_cache.captions_path(folder, 0, 1)))


def bench_cache(resolutions: list[int], workers: list[int], seconds: float) -> None:
  for resolution in resolutions:
    model, dtype = CACHE_MODELS[resolution], _CACHE_DTYPE.value
    with tempfile.TemporaryDirectory() as folder:
      kb = write_cache(folder, resolution, dtype, _SEED.value) / model.pairs / 1024
      print(f"\nCache {model.kind} at {resolution} ({dtype}): {model.pairs} pairs, "
            f"{kb:.0f} KB per pair (shard and caption table files / pairs), "
            f"{kb * 1024 * PICKAPIC_V2_PAIRS / 2 ** 30:.0f} GiB per "
            f"{PICKAPIC_V2_PAIRS // 1000}K pairs")
      header()
      for count in workers:
        iterator = make_cache_iterator(folder, resolution, count)

        def step(iterator=iterator):
          return len(next(iterator)["pair_ids"])

        rate, per_cpu = timed(step, seconds, warmup=max(3.0, seconds / 2))
        row(f"make_train_iterator (latent cache, {model.kind} {dtype}, ~{kb:.0f} KB), "
            f"workers={count}, batch {_BATCH.value}", resolution, f"{rate:.1f}",
            f"{per_cpu:.1f}")
        del iterator


def make_cache_iterator(folder: str, resolution: int, workers: int) -> loader.PairBatches:
  """The training iterator over the cache in `folder`, as --config.data.cache_dir builds it."""
  config = default_config.get_config()
  config.data.cache_dir = folder
  config.data.resolution = resolution
  config.data.empty_prompt_prob = 0.2
  config.data.workers = workers
  config.train.batch_pairs = _BATCH.value
  # The cache path reads no captions: it needs no tokenizer.
  return loader.make_train_iterator(config, [], process_index=0, process_count=1)


def bench_jpeg(resolutions: list[int], workers: list[int], seconds: float,
               measurements: list[str]) -> None:
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    paths = write_shards(folder, _PAIRS.value, _SEED.value)
    megabytes = sum(os.path.getsize(p) for p in paths) / 2 ** 20
    print(f"\nWrote {_PAIRS.value} pairs in {len(paths)} shards ({megabytes:.0f} MB, "
          f"{_ROW_GROUP.value} rows per row group) in {time.perf_counter() - start:.0f}s")
    header()
    if "prepare" in measurements:
      source = pickapic.PickapicSource(paths)
      bench_prepare([dict(source[i], epochs=0) for i in range(len(source))], resolutions,
                    seconds)
    if "loader" in measurements:
      bench_loader(paths, resolutions, workers, seconds)


def make_tokenizer():
  # The tests' tiny CLIP BPE: tokenizing a caption costs well under 1% of a pair either way.
  from tests import tiny_models  # pylint: disable=g-import-not-at-top
  return tiny_models.make_clip_tokenizer()


def main(argv):
  del argv
  resolutions = [int(r) for r in _RESOLUTIONS.value]
  workers = [int(w) for w in _WORKERS.value]
  measurements = _MEASUREMENTS.value
  unknown = set(resolutions) - set(CACHE_MODELS)
  if "cache" in measurements and unknown:
    raise app.UsageError(f"--resolutions {sorted(unknown)}: the cache rows know "
                         f"{sorted(CACHE_MODELS)}")
  print(f"CPU: {cpu_model()}")
  if {"prepare", "loader"} & set(measurements):
    bench_jpeg(resolutions, workers, _SECONDS.value, measurements)
  if "cache" in measurements:
    bench_cache(resolutions, workers, _SECONDS.value)


if __name__ == "__main__":
  app.run(main)
