"""Gradient accumulation: k microbatches give the step the whole batch would have given."""
import json

import jax
import pytest
import numpy as np

import tiny_config
from dpo_jax import train


def _run(tmp_path, grad_accum: int):
  config = tiny_config.synthetic_config()
  config.train.steps = 2
  config.train.batch_pairs = 8
  config.train.grad_accum = grad_accum
  config.train.log_every = 1
  config.data.resolution = 32
  config.optim.peak_lr = 1e-4  # Large enough that a wrong gradient shows in the params.
  workdir = tmp_path / f"accum{grad_accum}"
  state = train.train(config, str(workdir), jax.devices()[:1])
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return state, metrics


@pytest.mark.slow
def test_accumulated_steps_equal_the_full_batch_step(tmp_path):
  whole, whole_metrics = _run(tmp_path, 1)
  accumulated, accumulated_metrics = _run(tmp_path, 4)
  for a, b in zip(jax.tree_util.tree_leaves(whole.params),
                  jax.tree_util.tree_leaves(accumulated.params)):
    # Adam moves each weight by ~lr whatever its gradient's size, so a float32 rounding
    # difference in a near-zero gradient can shift a weight by a fraction of lr (1e-4): up
    # to 1.6e-5 seen, on a host whose XLA:CPU kernels use AVX-512. A gradient of the wrong
    # sign moves a weight 2 lr the other way.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=5e-5)
  # Adam hides a gradient's scale; the logged gradient norm does not (a sum instead of a mean
  # over microbatches would be 4x). Step 1 starts from identical params: tight. Step 2 starts
  # from params that differ by float32 rounding, which β=5000 amplifies in the loss.
  for record, tolerance in zip(zip(whole_metrics, accumulated_metrics), (1e-5, 1e-3)):
    for key in ("loss", "implicit_acc", "reward_margin", "grad_norm"):
      np.testing.assert_allclose(record[1][key], record[0][key], rtol=tolerance, err_msg=key)
