"""Held-out implicit reward accuracy (Table 2's protocol): ½ for a policy equal to its
reference, independent of batch size and device count; win rates; the command line."""
import json

import jax
import numpy as np
import pytest

import subprocesses
import tiny_config
import tiny_data
import tiny_models
from dpo_jax import compare, evaluate, loss, scorers, train
from dpo_jax.errors import UserError
from dpo_jax.models import pipeline as pipeline_lib
from test_scorers import make_scorer_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  folder = tmp_path_factory.mktemp("eval")
  # The two-level UNet: nothing here needs a third level, and it compiles in half the time.
  tiny_models.make_pipeline("sd", small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "heldout.parquet"), pairs=6, seed=3)
  run_config = tiny_config.get_config()
  run_config.model.pretrained = str(folder / "pipeline")
  config = evaluate.eval_config(run_config.to_dict(), str(folder / "heldout.parquet"))
  return config, pipeline_lib.load_pipeline(str(folder / "pipeline"))


def test_policy_equal_to_its_reference_scores_one_half(setup):
  config, pipe = setup
  result = evaluate.implicit_accuracy(config, pipe, pipe.unet_params, draws=2,
                                      devices=jax.devices()[:1], batch_pairs=4)
  assert result == {**result, "implicit_acc": 0.5, "pairs": 6, "draws": 2, "ties": 6,
                    "mean_margin": 0.0}


def test_result_does_not_depend_on_batch_size_or_devices(setup):
  config, pipe = setup
  policy = jax.tree_util.tree_map(lambda p: p * 1.05, pipe.unet_params)
  one = evaluate.implicit_accuracy(config, pipe, policy, draws=3, batch_pairs=2,
                                   devices=jax.devices()[:1])
  eight = evaluate.implicit_accuracy(config, pipe, policy, draws=3, batch_pairs=8)
  assert one["implicit_acc"] == eight["implicit_acc"] and one["ties"] == eight["ties"] == 0
  # Margins are differences of errors of order 1: float32 sums over another batch layout
  # move them by ~1e-7.
  np.testing.assert_allclose(one["mean_margin"], eight["mean_margin"], rtol=0, atol=1e-6)
  # Another draw seed draws other (t, ε): the margins change.
  other = evaluate.implicit_accuracy(config, pipe, policy, draws=3, batch_pairs=8, seed=1)
  assert other["mean_margin"] != eight["mean_margin"]


def test_accuracy_counts_ties_as_half():
  assert float(loss.implicit_accuracy(np.array([1.0, -2.0, 0.0, 3.0]))) == 0.625
  np.testing.assert_allclose(
      loss.implicit_margins(np.array([1.0, 4.0, 2.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0])),
      [-(1.0 - 2.0), -(4.0 - 1.0)])  # Winners [1, 4], losers [2, 1], reference all 1.


def test_pairs_format_and_command_line_errors(tmp_path):
  with pytest.raises(UserError, match="parquet"):
    evaluate.eval_config(tiny_config.get_config().to_dict(), "pairs.csv")
  done = subprocesses.run_module("dpo_jax.evaluate", f"--workdir={tmp_path}", timeout=120)
  assert done.returncode == 2 and "one of --pairs or --prompts" in done.stderr
  done = subprocesses.run_module("dpo_jax.evaluate", f"--workdir={tmp_path}",
                                 "--pairs=x.parquet", timeout=120)
  assert done.returncode == 2 and "holds no checkpoints" in done.stderr


def test_win_rate_and_its_interval_by_hand():
  rate, (low, high) = compare.win_rate(np.array([3.0, 1, 2, 2]), np.array([1.0, 2, 2, 0]))
  assert rate == 0.625  # Wins 1, 0, ½ (a tie), 1.
  assert 0 <= low < rate < high <= 1
  assert compare.win_rate(np.ones(5), np.ones(5)) == (0.5, (0.5, 0.5))
  assert compare.win_rate(np.ones(40), np.zeros(40))[1] == (1.0, 1.0)
  grid = compare.side_by_side(np.zeros((3, 4, 4, 3), np.uint8), np.ones((3, 4, 4, 3), np.uint8))
  assert grid.shape == (12, 20, 3) and grid[:4, :4].max() == 0 and grid[8:, :4].min() == 1


def test_scorer_specs():
  assert evaluate.parse_scorer("aesthetic=/m/clip,mlp=/m/a.safetensors") == (
      "aesthetic", {"folder": "/m/clip", "mlp_path": "/m/a.safetensors"})
  assert evaluate.parse_scorer("pickscore=/m/ps,processor=/m/p")[1]["processor_folder"] == "/m/p"
  for bad in ("pickscore", "clip=/m,size=3"):
    with pytest.raises(UserError, match="--scorer"):
      evaluate.parse_scorer(bad)


def test_compare_models_scores_paired_samples(setup, tmp_path):
  _, pipe = setup
  _, _, folder, _ = make_scorer_folder(tmp_path)
  scorer = scorers.load_scorer(str(folder), "clip")
  prompts = ["a cat", "a photo", "dog"]
  options = dict(steps=2, batch=2, seed=4)
  same, reference, tuned = evaluate.compare_models(pipe, pipe.unet_params, prompts,
                                                   {"clip": scorer}, **options)
  np.testing.assert_array_equal(reference, tuned)  # The same model: every prompt a tie.
  assert same["scorers"]["clip"]["win_rate"] == 0.5
  assert same["scorers"]["clip"]["win_rate_ci95"] == [0.5, 0.5]
  policy = jax.tree_util.tree_map(lambda p: p * 1.1, pipe.unet_params)
  result, reference, tuned = evaluate.compare_models(pipe, policy, prompts, {"clip": scorer},
                                                     **options)
  expected = scorer(tuned, prompts), scorer(reference, prompts)
  assert result["scorers"]["clip"]["win_rate"] == compare.wins(*expected).mean()
  assert result["scorers"]["clip"]["tuned"]["mean"] == pytest.approx(expected[0].mean(),
                                                                     abs=1e-6)
  assert (result["prompts"], result["seeds"], result["steps"]) == (3, [4, 6], 2)
  assert "| clip |" in compare.report_markdown({**result, "model": "m", "reference": "r"})


@pytest.mark.slow
def test_command_evaluates_a_run_on_prompts_and_pairs(tmp_path):
  """The command end to end on a 1-step run at lr 0 (policy = reference): eval.json with
  both parts, report.md, grid.png and the paired samples."""
  tiny_models.make_pipeline("sd", small=True).save_pretrained(tmp_path / "pipeline")
  tiny_data.write_warm_vs_cool(str(tmp_path / "pairs.parquet"), pairs=4, seed=0)
  (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
  _, _, scorer, _ = make_scorer_folder(tmp_path / "scorer")
  config = tiny_config.get_config()
  config.model.pretrained = str(tmp_path / "pipeline")
  config.data.train_files = str(tmp_path / "pairs.parquet")
  config.train.steps, config.optim.peak_lr = 1, 0.0
  train.train(config, str(tmp_path / "run"), jax.devices()[:1])
  done = subprocesses.run_module(
      "dpo_jax.evaluate", f"--workdir={tmp_path / 'run'}", f"--pairs={tmp_path}/pairs.parquet",
      f"--prompts={tmp_path / 'prompts.txt'}", f"--scorer=clip={scorer}", "--steps=2",
      "--draws=2", f"--output={tmp_path / 'eval' / 'eval.json'}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert (result["implicit_acc"], result["pairs"], result["step"]) == (0.5, 4, 1)
  assert result["scorers"]["clip"]["win_rate"] == 0.5 and result["prompts"] == 2
  assert "| clip |" in (tmp_path / "eval" / "report.md").read_text()
  assert (tmp_path / "eval" / "grid.png").exists()
  assert len(list((tmp_path / "eval" / "samples" / "tuned").glob("*.png"))) == 2
