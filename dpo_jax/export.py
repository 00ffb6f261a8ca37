"""`python -m dpo_jax.export --workdir DIR --output OUT [--step N] [--overwrite] [--merge]`.

Writes a run's tuned UNet as diffusers files: the whole pipeline (the tuned UNet plus the
untouched components of `model.pretrained`) when the run started from one, else OUT/unet/.
LoRA adapters (dpo_jax/lora.py) go out as a diffusers LoRA file (`write_lora`), or merged
into the base UNet's params and written as any tuned UNet (`write_unet`).
"""
import json
import os

from absl import flags, logging

from dpo_jax import cli
from dpo_jax.errors import UserError


# diffusers' LORA_WEIGHT_NAME_SAFE: the file `load_lora_weights(FOLDER)` looks for.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def export(workdir: str, output: str, step: int | None = None, overwrite: bool = False,
           merge: bool = False) -> int:
  """Exports checkpoint `step` (default: newest) of the run in `workdir`; returns the step.
  A LoRA run's adapters go out as a diffusers LoRA file, or with `merge` merged into its
  base UNet and written as a full one."""
  from dpo_jax import lora, runs  # After flag parsing: JAX is slow to load.

  run = runs.load_run(workdir, step)
  if run.adapters is None:
    if merge:
      raise UserError(f"{workdir} is not a LoRA run (lora.enabled was off): its UNet is "
                      "written whole anyway; drop --merge")
    write_unet(run.config, run.params, output, overwrite)
  elif merge:
    write_unet(run.config, run.params, output, overwrite)
  else:
    settings = lora.settings(runs.with_defaults(run.config))
    write_lora(run.adapters, output, alpha=settings.alpha, rank=settings.rank,
               overwrite=overwrite)
  return run.step


def write_unet(config: dict, params, output: str, overwrite: bool = False) -> None:
  """Writes UNet `params` of a run with `config` (a dict): the whole pipeline when the run
  started from one (`model.pretrained`), else OUT/unet/."""
  from dpo_jax import runs
  from dpo_jax.models import pipeline as pipeline_lib, unet as unet_lib

  if config["model"]["pretrained"]:
    # The run's UNet config: model.unet_init's when it replaced the pipeline's UNet. The
    # pipeline's own VAE is written, not model.vae (which only replaced it for encoding).
    pipe = runs.run_pipeline({"model": {**config["model"], "vae": None}})
    pipeline_lib.export_pipeline(pipe, params, output, overwrite=overwrite)
  else:
    _check_empty(output, overwrite)
    unet = unet_lib.build_unet(config["model"]["unet"], where="the run's model.unet")
    unet_lib.save_unet(unet, params, os.path.join(output, "unet"))


def write_lora(adapters, output: str, *, alpha: float, rank: int,
               overwrite: bool = False) -> str:
  """Writes `adapters` as OUT/pytorch_lora_weights.safetensors, which diffusers'
  `pipe.load_lora_weights(OUT)` and `unet.load_lora_adapter(OUT, prefix='unet')` load (PEFT
  keys, float32, alpha in the `lora_adapter_metadata` header). Returns the file's path."""
  import safetensors.numpy

  from dpo_jax import lora

  _check_empty(output, overwrite)
  state, metadata = lora.lora_to_diffusers(adapters, alpha=alpha, rank=rank)
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, LORA_WEIGHTS)
  partial = f"{path}.partial"  # Renamed into place: never a half-written file at `path`.
  safetensors.numpy.save_file(state, partial, {
      "format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)})
  os.replace(partial, path)
  return path


def _check_empty(output: str, overwrite: bool) -> None:
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise UserError(f"{output} exists and is not empty; choose another --output or pass "
                    "--overwrite")


def run() -> None:
  workdir = flags.DEFINE_string("workdir", None, "The training run's --workdir.")
  output = flags.DEFINE_string("output", None, "The diffusers folder to write.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")
  merge = flags.DEFINE_bool("merge", False, "A LoRA run: write its base UNet with the "
                            "adapters merged in (a full diffusers UNet or pipeline) instead "
                            "of the LoRA file.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; options: --workdir, --output, --step, "
                      "--overwrite, --merge")
    if not workdir.value or not output.value:
      raise UserError("--workdir and --output are both required")
    logging.set_verbosity(logging.ERROR)  # orbax narrates partial restores at WARNING.
    exported = export(workdir.value, output.value, step.value, overwrite.value, merge.value)
    print(f"exported step {exported} of {workdir.value} to {output.value}")

  cli.run(command)


if __name__ == "__main__":
  run()
