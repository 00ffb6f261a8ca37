"""Tuned against reference on the same prompts and seeds: win rates with a bootstrap
interval, score summaries, a side-by-side grid and a short markdown report. Pure functions
over scores and images."""
import numpy as np


def wins(tuned: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per prompt: 1 when the tuned image scores higher, 0 lower, ½ on a tie."""
  tuned, reference = np.asarray(tuned, np.float64), np.asarray(reference, np.float64)
  return np.where(tuned == reference, 0.5, (tuned > reference).astype(np.float64))


def win_rate(tuned: np.ndarray, reference: np.ndarray, *, resamples: int = 2000,
             seed: int = 0) -> tuple[float, tuple[float, float]]:
  """(win rate, its 95% interval): the percentile bootstrap over prompts, seeded."""
  per_prompt = wins(tuned, reference)
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(per_prompt), (resamples, len(per_prompt)))
  means = per_prompt[draws].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return float(per_prompt.mean()), (float(low), float(high))


def summary(scores: np.ndarray) -> dict:
  scores = np.asarray(scores, np.float64)
  return {"median": float(np.median(scores)), "mean": float(scores.mean())}


def side_by_side(reference: np.ndarray, tuned: np.ndarray, columns: int = 8,
                 gap: int = 4) -> np.ndarray:
  """uint8 [2H + gap, C·(W + gap) − gap, 3]: the first `columns` reference images above the
  tuned images of the same prompts and seeds."""
  reference, tuned = np.asarray(reference)[:columns], np.asarray(tuned)[:columns]
  count, height, width, _ = reference.shape
  grid = np.full((2 * height + gap, count * (width + gap) - gap, 3), 255, np.uint8)
  for i in range(count):
    left = i * (width + gap)
    grid[:height, left:left + width] = reference[i]
    grid[height + gap:, left:left + width] = tuned[i]
  return grid


def report_markdown(result: dict) -> str:
  """A short report of `evaluate`'s result: one table row per scorer."""
  lines = [f"# {result['model']} against {result['reference']}", "",
           f"{result['prompts']} prompts, seeds {result['seeds'][0]}..{result['seeds'][1]}, "
           f"{result['steps']} DDIM steps, guidance {result['guidance']}.", "",
           "| scorer | tuned median | reference median | tuned mean | reference mean | "
           "win rate | 95% interval |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, s in result["scorers"].items():
    lines.append(f"| {name} | {s['tuned']['median']:.4f} | {s['reference']['median']:.4f} | "
                 f"{s['tuned']['mean']:.4f} | {s['reference']['mean']:.4f} | "
                 f"{s['win_rate']:.3f} | [{s['win_rate_ci95'][0]:.3f}, "
                 f"{s['win_rate_ci95'][1]:.3f}] |")
  if "implicit_acc" in result:
    lines += ["", f"Held-out implicit reward accuracy: {result['implicit_acc']:.3f} "
              f"({result['pairs']} pairs, {result['draws']} draws each)."]
  lines += ["", "![reference above, tuned below](grid.png)", ""]
  return "\n".join(lines)
