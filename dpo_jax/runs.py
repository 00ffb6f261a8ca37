"""A finished (or running) training run read back from its --workdir: the config it was
trained with and its policy params at a checkpoint step. What export, sample and evaluate
start from."""
import dataclasses
import os
from typing import Any

from dpo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Run:
  config: dict  # The run's config, as saved with the checkpoint.
  step: int
  params: Any  # The policy UNet's float32 params at `step`, on this host's first device.
  adapters: Any = None  # A LoRA run's trained adapters (`params` then merges them in).


def load_run(workdir: str, step: int | None = None) -> Run:
  """Checkpoint `step` (default: the newest) of the run in `workdir`."""
  from dpo_jax.checkpoint import Checkpointer  # JAX and orbax are slow to load.

  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir} holds no checkpoints/; pass the --workdir of a training run")
  checkpointer = Checkpointer(workdir, every=1)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"{workdir}/checkpoints holds no complete checkpoint yet; train first")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise UserError(f"no checkpoint of step {step} in {workdir}; available: "
                      f"{', '.join(map(str, steps))}")
    config = checkpointer.restore_config(step)
    trained = checkpointer.restore_params(step)
  finally:
    checkpointer.close()
  if not config.get("lora", {}).get("enabled"):
    return Run(config, step, trained)
  return Run(config, step, merged_lora_params(config, trained), adapters=trained)


def merged_lora_params(config: dict, adapters):
  """A LoRA run's policy UNet: its base (the pipeline's UNet, or the seeded random UNet a
  run without one started from) with the adapters merged in, as diffusers'
  `load_lora_weights` + `fuse_lora` would make it."""
  import jax

  from dpo_jax import lora
  from dpo_jax.models import unet as unet_lib

  if config["model"].get("pretrained"):
    base = run_pipeline(config).unet_params
  else:
    unet = unet_lib.build_unet(config["model"]["unet"], where="the run's model.unet")
    base = unet_lib.init_params(unet, jax.random.key(config["train"]["seed"]))
  settings = lora.settings(with_defaults(config))
  return jax.device_get(lora.merge(base, adapters, alpha=settings.alpha, rank=settings.rank))


def with_defaults(config: dict):
  """The run's saved config on top of today's defaults, as a ConfigDict: keys added since
  the run was saved (e.g. eval.report_batch) take their default."""
  from dpo_jax import default_config

  def merge(base: dict, saved: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(
        base.get(k), dict) else v for k, v in saved.items()}}

  import ml_collections
  return ml_collections.ConfigDict(merge(default_config.get_config().to_dict(), config))


def run_pipeline(config: dict, **options):
  """The diffusers pipeline a run trained from (its model.unet_init UNet, its model.vae):
  the reference model, whose UNet params a checkpoint's policy replaces."""
  from dpo_jax.models import pipeline as pipeline_lib

  model = config["model"]
  if not model.get("pretrained"):
    raise UserError("the run trained a random UNet without a pipeline (model.pretrained "
                    "unset): there is no VAE or text encoder to sample or evaluate with")
  return pipeline_lib.load_pipeline(model["pretrained"], variant=model.get("variant"),
                                    revision=model.get("revision"),
                                    unet_init=model.get("unet_init"), vae=model.get("vae"),
                                    **options)
