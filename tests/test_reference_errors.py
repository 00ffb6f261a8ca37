"""Precomputed reference errors (`dpo_jax.reference_errors`, dpo.reference='precomputed'):
the same loss as the live reference for the same (t, ε), no reference weights in the state,
and one-line refusals of a store made for another run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
import tiny_data
import tiny_models
from dpo_jax import precision, reference_errors, train, train_step
from dpo_jax.data import synthetic
from dpo_jax.errors import UserError


SMALL_UNET = tiny_models.SMALL_SD15_UNET


def _synthetic_config():
  config = tiny_config.synthetic_config()
  config.model.unet = SMALL_UNET
  return config


def _synthetic_models(config):
  return train.load_models(config)


def _synthetic_batch(config, models, pairs: int, first_pair: int = 0):
  unet = models.unet.config
  return synthetic.synthetic_pairs(
      np.arange(first_pair, first_pair + pairs), seed=config.train.seed,
      latent_size=config.data.resolution // 8, channels=unet.in_channels,
      context_length=config.data.context_length, context_dim=unet.cross_attention_dim[0])


# float32: the loss is ~14 here, so 5e-5 of it is 7e-4 of the inside term, i.e. errors equal
# to ~1e-7 (1.04e-5 measured with the CPU's blocked attention).
@pytest.mark.parametrize("dtype, tolerance", [("float32", 5e-5), ("bfloat16", 2e-3)])
def test_precomputed_loss_equals_the_live_loss(dtype, tolerance):
  """A policy moved away from the reference (so the loss is not ln 2): the loss and metrics
  from stored reference errors equal those of the live reference pass (the reference errors
  enter the loss as constants, so its gradient follows). The stored errors come from a
  separately compiled forward, so they may differ from the live pass's in the last bits,
  which β/2 = 2500 amplifies: bfloat16 gets a wider tolerance."""
  config = _synthetic_config()
  config.model.compute_dtype = config.model.reference_dtype = dtype
  models = _synthetic_models(config)
  batch = _synthetic_batch(config, models, pairs=4)
  reference = precision.reference_params(
      jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), models.initial_params),
      dtype)
  leaves, tree = jax.tree_util.tree_flatten(models.initial_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  policy = jax.tree_util.tree_unflatten(tree, [
      leaf + 0.02 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])
  options = train.pair_error_options(config, models)

  def loss_fn(reference_mode):
    return train_step.make_pair_loss(models.unet, models.schedule, beta=config.dpo.beta,
                                     loss_name="dpo", **{**options, "reference": reference_mode})

  _, live_metrics = jax.jit(loss_fn("live"))(policy, reference, batch)
  stored_fn = reference_errors._reference_errors_function(
      config, models, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  stored, pair_ids, epochs = stored_fn(reference, batch)
  np.testing.assert_array_equal(pair_ids, batch["pair_ids"])
  np.testing.assert_array_equal(epochs, 0)
  _, precomputed_metrics = jax.jit(loss_fn("precomputed"))(
      policy, None, {**batch, "reference_errors": stored})

  np.testing.assert_allclose(precomputed_metrics["reference_error_winner"],
                             live_metrics["reference_error_winner"], rtol=tolerance)
  assert abs(float(live_metrics["loss"]) - np.log(2)) > 0.05  # The policy has moved.
  for key in ("loss", "implicit_acc", "reward_margin", "policy_error_loser"):
    np.testing.assert_allclose(precomputed_metrics[key], live_metrics[key], rtol=tolerance)


def test_reference_free_states_hold_no_reference_weights():
  config = _synthetic_config()
  config.dpo.reference = "precomputed"
  config.dpo.reference_errors = "unused"
  models = _synthetic_models(config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  state, _ = train.build_program(config, models, mesh)
  assert state.reference_params is None


@pytest.fixture(scope="module")
def pipeline_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("reference_errors")
  tiny_models.make_pipeline("sd", small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=6, seed=0)
  return folder


def _image_config(folder, **dpo):
  config = tiny_config.get_config()
  config.model.pretrained = str(folder / "pipeline")
  config.data.train_files = str(folder / "train.parquet")
  config.train.update(steps=4, ckpt_every=1000)  # 8 pairs of 6: two epochs.
  config.dpo.update(dpo)
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.slow
def test_a_run_on_stored_errors_trains_as_the_live_run(pipeline_files, tmp_path):
  """Images through the encoders, two epochs: the precomputed run's losses and params equal
  the live run's (float32; the stored errors come from another compiled program, so equal to
  float rounding, amplified by β/2 = 2500 into the loss: 2.3e-4 at step 4 was seen)."""
  store = str(tmp_path / "store")
  one_device = jax.devices()[:1]
  live_state = train.train(_image_config(pipeline_files), str(tmp_path / "live"), one_device)
  config = _image_config(pipeline_files, reference="precomputed", reference_errors=store)
  metadata = reference_errors.compute(config, store, devices=one_device)
  assert metadata["epochs"] == 2 and metadata["pairs"] == 8
  precomputed_state = train.train(config, str(tmp_path / "precomputed"), one_device)

  assert precomputed_state.reference_params is None
  np.testing.assert_allclose(_losses(tmp_path / "precomputed"), _losses(tmp_path / "live"),
                             atol=1e-3)
  # Adam's normalised step turns a rounding-level gradient difference on a near-zero
  # gradient into a visible one on that element: compare the updates as a whole.
  initial = jax.tree_util.tree_leaves(train.load_models(config).initial_params)
  live_updates, precomputed_updates = (
      np.concatenate([np.ravel(np.asarray(p) - np.asarray(p0))
                      for p, p0 in zip(jax.tree_util.tree_leaves(state.params), initial)])
      for state in (live_state, precomputed_state))
  difference = np.abs(precomputed_updates - live_updates).mean()
  assert difference < 1e-3 * np.abs(live_updates).mean(), difference

  with pytest.raises(UserError, match=r"train\.steps is 5.*--overwrite"):
    reference_errors.attach(_with(config, steps=5), train.load_models(config), iter(()))
  with pytest.raises(UserError, match=r"another run: seed \(stored 0, this run 1\)"):
    reference_errors.attach(_with(config, seed=1), train.load_models(config), iter(()))
  with pytest.raises(UserError, match="already holds reference errors"):
    reference_errors.compute(config, store, devices=one_device)


def _with(config, **train_options):
  changed = config.copy_and_resolve_references()
  changed.train.update(train_options)
  return changed


def test_refusals_before_anything_runs(tmp_path):
  from dpo_jax import config_checks
  config = tiny_config.synthetic_config()
  config.dpo.reference = "precomputed"
  with pytest.raises(UserError, match="needs dpo.reference_errors"):
    config_checks.check_config(config)
  config.dpo.reference_errors = str(tmp_path)
  config.dpo.loss = "sft"
  with pytest.raises(UserError, match="uses no reference model"):
    config_checks.check_config(config)
  with pytest.raises(UserError, match="holds no reference_errors.json"):
    reference_errors.Store(str(tmp_path))


def test_lookup_names_a_pair_the_store_lacks(tmp_path):
  table = reference_errors._as_table(np.array([0, 0, 1]), np.array([0, 2, 1]),
                                     np.arange(6, dtype=np.float32).reshape(3, 2))
  np.save(tmp_path / reference_errors.ERRORS, table)
  (tmp_path / reference_errors.METADATA).write_text(json.dumps({"identity": {}, "steps": 1}))
  store = reference_errors.Store(str(tmp_path))
  np.testing.assert_array_equal(store.lookup(np.array([2, 1]), np.array([0, 1])),
                                [[2, 3], [4, 5]])
  with pytest.raises(UserError, match="no errors for pair 1 of epoch 0"):
    store.lookup(np.array([0, 1]), np.array([0, 0]))
  with pytest.raises(UserError, match="no errors for pair 7 of epoch 3"):
    store.lookup(np.array([7]), np.array([3]))
