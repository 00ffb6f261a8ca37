"""`python -m dpo_jax.evaluate --workdir DIR [--step N] [--pairs FILE] [--prompts FILE
--scorer KIND=FOLDER ...] --output eval.json`: a run's policy against its reference.

`--pairs`: held-out implicit reward accuracy.
`--prompts`: images of the tuned and the reference model with paired seeds, scored by each
`--scorer`; per model the median and mean score, the tuned-vs-reference win rate with a 95%
bootstrap interval over prompts; beside eval.json: samples/, grid.png (reference above,
tuned below) and report.md.

The paper's Table-2 protocol: for each held-out pair, the DPO inside term
−((L_w − L_l)_policy − (L_w − L_l)_ref) is averaged over K draws of (t, ε) (`--draws`, 8 by
default); the pair counts as right when that average is > 0, ½ on a tie (a policy equal to
its reference scores exactly ½). Draw k of pair p uses the key (seed, k, pair id), so the
result does not depend on the batch size or the device count. β only scales the term, so
the accuracy does not depend on it.

Pairs come in any training format (`--pairs` a Pick-a-Pic parquet, a JSONL, or a glob),
prepared deterministically: centre crop, no flip, every caption kept.
"""
import json
import os

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError


def data_format(path: str) -> str:
  """'pickapic' or 'jsonl', by the (first) file's suffix."""
  suffix = os.path.splitext(path.split(",")[0])[1].lower()
  formats = {".parquet": "pickapic", ".jsonl": "jsonl"}
  if suffix not in formats:
    raise UserError(f"pairs {path}: give Pick-a-Pic .parquet files (a glob or a comma-"
                    'separated list) or a .jsonl of {"prompt", "chosen", "rejected"} lines')
  return formats[suffix]


def eval_config(run_config: dict, pairs: str):
  """The run's config, reading `pairs` deterministically (no crop jitter, flips or dropped
  prompts) in their own format."""
  import ml_collections
  config = ml_collections.ConfigDict(run_config)
  config.data.update(train_files=pairs, format=data_format(pairs), random_crop=False,
                     random_flip=False, empty_prompt_prob=0.0, cache_dir=None,
                     max_train_pairs=None, tfds_name=None)
  return config


class HeldOutPairs:
  """Held-out implicit accuracy of any policy against any reference of `pipe`'s UNet on
  `config.data.train_files` (read anew on each call), compiled once; in `config`'s compute
  dtype, on `devices` (default: this host's)."""

  def __init__(self, config, pipe, *, draws: int = 8, batch_pairs: int = 8, seed: int = 0,
               devices=None):
    import jax

    from dpo_jax import encode, loss as losses, parallel, train
    from dpo_jax.train_step import NoiseOptions, make_pair_errors

    if draws < 1:
      raise UserError(f"--draws must be >= 1, got {draws}")
    self._config, self._pipe, self.draws, self.seed = config, pipe, draws, seed
    encoders, self._frozen = encode.pipeline_encoders(pipe)
    pair_errors = make_pair_errors(
        pipe.unet, train.noise_schedule(pipe.scheduler_config, config), seed=seed,
        encoders=encoders, compute_dtype=config.model.compute_dtype,
        noise=NoiseOptions(timesteps=train.noise_options(config).timesteps),
        reference_pass=config.dpo.reference_pass, sdxl_time_ids=config.data.sdxl_time_ids)
    devices = devices or jax.local_devices()
    self._batch_pairs = -(-batch_pairs // len(devices)) * len(devices)
    self._sharding = parallel.batch_sharding(parallel.make_mesh(-1, 1, devices))
    self._replicated = jax.sharding.NamedSharding(self._sharding.mesh,
                                                  jax.sharding.PartitionSpec())

    def margins(policy, reference, frozen, batch):
      errors = pair_errors(policy, reference, encode.encoded_batch(encoders, frozen, batch))
      return losses.implicit_margins(*errors)

    replicated = self._replicated
    self._margins = jax.jit(margins, in_shardings=(replicated, replicated, replicated,
                                                   self._sharding))

  def __call__(self, policy_params, reference_params) -> dict:
    import jax

    from dpo_jax import loss as losses
    from dpo_jax.data import loader, skips

    policy, reference, frozen = jax.device_put((policy_params, reference_params, self._frozen),
                                               self._replicated)
    source = loader.make_source(self._config.data)
    batches = loader.make_prepare_iterator(self._config, source, self._pipe.tokenizers,
                                           batch_pairs=self._batch_pairs, process_index=0,
                                           process_count=1)
    totals = []
    for batch in batches:
      rows = len(batch["pair_ids"])
      padded = loader.padded(batch, self._batch_pairs)
      total = np.zeros(rows)
      for draw in range(self.draws):  # The draw index is the epoch folded into the keys.
        padded["epochs"] = np.full(self._batch_pairs, draw, np.int32)
        total += np.asarray(self._margins(policy, reference, frozen,
                                          jax.device_put(padded, self._sharding)))[:rows]
      totals.append(total / self.draws)
    counts = skips.add(batches.counts, source.skipped_at_start)
    if not totals:
      raise UserError(f"no usable pair in {self._config.data.train_files} "
                      f"({skips.describe(counts)})")
    mean_margins = np.concatenate(totals)
    return {"implicit_acc": float(losses.implicit_accuracy(mean_margins)),
            "pairs": int(mean_margins.size), "draws": self.draws,
            "ties": int((mean_margins == 0).sum()), "mean_margin": float(mean_margins.mean()),
            "seed": self.seed,
            "skipped": {k: v for k, v in counts.items() if k != "kept" and v}}


def reference_params(config, pipe):
  """The reference as training holds it: `pipe`'s UNet in `model.reference_dtype`."""
  import jax
  import jax.numpy as jnp

  from dpo_jax import precision
  return precision.reference_params(
      jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), pipe.unet_params),
      config.model.reference_dtype)


def implicit_accuracy(config, pipe, policy_params, *, draws: int = 8, batch_pairs: int = 8,
                      seed: int = 0, devices=None) -> dict:
  """Held-out implicit accuracy of `policy_params` against `pipe`'s UNet (the reference, in
  `model.reference_dtype`) on `config.data.train_files`, in `config`'s compute dtype."""
  held_out = HeldOutPairs(config, pipe, draws=draws, batch_pairs=batch_pairs, seed=seed,
                          devices=devices)
  return held_out(policy_params, reference_params(config, pipe))


def _pipeline_as_trained(run_config: dict, config):
  """The run's pipeline with its UNet, VAE and text encoders in `config`'s compute dtypes,
  as training ran them."""
  import jax.numpy as jnp

  from dpo_jax import runs
  return runs.run_pipeline(
      run_config, dtype=jnp.dtype(config.model.compute_dtype),
      vae_dtype=jnp.dtype(config.model.vae_dtype),
      text_encoder_dtype=jnp.dtype(config.model.text_encoder_dtype))


def evaluate_run(workdir: str, pairs: str, *, step: int | None = None, **options) -> dict:
  """`implicit_accuracy` of the run in `workdir` at checkpoint `step` (default: newest)."""
  from dpo_jax import runs
  run = runs.load_run(workdir, step)
  config = eval_config(run.config, pairs)
  pipe = _pipeline_as_trained(run.config, config)
  return {**implicit_accuracy(config, pipe, run.params, **options), "step": run.step,
          "workdir": workdir, "pairs_file": pairs}


def parse_scorer(spec: str) -> tuple[str, dict]:
  """'KIND=FOLDER[,processor=FOLDER][,mlp=FILE]', or a rule's KIND alone (e.g. 'centred')
  -> (kind, `scorers.load_scorer` options)."""
  from dpo_jax import scorers
  kind, _, rest = spec.partition("=")
  if kind in scorers.RULE_KINDS and not rest:
    return kind, {"folder": None}
  if not rest:
    raise UserError(f"--scorer {spec!r}: write KIND=FOLDER, e.g. pickscore=/models/PickScore_v1"
                    ",processor=/models/CLIP-ViT-H-14 or aesthetic=/models/clip-vit-large-"
                    "patch14,mlp=/models/sac+logos+ava1-l14-linearMSE.safetensors")
  folder, *extras = rest.split(",")
  options = {"folder": folder}
  for extra in extras:
    key, _, value = extra.partition("=")
    if key not in ("processor", "mlp") or not value:
      raise UserError(f"--scorer {spec!r}: unknown option {extra!r}; use processor=FOLDER or "
                      "mlp=FILE")
    options["processor_folder" if key == "processor" else "mlp_path"] = value
  return kind, options


def load_scorers(specs) -> dict:
  """{kind: scorer} for `--scorer` specs (`parse_scorer`), loaded in order."""
  from dpo_jax import scorers
  loaded = {}
  for spec in specs:
    kind, options = parse_scorer(spec)
    loaded[kind] = scorers.load_scorer(options.pop("folder"), kind, **options)
  return loaded


def _score(scorer, images: np.ndarray, prompts, batch: int) -> np.ndarray:
  """Scores in fixed-size batches (the last padded), so the scorer compiles once; the
  batch is rounded up to split over the host's devices."""
  batch = -(-batch // scorer.devices) * scorer.devices
  out = []
  for start in range(0, len(images), batch):
    rows = np.minimum(np.arange(start, start + batch), len(images) - 1)
    out.append(scorer(images[rows], [prompts[i] for i in rows])[:len(images) - start])
  return np.concatenate(out)


def compare_models(pipe, policy_params, prompts, scorers: dict, *, seed: int = 0,
                   steps: int = 50, guidance_scale: float = 7.5, batch: int = 8,
                   resolution: int | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
  """Samples `prompts` from the policy and from `pipe`'s own UNet (the reference) with
  seeds seed + i, scores both with each scorer; returns (result, reference, tuned images)."""
  from dpo_jax import compare, sample
  seeds = [seed + i for i in range(len(prompts))]
  generate = sample.make_generator(pipe, pipe.unet_params, steps=steps,
                                   guidance_scale=guidance_scale, resolution=resolution,
                                   batch=batch)
  reference = generate(prompts, seeds)
  tuned = generate(prompts, seeds, unet_params=policy_params)
  result = {"prompts": len(prompts), "seeds": [seeds[0], seeds[-1]], "steps": steps,
            "guidance": guidance_scale, "scorers": {}}
  for name, scorer in scorers.items():
    tuned_scores = _score(scorer, tuned, prompts, batch)
    reference_scores = _score(scorer, reference, prompts, batch)
    rate, interval = compare.win_rate(tuned_scores, reference_scores, seed=seed)
    result["scorers"][name] = {
        "tuned": compare.summary(tuned_scores), "reference": compare.summary(reference_scores),
        "win_rate": rate, "win_rate_ci95": list(interval)}
  return result, reference, tuned


def evaluate_prompts(workdir: str, prompts_file: str, scorer_specs, output: str, *,
                     step: int | None = None, limit: int | None = None, **options) -> dict:
  """`compare_models` for the run in `workdir`; writes the samples, grid.png and report.md
  in `output`'s folder."""
  from PIL import Image

  from dpo_jax import compare, runs, sample
  from dpo_jax.data import prompts as prompts_lib
  if not scorer_specs:
    raise UserError("--prompts needs at least one --scorer KIND=FOLDER to judge the images")
  prompts = prompts_lib.read_prompts(prompts_file)[:limit]
  scorers = load_scorers(scorer_specs)
  run = runs.load_run(workdir, step)
  pipe = runs.run_pipeline(run.config)
  result, reference, tuned = compare_models(pipe, run.params, prompts, scorers, **options)
  folder = os.path.dirname(os.path.abspath(output))
  seeds = list(range(result["seeds"][0], result["seeds"][1] + 1))
  for name, images in (("reference", reference), ("tuned", tuned)):
    sample.write_images(images, prompts, seeds, os.path.join(folder, "samples", name))
  Image.fromarray(compare.side_by_side(reference, tuned)).save(os.path.join(folder, "grid.png"))
  result.update(step=run.step, workdir=workdir, prompts_file=prompts_file,
                model=f"{workdir} step {run.step}", reference=run.config["model"]["pretrained"])
  return result


def report_run(workdir: str, *, step: int | None = None, prompts: str | None = None,
               scorer_specs=(), pairs: str | None = None) -> dict:
  """`report.write_report` for the run in `workdir` at checkpoint `step` (default: newest),
  with the run's own eval.* settings; `prompts`, `scorer_specs` and `pairs` replace its
  eval.prompts, eval.scorers and eval.pairs."""
  from dpo_jax import report, runs
  run = runs.load_run(workdir, step)
  config = runs.with_defaults(run.config)
  if prompts:
    config.eval.prompts = prompts
  if scorer_specs:
    config.eval.scorers = ";".join(scorer_specs)
  if pairs:
    config.eval.pairs = pairs
  if not (config.eval.prompts and config.eval.scorers):
    raise UserError(f"--report samples eval.prompts and judges them by eval.scorers, which "
                    f"{workdir}'s config leaves unset: pass --prompts FILE and --scorer SPEC")
  pipe = _pipeline_as_trained(run.config, config)
  return report.write_report(config, pipe, run.params, reference_params(config, pipe),
                             workdir, step=run.step)


def run() -> None:
  workdir = flags.DEFINE_string("workdir", None, "The training run to evaluate.")
  step = flags.DEFINE_integer("step", None, "Its checkpoint step (default: the newest).")
  pairs = flags.DEFINE_string("pairs", None, "Held-out pairs: Pick-a-Pic parquet or JSONL.")
  prompts = flags.DEFINE_string("prompts", None, "Prompts to sample both models on "
                                "(dpo_jax/data/prompts.py formats).")
  scorer = flags.DEFINE_multi_string("scorer", [], "KIND=FOLDER[,processor=FOLDER][,mlp=FILE]; "
                                     "KIND: clip, clip_torchmetrics, pickscore, aesthetic; "
                                     "or a rule alone: centred (the demo's rater).")
  limit = flags.DEFINE_integer("limit", None, "Only the first N prompts.")
  steps = flags.DEFINE_integer("steps", 50, "DDIM steps.")
  guidance = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale.")
  output = flags.DEFINE_string("output", None, "Where to write the JSON result (the report, "
                               "grid and samples go beside it).")
  draws = flags.DEFINE_integer("draws", 8, "(t, ε) draws averaged per pair (Table 2).")
  batch_pairs = flags.DEFINE_integer("batch_pairs", 8, "Pairs per compiled batch.")
  seed = flags.DEFINE_integer("seed", 0, "Seed of the (t, ε) draws.")
  write_report = flags.DEFINE_bool(
      "report", False, "Write the run's report into --workdir (report.json, report.md, "
      "samples_before_after.png, curves.png) from its eval.* settings; --prompts, --scorer "
      "and --pairs replace them.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; run with --help for the options")
    if write_report.value:
      if not workdir.value:
        raise UserError("--report needs --workdir, the run to report on")
      from dpo_jax import report
      result = report_run(workdir.value, step=step.value, prompts=prompts.value,
                          scorer_specs=scorer.value, pairs=pairs.value)
      for line in report.summary_lines(result, workdir.value):
        print(line)
      return
    if not workdir.value or not (pairs.value or prompts.value):
      raise UserError("--workdir and one of --pairs or --prompts are required")
    if prompts.value and not output.value:
      raise UserError("--prompts writes images and a report: pass --output DIR/eval.json")
    result = {}
    if output.value:
      os.makedirs(os.path.dirname(os.path.abspath(output.value)), exist_ok=True)
    if prompts.value:
      result = evaluate_prompts(workdir.value, prompts.value, scorer.value, output.value,
                                step=step.value, limit=limit.value, seed=seed.value,
                                steps=steps.value, guidance_scale=guidance.value)
    if pairs.value:
      result.update(evaluate_run(workdir.value, pairs.value, step=step.value, draws=draws.value,
                                 batch_pairs=batch_pairs.value, seed=seed.value))
    if prompts.value:
      from dpo_jax import compare
      with open(os.path.join(os.path.dirname(os.path.abspath(output.value)), "report.md"),
                "w") as f:
        f.write(compare.report_markdown(result))
    if output.value:
      with open(output.value, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))

  cli.run(command)


if __name__ == "__main__":
  run()
