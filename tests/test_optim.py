"""dpo_jax.optim: the paper's learning-rate recipe and the optimisers of the official code
(torch.optim.AdamW + clip_grad_norm_ for SD1.5, transformers.Adafactor for SDXL) as oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor

from dpo_jax import adafactor, optim, parallel
from dpo_jax.default_config import get_config
from dpo_jax.models import weights


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


def _unet_params():
  """One leaf of each shape class of the SD/SDXL UNet, in Flax layout, under real leaf names."""
  rng = np.random.default_rng(1)
  normal = lambda *shape: 0.1 * rng.standard_normal(shape, np.float32)
  return {"conv_in": {"kernel": normal(3, 3, 4, 320), "bias": normal(320)},
          "resnets.0": {"conv1": {"kernel": normal(3, 3, 128, 256)},
                        "conv_shortcut": {"kernel": normal(1, 1, 128, 256)},
                        "norm1": {"scale": 1 + normal(128)}},
          "time_embedding.linear_1": {"kernel": normal(96, 320)},
          "attn1.to_q": {"kernel": normal(128, 130)}}


_GRAD_NORMS = (40.0, 0.3, 5.0, 2.0, 0.8, 12.0, 0.5, 3.0, 0.9, 1.5)


def _grads(params, step):
  """Gradients whose global norm changes from step to step (0.3 to 40), so clipping at 1
  acts on some steps and not on others. Each axis of each leaf has its own fixed scales
  (rows, columns, spatial taps), so how the second moment is factored matters."""
  scales = np.random.default_rng(7)
  noise = np.random.default_rng(100 + step)

  def grad(p):
    g = noise.standard_normal(p.shape, np.float32)
    for axis, size in enumerate(p.shape):
      shape = [1] * p.ndim
      shape[axis] = size
      g *= np.exp(scales.standard_normal(shape, np.float32))
    return g

  grads = jax.tree_util.tree_map(grad, params)
  scale = _GRAD_NORMS[step] / float(optax.global_norm(grads))
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
  """The same steps in PyTorch, on the params and gradients in PyTorch layout."""
  tensors = {key: torch.nn.Parameter(torch.from_numpy(np.array(value)))  # Copies.
             for key, value in weights.params_to_state_dict(params).items()}
  optimizer = make_optimizer(list(tensors.values()))
  for step in range(steps):
    for key, grad in weights.params_to_state_dict(_grads(params, step)).items():
      tensors[key].grad = torch.from_numpy(grad)
    torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip_norm)
    optimizer.step()
  state = {key: tensor.detach().numpy() for key, tensor in tensors.items()}
  return weights.state_dict_to_params(state, params, what="torch")


def _relative_errors(actual, expected, params):
  """Per leaf: the largest difference of the change from `params`, over the largest change."""
  errors = {}
  leaves = jax.tree_util.tree_leaves
  for (path, a), e, p in zip(jax.tree_util.tree_leaves_with_path(actual), leaves(expected),
                             leaves(params)):
    moved = np.abs(e - p).max()
    assert moved > 0, jax.tree_util.keystr(path)
    errors[jax.tree_util.keystr(path)] = float(np.abs((a - p) - (e - p)).max() / moved)
  return errors


def _assert_trees_close(actual, expected, params, rtol):
  """The change from the initial params agrees to rtol of the change's largest entry."""
  errors = _relative_errors(actual, expected, params)
  assert all(error <= rtol for error in errors.values()), errors


def test_adamw_matches_torch_adamw_with_clip_grad_norm():
  """The official SD1.5 optimiser: clip_grad_norm_(1.0) then torch.optim.AdamW(wd=1e-2)."""
  config = _config(name="adamw", peak_lr=1e-2, warmup_steps=0, weight_decay=1e-2,
                   grad_clip_norm=1.0)
  params = _params()
  actual, _ = _run_ours(config, params, steps=4)
  expected = _run_torch(lambda ts: torch.optim.AdamW(ts, lr=1e-2, weight_decay=1e-2),
                        params, steps=4, clip_norm=1.0)
  _assert_trees_close(actual, expected, params, rtol=1e-4)


def _adafactor_errors(factoring):
  """Our Adafactor vs the official SDXL optimiser, clip_grad_norm_(1.0) then
  transformers.Adafactor(lr, weight_decay, clip_threshold=1, scale_parameter=False,
  relative_step=False), after 10 steps on each UNet shape class."""
  config = _config(name="adafactor", adafactor_factoring=factoring, peak_lr=1e-2,
                   warmup_steps=0, weight_decay=1e-2, grad_clip_norm=1.0)
  params = _unet_params()
  actual, _ = _run_ours(config, params, steps=10)
  expected = _run_torch(
      lambda ts: Adafactor(ts, lr=1e-2, weight_decay=1e-2, clip_threshold=1.0,
                           scale_parameter=False, relative_step=False),
      params, steps=10, clip_norm=1.0)
  return _relative_errors(actual, expected, params)


def test_adafactor_matches_the_official_transformers_adafactor():
  """Every leaf, factored over its PyTorch layout's last two dims (conv kernels over the
  kh × kw taps, 1×1 kernels thus per element, dense kernels of any size) or whole (1-D)."""
  errors = _adafactor_errors("transformers")
  assert all(error <= 1e-4 for error in errors.values()), errors


def test_optax_factoring_differs_from_transformers_adafactor():
  """The oracle above can fail: optax factors conv kernels over channels and leaves those
  with a dim < 128 (conv_in, small dense kernels) whole, where transformers factors them."""
  errors = _adafactor_errors("optax")
  for leaf in ("['resnets.0']['conv1']['kernel']", "['resnets.0']['conv_shortcut']['kernel']",
               "['conv_in']['kernel']", "['time_embedding.linear_1']['kernel']"):
    assert errors[leaf] > 0.1, errors
  for leaf in ("['attn1.to_q']['kernel']", "['conv_in']['bias']",
               "['resnets.0']['norm1']['scale']"):
    assert errors[leaf] <= 1e-4, errors  # Factored alike (2-D, both dims >= 128) or whole.


def test_adafactor_state_is_factored_over_the_pytorch_layout():
  """Keep-dims factors: a conv kernel's over kh and kw, a dense kernel's over in and out."""
  state = adafactor.scale_by_factored_rms().init(_unet_params())
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  assert shapes(state.v_row["resnets.0"]["conv1"]["kernel"]) == (3, 1, 128, 256)
  assert shapes(state.v_col["resnets.0"]["conv1"]["kernel"]) == (1, 3, 128, 256)
  assert shapes(state.v_row["time_embedding.linear_1"]["kernel"]) == (1, 320)
  assert shapes(state.v_col["time_embedding.linear_1"]["kernel"]) == (96, 1)
  assert shapes(state.v["conv_in"]["bias"]) == (320,)
  assert shapes(state.v["conv_in"]["kernel"]) == ()


def test_adafactor_state_shards_and_steps_under_jit():
  """The state takes `parallel.state_shardings` (factors split over 'fsdp' like params)."""
  config = _config(name="adafactor", peak_lr=1e-3, warmup_steps=0)
  optimizer = optim.make_optimizer(config)
  params = _unet_params()
  mesh = parallel.make_mesh(data=1, fsdp=8)
  shardings = lambda tree: parallel.state_shardings(tree, mesh, min_size=1024)
  state_sharding = shardings(jax.eval_shape(optimizer.init, params))
  param_sharding = shardings(params)
  state = jax.jit(optimizer.init, out_shardings=state_sharding)(params)
  step = jax.jit(optimizer.update, in_shardings=(param_sharding, state_sharding, param_sharding),
                 out_shardings=(param_sharding, state_sharding))
  updates, state = step(_grads(params, 0), state, params)
  v_row = optax.tree_utils.tree_get(state, "v_row")["resnets.0"]["conv1"]["kernel"]
  assert v_row.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))


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
    scale = norm / optax.global_norm(grads)
    direction = jax.tree_util.tree_map(lambda g, scale=scale: g * scale, grads)
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


def test_sft_learning_rate_has_no_inverse_beta_factor():
  """SFT has no β: the derived lr is lr_per_pair × pairs (the paper's SFT: 1e-9 per pair)."""
  config = _config(peak_lr=None, lr_per_pair=1e-9)
  config.train.batch_pairs = 2048
  config.dpo.loss = "sft"
  for beta in (2000.0, 5000.0):
    config.dpo.beta = beta
    assert optim.peak_learning_rate(config) == pytest.approx(2.048e-6, rel=1e-12)
  config.dpo.loss = "dpo"
  assert optim.peak_learning_rate(config) == pytest.approx(2.048e-6 * 0.4, rel=1e-12)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_match_diffusers_get_scheduler(name):
  """optim.schedule against the official code's `get_scheduler(--lr_scheduler)`:
  'constant' is its constant_with_warmup; every step's lr, warmup included."""
  from diffusers.optimization import get_scheduler
  config = _config(peak_lr=1e-4, warmup_steps=10, schedule=name)
  config.train.steps = 50
  tensor = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.SGD([tensor], lr=1e-4)
  scheduler = get_scheduler("constant_with_warmup" if name == "constant" else name, optimizer,
                            num_warmup_steps=10, num_training_steps=50)
  expected = []
  for _ in range(50):
    expected.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
  ours = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([float(ours(step)) for step in range(50)], expected, rtol=1e-5,
                             atol=1e-12)
