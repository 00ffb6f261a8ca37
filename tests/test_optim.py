"""dpo_jax.optim: the paper's learning-rate recipe and the optimisers of the official code
(torch.optim.AdamW + clip_grad_norm_ for SD1.5, transformers.Adafactor for SDXL) as oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor

from dpo_jax import optim
from dpo_jax.default_config import get_config


def _config(**optim_fields):
  config = get_config()
  for key, value in optim_fields.items():
    setattr(config.optim, key, value)
  return config


def test_explicit_peak_lr_wins():
  config = _config(peak_lr=3e-6)
  config.train.batch_pairs, config.dpo.beta = 2048, 2000.0
  assert optim.peak_learning_rate(config) == 3e-6


def test_unset_peak_lr_follows_paper_recipe():
  """Paper §5: lr_per_pair × pairs per step × 2000/β (1e-8 × 2048 × 2000/β)."""
  config = _config(peak_lr=None, lr_per_pair=1e-8)
  assert config.optim.peak_lr is None  # ml_collections accepts None for the float field.
  config.train.batch_pairs, config.dpo.beta = 2048, 2000.0  # SD1.5 main results.
  assert optim.peak_learning_rate(config) == pytest.approx(2.048e-5, rel=1e-12)
  config.dpo.beta = 5000.0  # SDXL: inverse-β scaling, 2000/5000 of the above.
  assert optim.peak_learning_rate(config) == pytest.approx(8.192e-6, rel=1e-12)
  config.train.batch_pairs = 8
  assert optim.peak_learning_rate(config) == pytest.approx(1e-8 * 8 * 0.4, rel=1e-12)


def test_schedule_warms_up_linearly_then_stays_constant():
  schedule = optim.learning_rate_schedule(_config(peak_lr=1e-4, warmup_steps=100))
  values = [float(schedule(step)) for step in (0, 25, 50, 100, 101, 5000)]
  np.testing.assert_allclose(values, [0.0, 2.5e-5, 5e-5, 1e-4, 1e-4, 1e-4], rtol=1e-6, atol=0)
  assert float(schedule(0)) == 0.0


def test_no_warmup_starts_at_the_peak():
  schedule = optim.learning_rate_schedule(_config(peak_lr=1e-4, warmup_steps=0))
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 1000)], [1e-4] * 3, rtol=1e-6)


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.standard_normal((128, 130), np.float32),
                    "bias": rng.standard_normal(130, np.float32)},
          "norm": {"scale": 1 + 0.1 * rng.standard_normal(7, np.float32)}}


def _grads(params, step):
  """Gradients whose global norm changes from step to step (0.3 to 40), so clipping at 1
  acts on some steps and not on others."""
  rng = np.random.default_rng(100 + step)
  grads = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape, np.float32), params)
  scale = (40.0, 0.3, 5.0, 2.0)[step] / float(optax.global_norm(grads))
  return jax.tree_util.tree_map(lambda g: g * np.float32(scale), grads)


def _run_ours(config, params, steps):
  optimizer = optim.make_optimizer(config)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for step in range(steps):
    updates, state = update(_grads(params, step), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree_util.tree_map(np.asarray, params), state


def _run_torch(make_optimizer, params, steps, clip_norm):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  tensors = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
  optimizer = make_optimizer(tensors)
  for step in range(steps):
    for tensor, grad in zip(tensors, jax.tree_util.tree_leaves(_grads(params, step))):
      tensor.grad = torch.from_numpy(np.array(grad))
    torch.nn.utils.clip_grad_norm_(tensors, clip_norm)
    optimizer.step()
  return jax.tree_util.tree_unflatten(treedef, [t.detach().numpy() for t in tensors])


def _assert_trees_close(actual, expected, params, rtol):
  """The change from the initial params agrees to rtol of the change's largest entry."""
  for (path, a), e, p in zip(jax.tree_util.tree_leaves_with_path(actual),
                             jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(params)):
    moved = np.abs(e - p).max()
    assert moved > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a - p, e - p, rtol=0, atol=rtol * moved,
                               err_msg=jax.tree_util.keystr(path))


def test_adamw_matches_torch_adamw_with_clip_grad_norm():
  """The official SD1.5 optimiser: clip_grad_norm_(1.0) then torch.optim.AdamW(wd=1e-2)."""
  config = _config(name="adamw", peak_lr=1e-2, warmup_steps=0, weight_decay=1e-2,
                   grad_clip_norm=1.0)
  params = _params()
  actual, _ = _run_ours(config, params, steps=4)
  expected = _run_torch(lambda ts: torch.optim.AdamW(ts, lr=1e-2, weight_decay=1e-2),
                        params, steps=4, clip_norm=1.0)
  _assert_trees_close(actual, expected, params, rtol=1e-4)


def test_adafactor_matches_the_official_transformers_adafactor():
  """The official SDXL optimiser: transformers.Adafactor(lr, weight_decay, clip_threshold=1,
  scale_parameter=False, relative_step=False). The 128×130 kernel is factored by both."""
  config = _config(name="adafactor", peak_lr=1e-2, warmup_steps=0, weight_decay=1e-2,
                   grad_clip_norm=1.0)
  params = _params()
  actual, _ = _run_ours(config, params, steps=4)
  expected = _run_torch(
      lambda ts: Adafactor(ts, lr=1e-2, weight_decay=1e-2, clip_threshold=1.0,
                           scale_parameter=False, relative_step=False),
      params, steps=4, clip_norm=1.0)
  _assert_trees_close(actual, expected, params, rtol=1e-4)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_updates_are_finite_and_descend(name):
  config = _config(name=name, peak_lr=1e-3, warmup_steps=0)
  params = _params()
  optimizer = optim.make_optimizer(config)
  grads = _grads(params, 1)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  for update, grad in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads)):
    assert np.isfinite(update).all()
    assert float(jnp.vdot(update, grad)) < 0  # A descent direction.


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_is_scaled_by_the_learning_rate(name):
  """With a zero gradient the only change is the decay, −lr·wd·p (torch AdamW and
  transformers.Adafactor alike), not −wd·p."""
  config = _config(name=name, peak_lr=1e-3, warmup_steps=0, weight_decay=1e-2)
  params = _params()
  optimizer = optim.make_optimizer(config)
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  expected = jax.tree_util.tree_map(lambda p: -1e-3 * 1e-2 * p, params)
  for update, want in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(update, want, rtol=1e-5, atol=0)
  config.optim.weight_decay = 0.0
  optimizer = optim.make_optimizer(config)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))


def test_grad_clipping_caps_the_global_norm_seen_by_adam():
  """Adam's first moment after one step is (1 − β1)·g, g as clipped to global norm 1."""
  config = _config(name="adamw", peak_lr=1e-3, warmup_steps=0, grad_clip_norm=1.0)
  optimizer = optim.make_optimizer(config)
  params = _params()
  for step, norm in ((0, 1.0), (1, 0.3)):  # 40 is capped at 1; 0.3 passes unchanged.
    grads = _grads(params, step)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(float(optax.global_norm(mu)), 0.1 * norm, rtol=1e-5)
    direction = jax.tree_util.tree_map(lambda g: g * (norm / optax.global_norm(grads)), grads)
    for m, g in zip(jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(direction)):
      np.testing.assert_allclose(m, 0.1 * g, rtol=1e-4, atol=1e-9)


def test_warmup_fraction_of_the_run_overrides_warmup_steps():
  config = get_config()
  config.train.steps, config.optim.warmup_steps, config.optim.peak_lr = 2000, 10, 1e-4
  config.optim.warmup_fraction = 0.25  # The paper: "25% linear warmup".
  assert optim.warmup_steps(config) == 500
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(250)) == pytest.approx(5e-5)
  assert float(schedule(500)) == pytest.approx(1e-4)
