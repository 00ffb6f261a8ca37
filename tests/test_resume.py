"""A run killed after a checkpoint and started again with the same config continues exactly."""
import json

import jax
import numpy as np
import pytest

import tiny_config
from dpo_jax import checkpoint, train
from dpo_jax.data import synthetic
from dpo_jax.errors import UserError


def _config():
  config = tiny_config.synthetic_config()
  config.train.steps = 6
  config.train.ckpt_every = 3
  config.train.log_every = 1
  config.train.batch_pairs = 2
  config.data.resolution = 32
  return config


class Killed(Exception):
  pass


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_params_and_data_order(tmp_path, monkeypatch, capsys):
  one_device = jax.devices()[:1]
  uninterrupted = train.train(_config(), str(tmp_path / "a"), one_device)

  # Saves are made synchronous so the "kill" cannot race the step-3 save; a save that a real
  # kill interrupts never becomes visible (orbax commits atomically).
  save = checkpoint.Checkpointer.save
  def save_and_wait(self, *args, **kwargs):
    saved = save(self, *args, **kwargs)
    self.wait()
    return saved
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_and_wait)
  real_pairs = synthetic.synthetic_pairs
  def pairs_until_step_5(pair_ids, **options):
    if pair_ids[0] >= 4 * 2:  # Step 5's pairs: the process dies after step 4.
      raise Killed
    return real_pairs(pair_ids, **options)
  monkeypatch.setattr(synthetic, "synthetic_pairs", pairs_until_step_5)
  with pytest.raises(Killed):
    train.train(_config(), str(tmp_path / "b"), one_device)
  monkeypatch.setattr(synthetic, "synthetic_pairs", real_pairs)
  capsys.readouterr()
  resumed = train.train(_config(), str(tmp_path / "b"), one_device)
  assert f"resumed from step 3 in {tmp_path / 'b'}" in capsys.readouterr().out

  assert int(resumed.step) == int(uninterrupted.step) == 6
  for a, b in zip(jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  logged = lambda run: {r["step"]: r["loss"] for r in map(
      json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())}
  # Steps 4 ran twice in run b (before the kill and after resuming from step 3), on the same
  # pairs with the same noise: the same loss. Every step's loss matches the uninterrupted run.
  assert logged("a") == logged("b")


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_with_its_path(tmp_path):
  config = _config()
  config.train.steps = 1
  train.train(config, str(tmp_path), jax.devices()[:1])
  config.train.steps = 2
  config.model.unet.block_out_channels = [16, 32]
  with pytest.raises(UserError) as error:
    train.train(config, str(tmp_path), jax.devices()[:1])
  message = str(error.value)
  assert "\n" not in message
  assert str(tmp_path / "checkpoints" / "1") in message and "new --workdir" in message
