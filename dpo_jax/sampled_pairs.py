"""`data.format = 'sampled'`: preference pairs drawn from the model itself and judged by a
scorer (AI feedback on the model's own samples, the paper's §5.4 with on-policy images).

Before training, each prompt of `data.sampled.prompts` is drawn `pairs_per_prompt` times as
two images with their own seeds (DDIM, classifier-free guidance), and `data.sampled.judge`
(an `evaluate --scorer` spec: a model scorer or a rule such as 'centred') labels each pair
through `label.label_pairs`: WORKDIR/pairs/part-*.parquet in Pick-a-Pic's schema, with both
scores kept. Held-out pairs of `data.sampled.heldout_prompts`, if set, go to
WORKDIR/pairs_heldout/ and become `eval.pairs` unless that is set. Training then reads the
parquet parts as any Pick-a-Pic data; the run's saved config says so, and a resumed run finds
the pairs made (a `done.json` beside the parts) and does not draw them again.
"""
import io
import json
import os

import ml_collections
import numpy as np

from dpo_jax.errors import UserError

DONE = "done.json"


def check(config: ml_collections.ConfigDict) -> None:
  """One-line refusals before anything loads."""
  options = config.data.sampled
  if not options.prompts:
    raise UserError("data.format='sampled' draws pairs for data.sampled.prompts: set it to a "
                    "prompts file")
  if not options.judge:
    raise UserError("data.format='sampled' needs data.sampled.judge, a scorer that picks each "
                    "pair's winner (e.g. 'centred', or 'pickscore=FOLDER,processor=FOLDER')")
  if not config.model.pretrained:
    raise UserError("data.format='sampled' draws the pairs from model.pretrained: set it")
  for key in ("pairs_per_prompt", "heldout_pairs_per_prompt", "steps", "batch"):
    if options[key] < 1:
      raise UserError(f"data.sampled.{key} must be >= 1, got {options[key]}")


class _ImagePairs:
  """A `PairSource`-shaped list of sampled pairs (PNG bytes), what `label_pairs` reads."""

  def __init__(self, prompts, first, second):
    self._records = [{"caption": p, "winner": _png(a), "loser": _png(b), "pair_ids": i}
                     for i, (p, a, b) in enumerate(zip(prompts, first, second, strict=True))]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._records[index]


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


def draw_pairs(generate, prompts, judge, output: str, *, pairs_per_prompt: int,
               seed: int, judge_batch: int = 64) -> dict:
  """Draws and judges `pairs_per_prompt` pairs per prompt into `output` (see the module doc);
  pair i's images use seeds seed + 2i and seed + 2i + 1; the judge scores `judge_batch`
  images per call. Returns label_pairs' counts."""
  from dpo_jax import label
  repeated = [prompt for _ in range(pairs_per_prompt) for prompt in prompts]
  seeds = seed + 2 * np.arange(len(repeated))
  first = generate(repeated, seeds)
  second = generate(repeated, seeds + 1)
  counts = label.label_pairs(judge, _ImagePairs(repeated, first, second), output,
                             batch=min(judge_batch, len(repeated)))
  with open(os.path.join(output, DONE), "w") as f:
    json.dump({**counts, "prompts": len(prompts), "pairs_per_prompt": pairs_per_prompt,
               "seed": seed}, f)
  return counts


def _print(text: str) -> None:
  print(text, flush=True)


def prepare(config: ml_collections.ConfigDict, pipe, workdir: str,
            log=_print) -> ml_collections.ConfigDict:
  """Draws the pairs (once: a resumed run finds them) and returns the config that reads
  them: data.format='pickapic' on WORKDIR/pairs, eval.pairs on WORKDIR/pairs_heldout."""
  import jax
  from jax.experimental import multihost_utils

  from dpo_jax import evaluate, sample
  from dpo_jax.data import prompts as prompts_lib
  check(config)
  options = config.data.sampled
  seed = config.train.seed if options.seed is None else options.seed
  jobs = [("pairs", options.prompts, options.pairs_per_prompt, seed)]
  if options.heldout_prompts:
    # Seeds far from the training pairs': no held-out image repeats a training one.
    jobs.append(("pairs_heldout", options.heldout_prompts, options.heldout_pairs_per_prompt,
                 seed + 10_000_000))
  todo = [job for job in jobs if not os.path.exists(os.path.join(workdir, job[0], DONE))]
  if todo and jax.process_index() == 0:  # One writer; the others wait at the barrier below.
    log(f"drawing preference pairs from {config.model.pretrained} (once for this workdir)")
    (kind, judge), = evaluate.load_scorers([options.judge]).items()
    generate = sample.make_generator(pipe, pipe.unet_params, steps=options.steps,
                                     guidance_scale=options.guidance,
                                     resolution=config.data.resolution, batch=options.batch)
    for folder, prompts_file, per_prompt, job_seed in todo:
      prompts = prompts_lib.read_prompts(prompts_file)
      counts = draw_pairs(generate, prompts, judge, os.path.join(workdir, folder),
                          pairs_per_prompt=per_prompt, seed=job_seed,
                          judge_batch=options.batch)
      log(f"{folder}: {counts['written']} pairs of {len(prompts)} prompts drawn from "
          f"{config.model.pretrained} and judged by {kind}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sampled pairs written")
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.format = "pickapic"
  config.data.train_files = os.path.join(workdir, "pairs", "*.parquet")
  if options.heldout_prompts and not config.eval.pairs:
    config.eval.pairs = os.path.join(workdir, "pairs_heldout", "*.parquet")
  return config
