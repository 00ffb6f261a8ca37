"""XLA's per-device memory and FLOPs of the real train step on N devices, from shapes alone.

  python -m dpo_jax.tools.memory --config configs/sdxl.py --devices 8
  python -m dpo_jax.tools.memory --config configs/sd15.py --devices 1 --config.model.remat=True
  python -m dpo_jax.tools.memory --config configs/synthetic.py --devices 8 --pairs_per_device 2

The step is `train.build_program`'s, the one `train` runs, fed latent-cache batches (no
encoders in the step), compiled ahead of time for N fake CPU devices from ShapeDtypeStructs
with their shardings: no weights are allocated and no data are read, so one CPU machine
plans a 64-device SDXL layout. `train.batch_pairs` becomes devices × `--pairs_per_device` ×
`train.grad_accum`; every other key (`model.remat`, `model.reference_dtype`,
`model.compute_dtype`, `mesh.fsdp`, `dpo.reference_pass`, ...) is the config's, but an
unset `model.attention_implementation` compiles XLA's attention, as accelerators run it by
default; `blocked` (ours, which keeps no attention probabilities) stands in for a fused flash
kernel such as cuDNN's, which a CPU cannot compile. The UNet is
`--unet`'s release shape, else the one `model.pretrained` names (a release's hub id, or a
local pipeline folder's unet/config.json), else `model.unet`.

  python -m dpo_jax.tools.memory --config configs/sdxl.py --tpu v5p:2x2x2

With `--tpu TOPOLOGY` (JAX's slice names: v5p:2x2x1, v5p:2x2x2, v6e:1x1, v6e:2x4, v5e:2x2,
v4:2x2x1, ...) the same step is compiled by libtpu's XLA:TPU for that slice, on this machine,
without TPUs (`pip install -e '.[tpu]'` installs libtpu): the plan a TPU would run, bfloat16
kept in bfloat16, with each chip's HBM to hold it against.

The figures are XLA's buffer assignment: arguments and outputs are exact (the sharded state
and batch), temporaries depend on the backend's fusion and layout choices. XLA's CPU backend
computes bfloat16 through float32 copies, so its temporaries overstate an accelerator's
(SD1.5 at 128 px, 1 device: 18.7 GiB of temporaries on the CPU with the blocked attention,
9.5 on TPU v5p with XLA's). FLOPs are XLA's count, which takes a loop body once: with
`train.grad_accum` > 1 they are one microbatch's, and `dpo.reference_pass='shared'` leaves
out the reference's forward (as `bench`'s `flops_per_step`). The last line is one JSON object.
"""
import json
import math
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from dpo_jax import bench, cli, config_checks, parallel, train
from dpo_jax.errors import UserError
from dpo_jax.models import model_files, unet_presets

# The recipes' hub ids (configs/sd15.py, sd21.py, sdxl.py) and the release UNet each names.
RELEASE_PRESETS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}
CACHE_DTYPE = "float16"  # `prepare`'s default for the cached moments and embeddings.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# HBM per chip in GiB by `device_kind` (Google Cloud TPU system architecture pages).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


def tpu_devices(topology: str) -> list:
  """The chips of a TPU slice named as JAX names them ('v5p:2x2x1', 'v6e:2x4'), to compile
  for without TPUs: libtpu's compiler plans the program for that slice on this host."""
  match = re.fullmatch(r"v\d+[a-z]*:(\d+(?:x\d+){1,2})", topology)
  if not match:
    raise UserError(f"--tpu {topology!r}: give a slice as JAX names it, generation:chips per "
                    "axis, e.g. v5p:2x2x1 (4 chips), v5p:2x2x2 (8), v6e:1x1, v6e:2x4, v5e:2x2")
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError("--tpu compiles with libtpu, which is not installed: pip install -e "
                    "'.[tpu]' (no TPU needed; it compiles on this machine)") from None
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # No TPU is touched, so several processes may compile at once: skip libtpu's lock on the
  # (absent) chips, which refuses a second process.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chips = [int(n) for n in match.group(1).split("x")]
  options = {}
  if math.prod(chips) < 4:  # Smaller than a host's default 2x2 chips: one host holds it.
    options["chips_per_host_bounds"] = tuple(chips + [1] * (3 - len(chips)))
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **options).devices)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"--tpu {topology}: libtpu does not know this slice ("
                    f"{str(e).splitlines()[0]}); try e.g. v5p:2x2x1, v6e:2x4") from None


def device_memory_gib(device) -> float | None:
  """A TPU chip's HBM in GiB, None for other devices (fake CPU devices have no such bound)."""
  for kind, gib in sorted(TPU_HBM_GIB.items(), key=lambda item: -len(item[0])):
    if device.platform == "tpu" and device.device_kind.startswith(kind):
      return gib
  return None


def device_environment(devices: int, environ: dict[str, str]) -> dict[str, str]:
  """`environ` with JAX on `devices` fake CPU devices (other XLA_FLAGS kept)."""
  xla_flags = [flag for flag in environ.get("XLA_FLAGS", "").split()
               if not flag.startswith(_DEVICE_COUNT_FLAG)]
  xla_flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
  return {**environ, "XLA_FLAGS": " ".join(xla_flags), "JAX_PLATFORMS": "cpu"}


def _reexecute_with_devices(devices: int) -> None:
  """Replaces this process by the same command on `devices` CPU devices, unless it runs so.

  JAX reads JAX_PLATFORMS when imported and XLA_FLAGS when its CPU backend starts, so a
  process that did not start with them cannot change its device count: a fresh one can."""
  environment = device_environment(devices, dict(os.environ))
  if environment != dict(os.environ):
    os.execve(sys.executable, [sys.executable, "-m", "dpo_jax.tools.memory", *sys.argv[1:]],
              environment)


def unet_shape(config: ml_collections.ConfigDict, preset: str | None) -> tuple[str, dict]:
  """(a name, the diffusers UNet config) to build: `preset`'s; else model.pretrained's (a
  release's hub id, or a local folder's unet/config.json: no weights read); else model.unet."""
  if preset:
    return preset, dict(unet_presets.PRESETS[preset])
  pretrained = config.model.pretrained
  if pretrained in RELEASE_PRESETS:
    name = RELEASE_PRESETS[pretrained]
    return name, dict(unet_presets.PRESETS[name])
  if pretrained and os.path.isfile(os.path.join(pretrained, "unet", "config.json")):
    return pretrained, model_files.read_config(os.path.join(pretrained, "unet"))
  if pretrained:
    raise UserError(f"model.pretrained={pretrained!r} is neither a release this tool knows nor "
                    f"a local pipeline folder; pass --unet {'|'.join(unet_presets.PRESETS)} "
                    "for its UNet shape")
  if not config.model.unet:
    raise UserError("model.pretrained is not set and model.unet is empty; pass --unet "
                    f"{'|'.join(unet_presets.PRESETS)} or a config that sets model.unet")
  return "config", config.model.unet.to_dict()


def abstract_batch(models: train.Models, config: ml_collections.ConfigDict,
                   sharding: jax.sharding.NamedSharding) -> dict:
  """The global latent-cache batch of `config.train.batch_pairs` pairs as ShapeDtypeStructs:
  `bench.encoded_batch`'s fields, in the cache's dtype, with the cache's epochs."""
  one_pair = bench.encoded_batch(models, 1, config.data.resolution, seed=0)
  one_pair["epochs"] = one_pair["pair_ids"]
  if config.dpo.reference == "precomputed":  # `reference_errors.attach`'s field.
    one_pair["reference_errors"] = jax.ShapeDtypeStruct((1, 2), jnp.float32)
  cached = lambda dtype: CACHE_DTYPE if jnp.issubdtype(dtype, jnp.floating) else dtype
  return {name: jax.ShapeDtypeStruct((config.train.batch_pairs, *value.shape[1:]),
                                     cached(value.dtype), sharding=sharding)
          for name, value in one_pair.items()}


def measure(config: ml_collections.ConfigDict, *, preset: str | None = None, devices=None,
            pairs_per_device: int = 1) -> dict:
  """Compiles `config`'s train step for `devices` (default: all) from abstract shapes and
  returns XLA's per-device byte counts, its FLOPs per step and the compile time."""
  if pairs_per_device < 1:
    raise UserError(f"--pairs_per_device={pairs_per_device} must be >= 1")
  if config.model.attention_implementation == "cudnn":
    raise UserError("model.attention_implementation='cudnn' compiles for NVIDIA GPUs only and "
                    "this tool compiles for CPU devices; pass 'blocked' for a fused (flash) "
                    "kernel's memory (it keeps no attention probabilities either), or leave it "
                    "unset for XLA's attention, which keeps them")
  config = ml_collections.ConfigDict(config.to_dict())  # A copy: batches arrive encoded,
  config.data.cache_dir = "(abstract latent-cache batches)"  # as from a latent cache,
  # Unset means ours on a CPU, XLA's on the accelerators this tool plans for: compile XLA's.
  if config.model.attention_implementation is None:
    config.model.attention_implementation = "xla"
  if config.dpo.reference == "precomputed":  # with the reference's errors (`abstract_batch`).
    config.dpo.reference_errors = "(abstract reference errors)"
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  config.train.batch_pairs = mesh.size * pairs_per_device * config.train.grad_accum
  config_checks.check_config(config)
  name, shape = unet_shape(config, preset)
  models = bench.abstract_models(config, shape)
  state, program = train.build_program(config, models, mesh)
  batch = abstract_batch(models, config, program.batch_sharding)
  started = time.perf_counter()
  # XLA's default options, as `train` compiles: lower optimisation levels change the
  # buffers (SD1.5 at 512 px: 42 GiB of temporaries at xla_backend_optimization_level=0,
  # 24 GiB at the default).
  compiled = program.step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # Older jax: one dict per program.
  flops = float(cost.get("flops", float("nan")))  # One device's share of the step.
  memory = train.memory_estimate(compiled)
  capacity = device_memory_gib(mesh.devices.flat[0])
  return {
      "unet": name, "params": sum(p.size for p in jax.tree_util.tree_leaves(
          models.initial_params)),
      "devices": mesh.size, "mesh_data": mesh.shape["data"], "mesh_fsdp": mesh.shape["fsdp"],
      "pairs_per_device": pairs_per_device, "grad_accum": config.train.grad_accum,
      "batch_pairs": config.train.batch_pairs, "resolution": config.data.resolution,
      "loss": config.dpo.loss, "optimizer": config.optim.name, "remat": config.model.remat,
      "remat_policy": config.model.remat_policy,
      "compute_dtype": config.model.compute_dtype,
      "reference_dtype": config.model.reference_dtype,
      "reference_pass": config.dpo.reference_pass, "reference": config.dpo.reference,
      "attention": config.model.attention_implementation,
      **{f"{kind}_bytes": memory.get(kind) for kind in
         ("argument", "output", "temp", "alias", "generated_code")},
      "total_bytes": memory.get("peak"),
      "flops_per_device": flops, "flops_per_step": flops * mesh.size,
      "compile_seconds": compile_seconds, "platform": mesh.devices.flat[0].platform,
      "device_kind": mesh.devices.flat[0].device_kind,
      "device_memory_bytes": capacity and int(capacity * 2**30),
      "fits": None if capacity is None else memory.get("peak", 0) <= capacity * 2**30,
      "host": platform.node(),
  }


def summary(result: dict) -> str:
  """Three lines for a person; the JSON line follows them."""
  gib = lambda kind: f"{(result[f'{kind}_bytes'] or 0) / 2**30:.2f}"
  fits = ""
  if result["fits"] is not None:
    fits = (f" of {result['device_memory_bytes'] / 2**30:.0f} GiB per chip: "
            f"{'fits' if result['fits'] else 'does NOT fit'}")
  return (f"{result['unet']} UNet ({result['params'] / 1e9:.3g} B params) on "
          f"{result['devices']} {result['device_kind']} device(s), "
          f"mesh data={result['mesh_data']} x fsdp={result['mesh_fsdp']}, "
          f"{result['pairs_per_device']} pair(s) per device x grad_accum "
          f"{result['grad_accum']}, {result['resolution']} px; compiled in "
          f"{result['compile_seconds']:.0f}s\n"
          f"per device (GiB): arguments {gib('argument')}, outputs {gib('output')}, "
          f"temporaries {gib('temp')}, aliased {gib('alias')}, generated code "
          f"{gib('generated_code')}; total {gib('total')} (arguments + outputs - aliased + "
          f"temporaries){fits}\n"
          f"XLA FLOPs per step: {result['flops_per_step']:.4g} (all devices, as XLA counts: a "
          "loop body once, so one microbatch's)")


def run() -> None:
  config = cli.define_config_flag()
  devices = flags.DEFINE_integer("devices", None, "Devices to lay the mesh over (fake CPU "
                                 "devices: the tool sets XLA_FLAGS and JAX_PLATFORMS=cpu).")
  preset = flags.DEFINE_enum("unet", None, list(unet_presets.PRESETS),
                             "A release's UNet shape (default: model.pretrained's, else "
                             "model.unet).")
  pairs = flags.DEFINE_integer("pairs_per_device", 1, "Pairs per device in each microbatch.")
  tpu = flags.DEFINE_string("tpu", None, "Compile for this TPU slice with libtpu instead of "
                            "for fake CPU devices, e.g. v5p:2x2x1 (4 chips), v6e:1x1; no TPU "
                            "needed (pip install -e '.[tpu]').")

  def command(argv):
    cli.check_arguments(argv, "--config, --config.KEY=VALUE, --devices, --tpu, --unet, "
                        "--pairs_per_device")
    targets = None  # All of this process's (fake CPU) devices.
    if tpu.value:
      _reexecute_with_devices(1)  # This host's CPU backend only; libtpu compiles.
      targets = tpu_devices(tpu.value)
      if devices.value not in (None, len(targets)):
        raise UserError(f"--devices={devices.value} but --tpu {tpu.value} has {len(targets)} "
                        "chips; drop --devices")
    else:
      if devices.value is None or devices.value < 1:
        raise UserError("--devices must be set to a device count >= 1, e.g. --devices 8 (or "
                        "--tpu SLICE to compile for TPUs)")
      _reexecute_with_devices(devices.value)
      if jax.device_count() != devices.value:
        raise UserError(f"JAX started with {jax.device_count()} CPU devices, not --devices="
                        f"{devices.value}; unset JAX_NUM_CPU_DEVICES")
    result = measure(config.value, preset=preset.value, pairs_per_device=pairs.value,
                     devices=targets)
    print(summary(result), flush=True)
    print(json.dumps(result), flush=True)

  cli.run(command)


if __name__ == "__main__":
  run()
