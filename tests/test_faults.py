"""Faults a long run meets. Non-finite steps: skipped, counted, never saved, and a streak of
them stops the run with the newest checkpoint from before it. Preemption: SIGTERM saves at a
step boundary and the same command resumes to the params of an unbroken run."""
import json
import os
import signal
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_config
from dpo_jax import checkpoint, train
from dpo_jax.data import synthetic
from dpo_jax.errors import UserError
from dpo_jax.train_step import TrainState

_OVERRIDES = {"data.resolution": 32, "train.batch_pairs": 2, "train.log_every": 1,
              "train.ckpt_every": 1}


def _config(**train_keys):
  config = tiny_config.synthetic_config()
  for key, value in {**_OVERRIDES, **{f"train.{k}": v for k, v in train_keys.items()}}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _records(workdir) -> dict[int, dict]:
  """metrics.jsonl by step, read as strict JSON (NaN or Infinity would raise)."""
  def refuse(constant):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in (json.loads(line, parse_constant=refuse) for line in lines)}


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_before_it_is_saved(
    tmp_path, monkeypatch):
  # One NaN in a batch's latents, as a corrupt latent cache gives: step 2, then step 5 on.
  bad_steps = {2, *range(5, 11)}
  real_pairs = synthetic.synthetic_pairs
  def pairs(pair_ids, **options):
    batch = real_pairs(pair_ids, **options)
    if pair_ids[0] // 2 + 1 in bad_steps:
      batch["latents"][1, 0, 3, 2, 1] = np.nan
    return batch
  monkeypatch.setattr(synthetic, "synthetic_pairs", pairs)
  after = {}  # Step -> host copies of (params, optimiser state) after it.
  real_step = train._step
  def recording_step(run, step, state, *args):
    state, preempted = real_step(run, step, state, *args)
    after[step] = jax.device_get((state.params, state.opt_state))
    return state, preempted
  monkeypatch.setattr(train, "_step", recording_step)

  with pytest.raises(UserError) as error:
    train.train(_config(steps=10, max_bad_steps=3), str(tmp_path), jax.devices()[:1])

  message = str(error.value)
  assert "\n" not in message
  assert "3 steps in a row (steps 5 to 7; train.max_bad_steps=3)" in message
  assert "the newest checkpoint, step 4, is from before them" in message
  assert "optim.peak_lr" in message and "data" in message
  assert sorted(after) == list(range(1, 7))  # Step 7 completed the streak: the run stopped.
  # (a) A skipped step leaves params and optimiser state as they were, bit for bit; the next
  # good step trains again.
  _assert_same(after[2], after[1])
  assert not np.array_equal(*(jax.tree_util.tree_leaves(after[s][0])[0] for s in (2, 3)))
  _assert_same(after[6], after[4])
  records = _records(tmp_path)
  assert [records[s]["skipped_nonfinite"] for s in range(1, 8)] == [0, 1, 0, 0, 1, 1, 1]
  assert [records[s]["skipped_nonfinite_total"] for s in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
  assert [records[s]["nonfinite_streak"] for s in range(1, 8)] == [0, 1, 0, 0, 1, 2, 3]
  assert records[2]["loss"] is None and records[3]["loss"] > 0
  # (b) Nothing saved in a streak (with keep=3, saves at 5 and 6 would have rotated step 3
  # out), and the newest checkpoint restores the params from before the streak.
  saved = checkpoint.Checkpointer(str(tmp_path), every=1)
  assert saved.all_steps() == [1, 3, 4]
  _assert_same(saved.restore_params(4), after[4][0])


class _SigtermOutsideTheLoop(Exception):
  pass


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_the_same_command_resumes(tmp_path, monkeypatch,
                                                                       capsys):
  # In this process, not a subprocess: three runs of the program that test_resume compiles
  # cost a third of a subprocess run's import, trace and compile. The CLI adds nothing here:
  # `train` returning normally is exit status 0.
  one_device = jax.devices()[:1]
  config = _config(steps=5, ckpt_every=1000)
  unbroken = train.train(config, str(tmp_path / "unbroken"), one_device)

  # SIGTERM arrives while step 3's batch is read, as a scheduler's would at any moment; a
  # SIGTERM outside the loop (the handler not installed, or not put back) fails the test.
  real_pairs = synthetic.synthetic_pairs
  def pairs(pair_ids, **options):
    if pair_ids[0] == 2 * 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_pairs(pair_ids, **options)
  monkeypatch.setattr(synthetic, "synthetic_pairs", pairs)
  def outside(*_):
    raise _SigtermOutsideTheLoop
  previous = signal.signal(signal.SIGTERM, outside)
  try:
    capsys.readouterr()
    preempted = train.train(config, str(tmp_path / "run"), one_device)
    assert signal.getsignal(signal.SIGTERM) is outside
  finally:
    signal.signal(signal.SIGTERM, previous)
  out = capsys.readouterr().out
  # Step 3, under way when the signal came, finished and was saved; nothing ran after it.
  assert ("preempted (SIGTERM): stopped after step 3. Step 3 is saved: the same command "
          "resumes from it") in out.splitlines()
  assert "step 4/5" not in out and int(preempted.step) == 3
  assert checkpoint.Checkpointer(str(tmp_path / "run"), every=1).all_steps() == [3]

  monkeypatch.setattr(synthetic, "synthetic_pairs", real_pairs)
  resumed = train.train(config, str(tmp_path / "run"), one_device)
  assert f"resumed from step 3 in {tmp_path / 'run'}" in capsys.readouterr().out
  assert int(resumed.step) == 5
  _assert_same(resumed.params, unbroken.params)
  _assert_same(resumed.opt_state, unbroken.opt_state)

  # A data worker killed outright after the SIGTERM (the workers ignore SIGTERM itself) fails
  # the next batch (tests/test_data_jsonl.py): step 2, the last one trained, is saved, and
  # the same command resumes to the unbroken run's params.
  def pairs_without_workers(pair_ids, **options):
    if pair_ids[0] == 2 * 2:
      os.kill(os.getpid(), signal.SIGTERM)
      raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")
    return real_pairs(pair_ids, **options)
  monkeypatch.setattr(synthetic, "synthetic_pairs", pairs_without_workers)
  train.train(config, str(tmp_path / "workers"), one_device)
  assert ("preempted (SIGTERM, which also ended the data workers): stopped after step 2. "
          "Step 2 is saved: the same command resumes from it") in capsys.readouterr().out
  assert checkpoint.Checkpointer(str(tmp_path / "workers"), every=1).all_steps() == [2]
  monkeypatch.setattr(synthetic, "synthetic_pairs", real_pairs)
  resumed = train.train(config, str(tmp_path / "workers"), one_device)
  _assert_same(resumed.params, unbroken.params)


@flax.struct.dataclass
class _StateBeforeTheCounts:
  """TrainState as dpo_jax saved it before it counted non-finite steps."""
  step: Any
  params: Any
  reference_params: Any
  opt_state: Any


def test_counts_are_saved_and_a_checkpoint_from_before_them_restores_with_zero(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  opt_state = optax.adam(1e-3).init(params)
  old = _StateBeforeTheCounts(jnp.array(3, jnp.int32), params, params, opt_state)
  saved = checkpoint.Checkpointer(str(tmp_path), every=1)
  saved.save(3, old, {"hosts": [{}]}, {})
  counted = TrainState(step=jnp.array(4, jnp.int32), params=params, reference_params=params,
                       opt_state=opt_state, nonfinite_streak=jnp.array(0, jnp.int32),
                       nonfinite_total=jnp.array(5, jnp.int32))
  saved.save(4, counted, {"hosts": [{}]}, {})
  saved.wait()
  target = jax.tree_util.tree_map(jnp.zeros_like, counted)  # A new run's state, say.
  state, _ = saved.restore(3, target)
  assert int(state.step) == 3 and int(state.nonfinite_total) == 0
  _assert_same(state.params, params)
  state, _ = saved.restore(4, target)
  assert int(state.step) == 4 and int(state.nonfinite_total) == 5

