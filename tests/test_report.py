"""The end-of-run report's parts that need no model: the prompt order that makes the grid show
every prompt, the enlarged before/after grid, the curves from metrics.jsonl, the console's
summary, and the refusals of an `eval.report` that cannot run."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dpo_jax import default_config, report, validation
from dpo_jax.errors import UserError


def test_report_prompts_cycle_through_every_prompt():
  """Every prompt once, then again: the grid's first images show each prompt."""
  assert report.report_prompts(["a", "b"], 3) == ["a", "b", "a", "b", "a", "b"]
  assert report.report_prompts(["a", "b", "c"], 1) == ["a", "b", "c"]


def _images(count: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_small_images_are_enlarged_by_whole_pixels():
  """32 px images are enlarged ceil(96/32) = 3 times, nearest: 4 of them make a grid 2·96 + 6
  high (the gap 2·3) and 4·(96 + 6) − 6 = 402 wide; every 3×3 block holds its source pixel,
  the pretrained image above the tuned one, the gaps white."""
  reference, tuned = _images(4, 32, seed=0), _images(4, 32, seed=1)
  grid = report.before_after_grid(reference, tuned)
  assert grid.shape == (2 * 96 + 6, 4 * (96 + 6) - 6, 3) and grid.dtype == np.uint8
  # One block by hand: reference image 2's pixel (row 5, column 7).
  left = 2 * (96 + 6)
  assert (grid[15:18, left + 21:left + 24] == reference[2, 5, 7]).all()
  assert (grid[102 + 15:102 + 18, left + 21:left + 24] == tuned[2, 5, 7]).all()
  for i in range(4):  # Each of the 9 pixels of every block is the source pixel.
    left = i * 102
    for dy in range(3):
      for dx in range(3):
        np.testing.assert_array_equal(grid[dy:96:3, left + dx:left + 96:3], reference[i])
        np.testing.assert_array_equal(grid[102 + dy::3, left + dx:left + 96:3], tuned[i])
  assert (grid[96:102] == 255).all()  # Between the rows.
  for i in range(3):  # Between the columns.
    assert (grid[:, i * 102 + 96:(i + 1) * 102] == 255).all()


@pytest.mark.parametrize("size, scale", [(96, 1), (128, 1), (48, 2), (40, 3)])
def test_enlargement_is_the_smallest_that_reaches_96_pixels(size, scale):
  """Images already ≥ 96 px are shown as they are (gap 2); smaller ones by ceil(96/size)."""
  reference, tuned = _images(2, size, seed=2), _images(2, size, seed=3)
  grid = report.before_after_grid(reference, tuned)
  shown, gap = size * scale, 2 * scale
  assert grid.shape == (2 * shown + gap, 2 * (shown + gap) - gap, 3)
  np.testing.assert_array_equal(grid[:shown:scale, :shown:scale], reference[0])
  np.testing.assert_array_equal(grid[shown + gap::scale, shown + gap::scale], tuned[1])


def test_grid_shows_at_most_twelve_columns():
  grid = report.before_after_grid(_images(13, 96, seed=4), _images(13, 96, seed=5))
  assert grid.shape == (2 * 96 + 2, 12 * 98 - 2, 3)


def _write_metrics(path) -> None:
  records = [
      {"step": 1, "loss": 0.6931, "implicit_acc": 0.5, "reward_margin": 0.0, "lr": 1e-4,
       "pairs_per_sec": 3.5},
      {"step": 2, "loss": 0.69, "implicit_acc": 0.625, "reward_margin": 0.002, "lr": 1e-4,
       "pairs_per_sec": 3.6},
      {"step": 2, "eval/implicit_acc": 0.9, "eval/mean_margin": 0.5, "eval/centred_median": 0.8},
      {"step": 3, "loss": 0.65, "implicit_acc": 0.75, "reward_margin": 0.01, "lr": 1e-4,
       "pairs_per_sec": 3.7},
      {"step": 4, "loss": 0.4, "lr": 1e-4},  # dpo.loss='sft' logs no accuracy.
  ]
  with open(path, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)


def test_read_curves_keeps_the_training_points_in_order(tmp_path):
  """The training records' loss, implicit_acc and reward_margin at their steps; the `eval/...`
  record at step 2 adds nothing; a record without a key adds no point to its curve."""
  _write_metrics(tmp_path / "metrics.jsonl")
  curves = report.read_curves(str(tmp_path / "metrics.jsonl"))
  assert curves == {"loss": [(1, 0.6931), (2, 0.69), (3, 0.65), (4, 0.4)],
                    "implicit_acc": [(1, 0.5), (2, 0.625), (3, 0.75)],
                    "reward_margin": [(1, 0.0), (2, 0.002), (3, 0.01)]}


def test_plot_curves_writes_a_png(tmp_path):
  _write_metrics(tmp_path / "metrics.jsonl")
  path = str(tmp_path / report.CURVES)
  report.plot_curves(report.read_curves(str(tmp_path / "metrics.jsonl")), path)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width > 0 and image.height > 0
  # No points yet (a run stopped before its first log): still a picture, three empty axes.
  empty = str(tmp_path / "empty.png")
  report.plot_curves({"loss": [], "implicit_acc": [], "reward_margin": []}, empty)
  with Image.open(empty) as image:
    assert image.format == "PNG"


def test_curve_titles_name_the_runs_loss_and_its_start_only_where_it_is_constant(tmp_path):
  titles = report.curve_titles("dpo")
  assert titles["loss"] == ("DPO loss (ln 2 at the start)", pytest.approx(0.6931472))
  assert report.curve_titles("hinge")["loss"] == ("hinge loss (1 at the start)", 1.0)
  for name, shown in (("mapo", "MaPO"), ("kto", "KTO"), ("ipo", "IPO"), ("sft", "SFT")):
    assert report.curve_titles(name)["loss"] == (f"{shown} loss", None)
    assert report.curve_titles(name)["implicit_acc"] == titles["implicit_acc"]
  path = str(tmp_path / "mapo.png")  # A loss with no start line still plots.
  report.plot_curves({"loss": [(1, 2.0), (2, 1.5)], "implicit_acc": [], "reward_margin": []},
                     path, loss_name="mapo")
  assert Image.open(path).size[0] > 0


def test_summary_lines(tmp_path):
  """Three lines: the win rate and its interval to 3 decimals over the images, the held-out
  accuracy (n/a without eval.pairs), and where the pictures and numbers are."""
  workdir = str(tmp_path / "run")
  result = {"judge": "centred", "win_rate": 0.71234, "win_rate_ci95": [0.6, 0.8049],
            "images": 216, "prompts": 9, "implicit_acc": 0.6789}
  lines = report.summary_lines(result, workdir)
  assert len(lines) == 3
  assert lines[0] == ("tuned vs pretrained, judged by centred: win rate 0.712 (95% interval "
                      "0.600..0.805) over 216 images of 9 prompts (eval.prompts)")
  assert lines[1] == "held-out implicit reward accuracy: 0.679"
  assert os.path.join(workdir, "samples_before_after.png") in lines[2]
  assert os.path.join(workdir, "curves.png") in lines[2]
  assert os.path.join(workdir, "report.json") in lines[2]
  for missing in ({**result, "implicit_acc": None},
                  {k: v for k, v in result.items() if k != "implicit_acc"}):
    assert "n/a" in report.summary_lines(missing, workdir)[1]


def _report_config():
  config = default_config.get_config()
  config.eval.report = True
  config.eval.prompts = "/prompts/heldout.txt"
  config.eval.scorers = "centred"
  config.model.pretrained = "/models/base"
  return config


def test_validation_accepts_a_complete_report_config():
  validation.check(_report_config())
  config = _report_config()
  config.eval.report = False
  config.eval.prompts = config.eval.scorers = config.model.pretrained = None
  validation.check(config)  # No report: nothing to refuse.


@pytest.mark.parametrize("key, value, words", [
    ("prompts", None, "eval.prompts"),
    ("scorers", None, "eval.scorers"),
    ("scorers", " ; ", "eval.scorers"),
    ("pretrained", None, "model.pretrained"),
    ("report_images_per_prompt", 0, "eval.report_images_per_prompt"),
])
def test_validation_refuses_a_report_that_cannot_run(key, value, words):
  config = _report_config()
  (config.model if key == "pretrained" else config.eval)[key] = value
  with pytest.raises(UserError, match=words.replace(".", r"\.")) as error:
    validation.check(config)
  assert "\n" not in str(error.value)


def test_running_median_follows_the_trend_and_ignores_one_outlier():
  """Hand-computed: medians of [1], [1, 2], [1, 2, 30], [2, 30, 4], [30, 4, 5], [4, 5, 6]."""
  np.testing.assert_array_equal(report.running_median([1, 2, 30, 4, 5, 6], window=3),
                                [1, 1.5, 2, 4, 5, 5])
