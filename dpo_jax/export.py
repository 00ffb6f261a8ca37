"""`python -m dpo_jax.export --workdir DIR --output OUT [--step N] [--overwrite]`.

Writes a run's tuned UNet as diffusers files: the whole pipeline (the tuned UNet plus the
untouched components of `model.pretrained`) when the run started from one, else OUT/unet/.
"""
import os
import sys

from absl import app, flags, logging

from dpo_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's --workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "The diffusers folder to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")


def export(workdir: str, output: str, step: int | None = None, overwrite: bool = False) -> int:
  """Exports checkpoint `step` (default: newest) of the run in `workdir`; returns the step."""
  from dpo_jax.checkpoint import Checkpointer  # After flag parsing: JAX is slow to load.
  from dpo_jax.models import pipeline as pipeline_lib, unet_io

  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir} holds no checkpoints/; pass the --workdir of a training run")
  checkpointer = Checkpointer(workdir, every=1)
  steps = checkpointer.all_steps()
  if not steps:
    raise UserError(f"{workdir}/checkpoints holds no complete checkpoint yet; train first")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint of step {step} in {workdir}; available: "
                    f"{', '.join(map(str, steps))}")
  config = checkpointer.restore_config(step)
  params = checkpointer.restore_params(step)
  checkpointer.close()
  if config["model"]["pretrained"]:
    # The run's UNet config: model.unet_init's when it replaced the pipeline's UNet.
    pipe = pipeline_lib.load_pipeline(config["model"]["pretrained"],
                                      variant=config["model"].get("variant"),
                                      revision=config["model"].get("revision"),
                                      unet_init=config["model"].get("unet_init"))
    pipeline_lib.export_pipeline(pipe, params, output, overwrite=overwrite)
  else:
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
      raise UserError(f"{output} exists and is not empty; choose another --output or pass "
                      "--overwrite")
    unet = unet_io.build_unet(config["model"]["unet"], where="the run's model.unet")
    unet_io.save_unet(unet, params, os.path.join(output, "unet"))
  return step


def main(argv) -> None:
  logging.set_verbosity(logging.ERROR)  # orbax narrates partial restores at WARNING.
  try:
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; options: --workdir, --output, --step")
    if not _WORKDIR.value or not _OUTPUT.value:
      raise UserError("--workdir and --output are both required")
    step = export(_WORKDIR.value, _OUTPUT.value, _STEP.value, _OVERWRITE.value)
    print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
