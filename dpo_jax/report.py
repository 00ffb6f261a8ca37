"""The end-of-run report (`eval.report`, or `python -m dpo_jax.evaluate --workdir DIR
--report`): did training make the model better by its judge?

Writes into the run's folder:
- report.json: `win_rate` of the tuned model against the pretrained one (same prompts, same
  seeds: every eval.prompts prompt drawn eval.report_images_per_prompt times), judged by the
  first of eval.scorers, with `win_rate_ci95` (a bootstrap over the images) and every
  scorer's summary; `implicit_acc` on the held-out eval.pairs; the step.
- report.md: the same as a table.
- samples_before_after.png: the first images, pretrained above, tuned below (small images
  enlarged so a person can see them).
- curves.png: training loss, implicit accuracy and reward margin over the steps
  (metrics.jsonl: each point one step's batch, the bold line their running median; dashed:
  the values at the start, where the policy equals the reference).
"""
import json
import math
import os

import numpy as np

REPORT = "report.json"
BEFORE_AFTER = "samples_before_after.png"
CURVES = "curves.png"
_GRID_COLUMNS = 12
_MIN_SHOWN_PIXELS = 96  # Images smaller than this are enlarged (nearest) in the grid.
_SMOOTHING = 5  # Logged points per running mean in curves.png.


def report_prompts(prompts, images_per_prompt: int) -> list[str]:
  """Every prompt once, then every prompt again, ...: the first len(prompts) images (the
  grid's) show each prompt, and image i has seed eval.seed + i."""
  return [prompt for _ in range(images_per_prompt) for prompt in prompts]


def before_after_grid(reference: np.ndarray, tuned: np.ndarray,
                      columns: int = _GRID_COLUMNS) -> np.ndarray:
  """`compare.side_by_side` of the first `columns` images, enlarged when they are small."""
  from dpo_jax import compare
  size = reference.shape[1]
  scale = max(1, -(-_MIN_SHOWN_PIXELS // size))
  enlarge = lambda images: np.repeat(np.repeat(images[:columns], scale, 1), scale, 2)
  return compare.side_by_side(enlarge(reference), enlarge(tuned), columns=columns,
                              gap=2 * scale)


def read_curves(metrics_path: str) -> dict[str, list[tuple[int, float]]]:
  """{'loss' | 'implicit_acc' | 'reward_margin': [(step, value), ...]} of the training
  records of metrics.jsonl (validation records, `eval/...`, are left out)."""
  curves = {"loss": {}, "implicit_acc": {}, "reward_margin": {}}
  with open(metrics_path) as f:
    for line in f:
      record = json.loads(line)
      for key, points in curves.items():
        if record.get(key) is not None:  # None: a skipped step's non-finite value.
          # A resumed run logs again from its checkpoint: the newer record of a step wins.
          points[record["step"]] = record[key]
  return {key: sorted(points.items()) for key, points in curves.items()}


def running_median(values, window: int = _SMOOTHING) -> np.ndarray:
  """Median of each value and the up to `window` - 1 before it (a median, so that one
  batch's outlier does not bend the line)."""
  values = np.asarray(values, np.float64)
  return np.array([np.median(values[max(0, i + 1 - window):i + 1])
                   for i in range(len(values))])


# The loss at step 1, where the policy is the reference, for the losses whose start is a
# constant: DPO's −log σ(0) and the hinge's max(0, 1 − 0). (IPO's, MaPO's and SFT's depend
# on β or the data; KTO's on its λs.)
_START_LOSS = {"dpo": math.log(2), "hinge": 1.0}
_LOSS_NAMES = {"dpo": "DPO", "sft": "SFT", "hinge": "hinge", "ipo": "IPO", "mapo": "MaPO",
               "kto": "KTO"}


def curve_titles(loss_name: str) -> dict[str, tuple[str, float | None]]:
  """{curve: (title, its value at step 1 or None)} for a run of `dpo.loss` = loss_name."""
  start = _START_LOSS.get(loss_name)
  loss_title = f"{_LOSS_NAMES.get(loss_name, loss_name)} loss"
  if start is not None:
    loss_title += f" ({'ln 2' if loss_name == 'dpo' else f'{start:g}'} at the start)"
  return {"loss": (loss_title, start), "implicit_acc": ("implicit reward accuracy", 0.5),
          "reward_margin": ("implicit reward margin", 0.0)}


def plot_curves(curves: dict, path: str, loss_name: str = "dpo") -> None:
  import matplotlib
  matplotlib.use("Agg")  # No display needed.
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for axis, (key, (title, start)) in zip(axes, curve_titles(loss_name).items()):
    if start is not None:
      axis.axhline(start, color="grey", linewidth=0.8, linestyle="--")
    if curves[key]:
      steps, values = zip(*curves[key])
      # Each logged value is one step's batch: noisy. The bold line is a running median.
      axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
      smoothed = running_median(values)
      axis.plot(steps, smoothed, color="tab:blue", linewidth=2)
      if key == "loss":  # A single batch's loss can be 20× the rest: keep the line readable.
        axis.set_ylim(0, max(1.0, 1.5 * float(smoothed.max())))
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def write_report(config, pipe, policy_params, reference_params, workdir: str, *,
                 step: int) -> dict:
  """Samples, judges and writes the report (module doc) for `policy_params` at `step`;
  `pipe`'s own UNet is the pretrained model. Returns report.json's content."""
  from PIL import Image

  from dpo_jax import compare, evaluate, validation
  from dpo_jax.data import prompts as prompts_lib
  options = config.eval
  scorers = evaluate.load_scorers(validation.scorer_specs(options.scorers))
  judge = next(iter(scorers))
  prompts = prompts_lib.read_prompts(options.prompts)
  result, reference, tuned = evaluate.compare_models(
      pipe, policy_params, report_prompts(prompts, options.report_images_per_prompt), scorers,
      seed=options.seed, steps=options.sample_steps, guidance_scale=options.guidance,
      batch=options.report_batch, resolution=config.data.resolution)
  report = {"step": step, "judge": judge, "win_rate": result["scorers"][judge]["win_rate"],
            "win_rate_ci95": result["scorers"][judge]["win_rate_ci95"],
            "prompts": len(prompts), "images": result["prompts"],
            "images_per_prompt": options.report_images_per_prompt, "seeds": result["seeds"],
            "steps": result["steps"], "guidance": result["guidance"],
            "scorers": result["scorers"], "implicit_acc": None}
  if options.pairs:
    held_out = evaluate.HeldOutPairs(evaluate.eval_config(config.to_dict(), options.pairs),
                                     pipe, draws=options.draws, seed=options.seed)
    report.update({**held_out(policy_params, reference_params), "pairs_file": options.pairs})
  report.update(model=f"{workdir} step {step}", reference=config.model.pretrained)
  with open(os.path.join(workdir, REPORT), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    # The table counts images: each of the prompts drawn images_per_prompt times.
    shown = {k: v for k, v in report.items() if v is not None}  # No accuracy, no line.
    markdown = compare.report_markdown({**shown, "prompts": report["images"]})
    f.write(markdown.replace("(grid.png)", f"({BEFORE_AFTER})"))
  Image.fromarray(before_after_grid(reference, tuned)).save(os.path.join(workdir, BEFORE_AFTER))
  plot_curves(read_curves(os.path.join(workdir, "metrics.jsonl")),
              os.path.join(workdir, CURVES), loss_name=config.dpo.loss)
  return report


def summary_lines(report: dict, workdir: str) -> list[str]:
  """The console's last three lines."""
  low, high = report["win_rate_ci95"]
  accuracy = report.get("implicit_acc")
  return [f"tuned vs pretrained, judged by {report['judge']}: win rate "
          f"{report['win_rate']:.3f} (95% interval {low:.3f}..{high:.3f}) over "
          f"{report['images']} images of {report['prompts']} prompts (eval.prompts)",
          "held-out implicit reward accuracy: " + (f"{accuracy:.3f}" if accuracy is not None
                                                    else "n/a (no eval.pairs)"),
          f"pictures: {os.path.join(workdir, BEFORE_AFTER)} (pretrained above, tuned below) "
          f"and {os.path.join(workdir, CURVES)}; numbers in {os.path.join(workdir, REPORT)}"]
