"""`python -m dpo_jax.export --workdir DIR --output OUT [--step N] [--overwrite]`.

Writes a run's tuned UNet as diffusers files: the whole pipeline (the tuned UNet plus the
untouched components of `model.pretrained`) when the run started from one, else OUT/unet/.
"""
import os

from absl import flags, logging

from dpo_jax import cli
from dpo_jax.errors import UserError


def export(workdir: str, output: str, step: int | None = None, overwrite: bool = False) -> int:
  """Exports checkpoint `step` (default: newest) of the run in `workdir`; returns the step."""
  from dpo_jax import runs  # After flag parsing: JAX is slow to load.
  from dpo_jax.models import pipeline as pipeline_lib, unet as unet_lib

  run = runs.load_run(workdir, step)
  if run.config["model"]["pretrained"]:
    # The run's UNet config: model.unet_init's when it replaced the pipeline's UNet. The
    # pipeline's own VAE is written, not model.vae (which only replaced it for encoding).
    pipe = runs.run_pipeline({"model": {**run.config["model"], "vae": None}})
    pipeline_lib.export_pipeline(pipe, run.params, output, overwrite=overwrite)
  else:
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
      raise UserError(f"{output} exists and is not empty; choose another --output or pass "
                      "--overwrite")
    unet = unet_lib.build_unet(run.config["model"]["unet"], where="the run's model.unet")
    unet_lib.save_unet(unet, run.params, os.path.join(output, "unet"))
  return run.step


def run() -> None:
  workdir = flags.DEFINE_string("workdir", None, "The training run's --workdir.")
  output = flags.DEFINE_string("output", None, "The diffusers folder to write.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; options: --workdir, --output, --step, "
                      "--overwrite")
    if not workdir.value or not output.value:
      raise UserError("--workdir and --output are both required")
    logging.set_verbosity(logging.ERROR)  # orbax narrates partial restores at WARNING.
    exported = export(workdir.value, output.value, step.value, overwrite.value)
    print(f"exported step {exported} of {workdir.value} to {output.value}")

  cli.run(command)


if __name__ == "__main__":
  run()
