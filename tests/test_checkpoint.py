"""dpo_jax.checkpoint.Checkpointer on its own, on a tiny TrainState: what a save writes comes
back (arrays, dtypes, the target's shardings, the data position, the config), saves follow
`every` or `force`, only the newest `keep` steps stay, and export gets just the params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dpo_jax.checkpoint import Checkpointer
from dpo_jax.errors import UserError
from dpo_jax.train_step import TrainState

DATA_STATE = {"hosts": [{"epoch": 1, "position": 17, "files": ["a.parquet", "b.parquet"]},
                        {"epoch": 1, "position": 16, "files": ["c.parquet"]}]}
CONFIG = {"dpo": {"beta": 5000.0}, "optim": {"name": "adamw", "peak_lr": None},
          "data": {"train_files": "a/*.parquet", "random_flip": True},
          "train": {"steps": 6, "ckpt_every": 3}, "diffusion": {"timesteps": [249, 499]}}


@pytest.fixture
def checkpointers(tmp_path):
  """Checkpointer(tmp_path, ...) factory; every one made is waited for and closed at the end."""
  made = []
  def make(*, every: int, keep: int = 3) -> Checkpointer:
    made.append(Checkpointer(str(tmp_path), every=every, keep=keep))
    return made[-1]
  yield make
  for checkpointer in made:
    checkpointer.wait()
    checkpointer.close()


def _mesh(shape, names):
  return jax.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(shape))])


def _state(seed: int = 0, mesh=None) -> TrainState:
  """A small TrainState as training holds it: float32 policy, bfloat16 reference (different
  values), AdamW moments, an int32 step; the 2-D weights split over `mesh`'s first axis."""
  mesh = mesh or _mesh((8,), ("data",))
  keys = jax.random.split(jax.random.key(seed), 3)
  params = {"conv": {"kernel": jax.random.normal(keys[0], (8, 4)),
                     "bias": jax.random.normal(keys[1], (4,))},
            "norm": {"scale": jnp.ones((4,))}}
  reference = jax.tree_util.tree_map(lambda x: (x + 1).astype(jnp.bfloat16), params)
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree_util.tree_map(
      lambda x: x + jax.random.uniform(keys[2], x.shape, x.dtype) if x.ndim else x, opt_state)
  state = TrainState(step=jnp.array(7 + seed, jnp.int32), params=params,
                     reference_params=reference, opt_state=opt_state)
  split = lambda x: jax.device_put(
      x, NamedSharding(mesh, P(mesh.axis_names[0]) if x.ndim == 2 else P()))
  return jax.tree_util.tree_map(split, state)


def _assert_same_arrays(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))


def test_new_workdir_has_no_steps(checkpointers):
  checkpointer = checkpointers(every=3)
  assert checkpointer.latest_step() is None
  assert checkpointer.all_steps() == []


def test_restore_gives_the_saved_arrays_laid_out_like_the_target(checkpointers):
  saved = _state(seed=0)  # Split 8 ways over "data".
  writer = checkpointers(every=1)
  writer.save(1, saved, DATA_STATE, CONFIG)
  writer.wait()
  # Another mesh and other partitions, as a run resumed on a different slice would have; the
  # values of another state, which the restore must replace.
  mesh = _mesh((4, 2), ("data", "fsdp"))
  target = jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "fsdp") if x.ndim == 2 else P())),
      _state(seed=1))
  checkpointer = checkpointers(every=1)  # A new process: only what reached the disk.
  restored, data_state = checkpointer.restore(1, target)
  _assert_same_arrays(restored, saved)
  for r, t in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)):
    assert r.sharding == t.sharding
  assert data_state == DATA_STATE


def test_restore_to_abstract_arrays(checkpointers):
  saved = _state()
  checkpointer = checkpointers(every=1)
  checkpointer.save(1, saved, DATA_STATE, CONFIG)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved)
  restored, _ = checkpointer.restore(1, target)
  _assert_same_arrays(restored, saved)
  assert {leaf.sharding for leaf in jax.tree_util.tree_leaves(restored)} == {device}


def test_config_round_trips(checkpointers):
  checkpointer = checkpointers(every=1)
  checkpointer.save(1, _state(), DATA_STATE, CONFIG)
  checkpointer.save(2, _state(), DATA_STATE, {**CONFIG, "dpo": {"beta": 2000.0}})
  checkpointer.wait()
  assert checkpointers(every=1).restore_config(1) == CONFIG
  assert checkpointers(every=1).restore_config(2)["dpo"] == {"beta": 2000.0}


def test_save_and_due_follow_every_once_a_step_is_saved(checkpointers):
  checkpointer = checkpointers(every=3)
  assert checkpointer.save(3, _state(), DATA_STATE, CONFIG)
  assert [step for step in range(1, 13) if checkpointer.due(step)] == [6, 9, 12]
  assert [checkpointer.save(step, _state(), DATA_STATE, CONFIG) for step in (4, 5, 6, 7)] == [
      False, False, True, False]
  checkpointer.wait()
  assert checkpointer.all_steps() == [3, 6] and checkpointer.latest_step() == 6


def test_fresh_workdir_is_due_only_every_n_steps(checkpointers):
  checkpointer = checkpointers(every=3)
  assert [step for step in range(1, 7) if checkpointer.due(step)] == [3, 6]


def test_forced_save_off_the_cadence(checkpointers):
  checkpointer = checkpointers(every=3)
  checkpointer.save(3, _state(), DATA_STATE, CONFIG)
  assert not checkpointer.due(5)
  assert checkpointer.save(5, _state(seed=5), DATA_STATE, CONFIG, force=True)
  checkpointer.wait()
  assert checkpointer.all_steps() == [3, 5] and checkpointer.latest_step() == 5
  restored, _ = checkpointer.restore(5, _state())
  _assert_same_arrays(restored, _state(seed=5))
  # The cadence stays on multiples of `every`, not counted from the forced step.
  assert [step for step in range(6, 10) if checkpointer.due(step)] == [6, 9]


def test_only_the_newest_keep_steps_stay(checkpointers):
  checkpointer = checkpointers(every=1, keep=2)
  for step in range(1, 6):
    assert checkpointer.save(step, _state(seed=step), {"hosts": [{"position": step}]}, CONFIG)
  checkpointer.wait()
  assert checkpointer.all_steps() == [4, 5]
  reopened = checkpointers(every=1, keep=2)
  assert reopened.all_steps() == [4, 5] and reopened.latest_step() == 5
  restored, data_state = reopened.restore(4, _state())
  _assert_same_arrays(restored, _state(seed=4))
  assert data_state == {"hosts": [{"position": 4}]}


def test_restore_params_returns_only_the_params_on_the_first_device(checkpointers):
  saved = _state(mesh=_mesh((2, 4), ("data", "fsdp")))
  checkpointer = checkpointers(every=1)
  checkpointer.save(1, saved, DATA_STATE, CONFIG)
  checkpointer.wait()
  params = checkpointers(every=1).restore_params(1)
  _assert_same_arrays(params, saved.params)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  assert {leaf.sharding for leaf in jax.tree_util.tree_leaves(params)} == {device}
  # Another field of the state alike: the bfloat16 reference, in its dtype.
  reference = checkpointers(every=1).restore_params(1, "reference_params")
  _assert_same_arrays(reference, saved.reference_params)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(reference)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("change", ["shape", "structure"])
def test_restoring_another_models_checkpoint_is_a_user_error_naming_it(checkpointers, tmp_path,
                                                                       change):
  checkpointer = checkpointers(every=1)
  checkpointer.save(1, _state(), DATA_STATE, CONFIG)
  checkpointer.wait()
  target = _state()
  name = "norm" if change == "shape" else "extra"  # A 5-vector for a 4-vector, or a new one.
  target = target.replace(params={**target.params, name: {"scale": jnp.ones((5,))}})
  with pytest.raises(UserError) as error:
    checkpointer.restore(1, target)
  message = str(error.value)
  assert "\n" not in message and str(tmp_path / "checkpoints" / "1") in message
  assert "new --workdir" in message
