"""Held-out implicit reward accuracy (Table 2's protocol): ½ for a policy equal to its
reference, independent of batch size and device count, and the command line."""
import jax
import numpy as np
import pytest

import subprocesses
import tiny_config
import tiny_data
import tiny_models
from dpo_jax import evaluate, loss
from dpo_jax.errors import UserError
from dpo_jax.models import pipeline as pipeline_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  folder = tmp_path_factory.mktemp("eval")
  tiny_models.make_pipeline("sd").save_pretrained(folder / "pipeline")
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
  assert done.returncode == 2 and "--pairs are both required" in done.stderr
  done = subprocesses.run_module("dpo_jax.evaluate", f"--workdir={tmp_path}",
                                 "--pairs=x.parquet", timeout=120)
  assert done.returncode == 2 and "holds no checkpoints" in done.stderr
