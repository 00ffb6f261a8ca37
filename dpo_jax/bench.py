"""Times the real train step on random weights: pairs/s, step time, FLOPs, MFU and memory.

  python -m dpo_jax.bench --config configs/sd15.py --unet sd15 [--config.KEY=VALUE ...]
  python -m dpo_jax.bench --config configs/synthetic.py          # CPU-sized: the config's UNet
  python -m dpo_jax.bench --config configs/synthetic.py --torch  # and PyTorch's, same shapes
  python -m dpo_jax.bench --config configs/synthetic.py --profile /tmp/trace  # + a trace
  python -m dpo_jax.bench --config configs/synthetic.py --reference=precomputed

The step is `train.build_program`'s, the one `train` runs, fed latent-cache batches (VAE
moments and text embeddings, random), so no encoder runs and nothing is downloaded. Compile
time is reported apart and never enters a rate. The last line is one JSON object.

MFU counts model FLOPs, not XLA's: a DPO pair costs 8 UNet forward-equivalents (policy
forward and backward on winner and loser, 3 × 2, reference forward on both, 2), 6 with
`--reference=precomputed` (the reference's errors arrive with the batch), SFT 3; the
forward's FLOPs per image come from XLA's cost analysis of one UNet call. XLA's count for
the whole step is reported too (`flops_per_step`); with `dpo.reference_pass='shared'` it
leaves out one forward pass per image (XLA counts a loop body once).

--torch also times the official PyTorch step (diffusers' UNet, `bench_torch`) on the same
UNet config, batch, latent and text shapes and dtype, in the same process: `torch_*` keys and
`speedup` = pairs_per_sec / torch_pairs_per_sec. torch is imported only then.
"""
import dataclasses
import importlib
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from dpo_jax import cli, config_checks, diffusion, encode, parallel, train
from dpo_jax.errors import UserError
from dpo_jax.models import layers, unet as unet_lib, unet_presets, vae as vae_lib
from dpo_jax.models.unet import init_abstract

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU v4": 275e12,
}
_PROFILED_STEPS = 3  # Steps in a --profile trace.
# The releases' VAE latent scaling (their vae/config.json); only the scale matters here.
_SCALING = {"sd": 0.18215, "sdxl": 0.13025}


def forwards_per_pair(config: ml_collections.ConfigDict) -> int:
  """UNet forward-equivalents per pair (per row: a pair, or one unpaired image): the
  policy's forward and backward (3) on each image the loss sees, and the reference's forward
  on those images when the step runs it."""
  images = config_checks.images_per_example(config)
  return 3 * images + (images if config_checks.runs_reference(config) else 0)


def peak_flops(device: jax.Device) -> float | None:
  """The device's dense bf16 peak, or None where unknown (CPUs)."""
  for prefix, peak in PEAK_BF16_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return peak
  return None


def unet_config(config: ml_collections.ConfigDict, preset: str | None) -> dict:
  if preset:
    return dict(unet_presets.PRESETS[preset])
  if config.model.pretrained:
    raise UserError("bench runs random weights and reads no pipeline; pass --unet "
                    f"{'|'.join(unet_presets.PRESETS)} for model.pretrained's shape")
  return config.model.unet.to_dict()


def random_models(config: ml_collections.ConfigDict, preset: str | None) -> train.Models:
  """A random UNet of the preset's (or config's) shape, and the encoders' configs only:
  batches arrive encoded, as from a latent cache."""
  models = abstract_models(config, unet_config(config, preset))
  return dataclasses.replace(models, initial_params=host_random_params(models.unet,
                                                                       config.train.seed))


def abstract_models(config: ml_collections.ConfigDict, unet_shape: dict) -> train.Models:
  """A UNet of the diffusers config `unet_shape` whose params are ShapeDtypeStructs (nothing
  allocated), and the encoders' configs only."""
  options = dict(dtype=jnp.dtype(config.model.compute_dtype), remat=config.model.remat,
                 remat_policy=config.model.remat_policy,
                 attention_implementation=config.model.attention_implementation)
  unet = unet_lib.build_unet(unet_shape, **options)
  kind = "sdxl" if unet.config.addition_embed_type else "sd"
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(block_out_channels=(128, 256, 512, 512),
                                                scaling_factor=_SCALING[kind]))
  encoders = encode.Encoders(kind, vae)
  schedule = train.noise_schedule(diffusion.DEFAULT_SCHEDULER, config)
  return train.Models(unet, init_abstract(unet), schedule, encoders)


def host_random_params(unet, seed: int):
  """Random float32 params drawn on the host (kernels N(0, 0.02²), norm scales 1, biases 0):
  a timing needs no particular init, and compiling the UNet's `init` for a GPU takes
  minutes (its convolutions are autotuned) where this takes seconds."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if "bias" in name:
      return np.zeros(leaf.shape, np.float32)
    return 0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)

  return jax.tree_util.tree_map_with_path(fill, init_abstract(unet))


def _pooled_width(unet_config) -> int:
  """SDXL's pooled text embedding width: the added-condition input less the 6 time ids."""
  return (unet_config.projection_class_embeddings_input_dim
          - 6 * unet_config.addition_time_embed_dim)


def encoded_batch(models: train.Models, pairs: int, resolution: int, seed: int) -> dict:
  """Random latent-cache batch of `pairs` pairs at `resolution` pixels."""
  unet = models.unet.config
  size = resolution // models.encoders.vae.config.downscale_factor
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  batch = {"latent_mean": normal(pairs, 2, size, size, unet.in_channels),
           "latent_logvar": normal(pairs, 2, size, size, unet.in_channels) - 4,
           "context": normal(pairs, 77, unet.cross_attention_dim[0]),
           "pair_ids": np.arange(pairs, dtype=np.int32)}
  if models.encoders.kind == "sdxl":
    batch["pooled"] = normal(pairs, _pooled_width(unet))
    batch["original_size"] = np.full((pairs, 2, 2), resolution, np.int32)
    batch["crop_top_left"] = np.zeros((pairs, 2, 2), np.int32)
  return batch


def forward_flops_per_image(models: train.Models, resolution: int) -> float:
  """XLA's FLOP count of one UNet forward pass on one image (lowered, not compiled)."""
  unet = models.unet
  size = resolution // models.encoders.vae.config.downscale_factor
  shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)
  added = {}
  if models.encoders.kind == "sdxl":
    added = {"text_embeds": shape(1, _pooled_width(unet.config)), "time_ids": shape(1, 6)}
  forward = lambda params, x, t, context, added: unet.apply({"params": params}, x, t, context,
                                                            **added)
  lowered = jax.jit(forward).lower(
      init_abstract(unet), shape(1, size, size, unet.config.in_channels),
      shape(1, dtype=jnp.int32), shape(1, 77, unet.config.cross_attention_dim[0]), added)
  return float(lowered.cost_analysis()["flops"])


def _import_bench_torch():
  try:
    return importlib.import_module("dpo_jax.bench_torch")
  except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] not in ("torch", "diffusers"):
      raise
    raise UserError("--torch needs PyTorch and diffusers: install PyTorch's CPU build first "
                    "(pip install torch==2.13.0), then pip install -e '.[test]' (or "
                    "'.[export]')") from None


def torch_reference(config: ml_collections.ConfigDict, preset: str | None,
                    models: train.Models, steps: int, warmup: int) -> dict:
  """`bench_torch.torch_bench` on this run's UNet config and `encoded_batch`'s shapes."""
  unet = models.unet.config
  return _import_bench_torch().torch_bench(
      unet_config(config, preset), pairs=config.train.batch_pairs,
      latent_size=config.data.resolution // models.encoders.vae.config.downscale_factor,
      context_length=77, context_width=unet.cross_attention_dim[0],
      pooled_width=_pooled_width(unet) if models.encoders.kind == "sdxl" else None,
      beta=config.dpo.beta, lr=config.optim.peak_lr or 1e-8,
      weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip_norm,
      bf16=config.model.compute_dtype == "bfloat16", steps=steps, warmup=warmup,
      seed=config.train.seed, gradient_checkpointing=config.model.remat)


def bench(config: ml_collections.ConfigDict, *, preset: str | None = None, steps: int = 10,
          warmup: int = 2, devices=None, torch: bool = False,
          profile: str | None = None, reference: str = "live") -> dict:
  """Compiles and times `steps` train steps after `warmup` untimed ones on `devices`
  (default: all); with `torch`, the PyTorch reference's too (`torch_reference`); with
  `profile`, a jax.profiler trace of 3 more steps (after the timed ones, so tracing never
  slows what is timed) in that folder; `reference` 'precomputed' times the step that reads
  the reference's errors from its batch (random ones here) instead of running it."""
  config = ml_collections.ConfigDict(config.to_dict())  # A copy: batches arrive encoded,
  config.data.cache_dir = "(random latent-cache batches)"  # as from a latent cache.
  config.dpo.reference = reference
  if reference == "precomputed":
    config.dpo.reference_errors = "(random errors in each batch)"
  config_checks.check_config(config)
  if torch:
    _import_bench_torch()  # A missing torch fails here, before anything is compiled.
  torch_results = {}
  if torch:
    # PyTorch runs before JAX's first device use: on a GPU, JAX's client reserves 75% of
    # the memory when it starts, and PyTorch hands its cache back when done.
    models = random_models(config, preset)
    torch_results = torch_reference(config, preset, models, steps, warmup)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  parallel.check_batch(config.train.batch_pairs, mesh, config.train.grad_accum)
  if not torch:  # After the batch check: SDXL's random params take a while to draw.
    models = random_models(config, preset)
  state, program = train.build_program(config, models, mesh)
  batches = [encoded_batch(models, config.train.batch_pairs, config.data.resolution,
                           config.train.seed + i) for i in range(2)]
  if reference == "precomputed":
    batches = [{**batch, "reference_errors": np.abs(np.random.default_rng(i).standard_normal(
        (config.train.batch_pairs, 2), np.float32))} for i, batch in enumerate(batches)]
  batches = [program.step_input(batch) for batch in batches]

  started = time.perf_counter()
  compiled = program.step_fn.lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # Older jax: one dict per program.

  for i in range(warmup):
    state, _ = compiled(state, batches[i % 2])
  jax.block_until_ready(state)
  started = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  step_seconds = (time.perf_counter() - started) / steps
  if profile:
    with jax.profiler.trace(profile):
      for i in range(_PROFILED_STEPS):
        state, metrics = compiled(state, batches[i % 2])
      jax.block_until_ready((state, metrics))

  devices = mesh.devices.size
  device = mesh.devices.flat[0]
  # XLA costs the partitioned program, one device's share of the step.
  xla_flops_per_step = float(cost.get("flops", float("nan"))) * devices
  forward = forward_flops_per_image(models, config.data.resolution)
  model_flops_per_step = forward * forwards_per_pair(config) * config.train.batch_pairs
  peak = peak_flops(device)
  tflops = model_flops_per_step / step_seconds / devices / 1e12
  memory = train.memory_estimate(compiled)
  live = device.memory_stats() or {}
  pairs_per_sec = config.train.batch_pairs / step_seconds
  if torch_results:
    torch_results["speedup"] = pairs_per_sec / torch_results["torch_pairs_per_sec"]
  return {
      "unet": preset or "config", "loss": config.dpo.loss,
      "batch_pairs": config.train.batch_pairs, "grad_accum": config.train.grad_accum,
      "resolution": config.data.resolution, "compute_dtype": config.model.compute_dtype,
      "reference_dtype": config.model.reference_dtype,
      "reference_pass": config.dpo.reference_pass, "reference": reference,
      "remat": config.model.remat, "remat_policy": config.model.remat_policy,
      "attention": layers.attention_implementation(config.model.attention_implementation,
                                                   0, 0) or "xla",
      "optimizer": config.optim.name, "devices": devices, "device": device.device_kind,
      "backend": jax.default_backend(),
      "pairs_per_sec": pairs_per_sec,
      "step_seconds": step_seconds, "compile_seconds": compile_seconds, "timed_steps": steps,
      "flops_per_step": xla_flops_per_step,
      "forward_flops_per_image": forward, "model_flops_per_step": model_flops_per_step,
      "tflops_per_sec": tflops,  # Model FLOPs per second per device.
      "mfu": tflops * 1e12 / peak if peak else None,
      "peak_bytes_per_device": memory.get("peak"), "memory": memory,
      "measured_peak_bytes": live.get("peak_bytes_in_use"),
      "final_loss": float(metrics["loss"]), "host": platform.node(),
      "host_cpus": os.cpu_count(), "profile": profile, **torch_results,
  }


def run() -> None:
  config = cli.define_config_flag()
  preset = flags.DEFINE_enum("unet", None, list(unet_presets.PRESETS),
                             "A release's UNet shape, random weights (default: model.unet).")
  steps = flags.DEFINE_integer("steps", 10, "Timed steps.")
  warmup = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  with_torch = flags.DEFINE_bool("torch", False, "Also time the official PyTorch step "
                                 "(diffusers' UNet) on the same shapes: torch_* keys, speedup.")
  profile = flags.DEFINE_string("profile", None, "A folder for a jax.profiler trace of 3 "
                                "steps after the timed ones (TensorBoard's profile plugin).")
  reference = flags.DEFINE_enum("reference", "live", ["live", "precomputed"],
                                "'precomputed': the step of dpo.reference='precomputed', "
                                "which reads the reference's errors instead of running it.")

  def command(argv):
    cli.check_arguments(argv, "--config, --config.KEY=VALUE, --unet, --steps, --warmup, "
                        "--torch, --profile, --reference")
    result = bench(config.value, preset=preset.value, steps=steps.value, warmup=warmup.value,
                   torch=with_torch.value, profile=profile.value, reference=reference.value)
    print(json.dumps(result), flush=True)

  cli.run(command)


if __name__ == "__main__":
  run()
