"""In-training validation every `eval.every` steps: held-out implicit accuracy on
`eval.pairs`, a fixed-prompt sample grid of `eval.prompts` (reference above, policy below),
and, with `eval.scorers`, each scorer's median on the policy's samples and its win rate
against the reference's (same prompts, same seeds). Results go to metrics.jsonl and
TensorBoard as `eval/...`, grids to WORKDIR/eval/step_N.png.

Runs on process 0's local devices from host copies of the params (every host joins the
gather, then goes on to the next step while process 0 evaluates).
"""
import os

import ml_collections
import numpy as np

from dpo_jax.errors import UserError


def scorer_specs(text: str | None) -> list[str]:
  """`eval.scorers`: `evaluate --scorer` specs separated by ';'."""
  return [spec.strip() for spec in (text or "").split(";") if spec.strip()]


def check(config: ml_collections.ConfigDict) -> None:
  """One-line refusals of an `eval.*` setting that cannot run, before anything loads."""
  if config.eval.every < 0:
    raise UserError(f"eval.every must be >= 0 (0: no validation), got {config.eval.every}")
  if config.eval.report:
    if not (config.eval.prompts and scorer_specs(config.eval.scorers)):
      raise UserError("eval.report judges samples of eval.prompts: set eval.prompts and "
                      "eval.scorers (the first one judges the win rate)")
    if not config.model.pretrained:
      raise UserError("eval.report compares the tuned model with model.pretrained: set it, "
                      "or eval.report=False")
    if config.eval.report_images_per_prompt < 1:
      raise UserError("eval.report_images_per_prompt must be >= 1, got "
                      f"{config.eval.report_images_per_prompt}")
  if not config.eval.every:
    return
  if not (config.eval.pairs or config.eval.prompts):
    raise UserError("eval.every is set but there is nothing to validate on: set eval.pairs "
                    "(held-out pairs) and/or eval.prompts (a prompts file)")
  if not config.model.pretrained:
    raise UserError("validation samples and scores with the pipeline's VAE and text encoders: "
                    "set model.pretrained, or eval.every=0")
  if scorer_specs(config.eval.scorers) and not config.eval.prompts:
    raise UserError("eval.scorers judge samples of eval.prompts: set eval.prompts too")


class Validation:
  """Built once per run (compiles on first use); `run(step, params, reference) -> metrics`."""

  def __init__(self, config: ml_collections.ConfigDict, pipe, workdir: str):
    from dpo_jax import evaluate, sample
    from dpo_jax.data import prompts as prompts_lib

    self._folder = os.path.join(workdir, "eval")
    self.pretrained_params = pipe.unet_params  # The UNet training started from.
    options = config.eval
    self._held_out = None
    if options.pairs:
      self._held_out = evaluate.HeldOutPairs(evaluate.eval_config(config.to_dict(),
                                                                  options.pairs),
                                             pipe, draws=options.draws, seed=options.seed)
    self._prompts = []
    if options.prompts:
      self._prompts = prompts_lib.read_prompts(options.prompts)[:options.prompts_limit]
      self._seeds = [options.seed + i for i in range(len(self._prompts))]
      self._generate = sample.make_generator(pipe, pipe.unet_params, steps=options.sample_steps,
                                             guidance_scale=options.guidance,
                                             resolution=config.data.resolution,
                                             batch=len(self._prompts))
    self._scorers = evaluate.load_scorers(scorer_specs(options.scorers))
    self._reference_images = self._reference_scores = None

  def run(self, step: int, params, reference_params) -> tuple[dict, np.ndarray | None]:
    """(`eval/...` metrics, the grid image or None) for the policy `params` at `step`."""
    from PIL import Image

    from dpo_jax import compare
    metrics = {}
    if self._held_out:
      result = self._held_out(params, reference_params)
      metrics.update({"eval/implicit_acc": result["implicit_acc"],
                      "eval/mean_margin": result["mean_margin"]})
    grid = None
    if self._prompts:
      if self._reference_images is None:  # The reference never changes: sampled once.
        self._reference_images = self._generate(self._prompts, self._seeds,
                                                unet_params=reference_params)
        self._reference_scores = {name: scorer(self._reference_images, self._prompts)
                                  for name, scorer in self._scorers.items()}
      images = self._generate(self._prompts, self._seeds, unet_params=params)
      for name, scorer in self._scorers.items():
        scores = scorer(images, self._prompts)
        metrics[f"eval/{name}_median"] = float(np.median(scores))
        metrics[f"eval/{name}_win_rate"] = float(
            compare.wins(scores, self._reference_scores[name]).mean())
      grid = compare.side_by_side(self._reference_images, images)
      os.makedirs(self._folder, exist_ok=True)
      Image.fromarray(grid).save(os.path.join(self._folder, f"step_{step:06d}.png"))
    return metrics, grid
