"""The preference losses beside DPO (`dpo.loss` = 'hinge', 'ipo', 'mapo', 'kto'): each equals
the value derived by hand from its formula, its gradient moves the errors the right way, and
each equals a transcription of the PyTorch code that defines it (diffusers'
train_diffusion_dpo.py, mapo-t2i/mapo utils.py, jacklishufan/diffusion-kto
train_kto_sd_v1.5.py) on the same predictions, value and gradient."""
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_config
from dpo_jax import config_checks, default_config, diffusion, loss as losses, parallel, train
from dpo_jax.data import synthetic
from dpo_jax.errors import UserError
from test_loss import HAND_BETA, HAND_POLICY, HAND_REFERENCE

sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))
# HAND_* (test_loss.py): three pairs whose margins −((L_w − L_l)_policy − (L_w − L_l)_ref)
# are exactly 1, −0.5 and 0.
HAND_MARGINS = np.array([1.0, -0.5, 0.0])
PAIRS = 3


def _evaluate(loss_fn, errors):
  """(loss, metrics, gradient w.r.t. the errors) of `loss_fn(errors) -> (loss, metrics)`, as
  floats and NumPy, from one compiled program (eager JAX compiles each op on its own)."""
  (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      jnp.asarray(errors, jnp.float32))
  return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


# --- Hinge and IPO, as diffusers' train_diffusion_dpo.py (β here = 2 × its --beta_dpo) ---


def test_hinge_hand_derived_value_and_gradient():
  beta = 3.0  # inside = β/2 · margin = 1.5, −0.75, 0: one pair past the hinge, no kink hit.
  inside = beta / 2 * HAND_MARGINS
  loss, metrics, grad = _evaluate(
      lambda e: losses.hinge_loss(e, jnp.array(HAND_REFERENCE), beta), HAND_POLICY)
  assert loss == pytest.approx(np.mean(np.maximum(0, 1 - inside)), rel=1e-6)  # 2.75/3
  assert metrics["implicit_acc"] == pytest.approx(1.5 / 3)
  assert metrics["reward_margin"] == pytest.approx(np.mean(HAND_MARGINS), rel=1e-6)
  # ∂/∂L_w = β/2 · [inside < 1] / B, the loser's the opposite: the satisfied pair 0 gets none.
  winners = beta / 2 * (inside < 1) / PAIRS
  np.testing.assert_allclose(grad, np.concatenate([winners, -winners]), rtol=1e-6)


def test_ipo_hand_derived_value_and_gradient_pull_the_margin_to_one_over_beta():
  target = 1 / HAND_BETA  # 0.5
  loss, metrics, grad = _evaluate(
      lambda e: losses.ipo_loss(e, jnp.array(HAND_REFERENCE), HAND_BETA), HAND_POLICY)
  assert loss == pytest.approx(np.mean((HAND_MARGINS - target)**2), rel=1e-6)  # 0.5
  assert metrics["implicit_acc"] == pytest.approx(1.5 / 3)
  # ∂/∂L_w = −2 (margin − 1/β) / B: pairs 1 and 2 (margin below 1/β) push the winner's error
  # down and the loser's up; pair 0, past the target, pushes them back.
  winners = -2 * (HAND_MARGINS - target) / PAIRS
  np.testing.assert_allclose(grad, np.concatenate([winners, -winners]), rtol=1e-6)
  assert grad[1] > 0 and grad[2] > 0 and grad[0] < 0


def _official_diffusers_loss(model_pred, ref_preds, target, args):
  """train_diffusion_dpo.py from "Compute losses." to `implicit_acc`, line for line; the ipo
  branch's undefined `args.beta` read as its one β, `args.beta_dpo`."""
  model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
  model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
  model_losses_w, model_losses_l = model_losses.chunk(2)
  model_diff = model_losses_w - model_losses_l
  with torch.no_grad():
    ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
  logits = ref_diff - model_diff
  if args.loss_type == "sigmoid":
    loss = -1 * F.logsigmoid(args.beta_dpo * logits).mean()
  elif args.loss_type == "hinge":
    loss = torch.relu(1 - args.beta_dpo * logits).mean()
  elif args.loss_type == "ipo":
    losses_ = (logits - 1 / (2 * args.beta_dpo)) ** 2
    loss = losses_.mean()
  implicit_acc = (logits > 0).sum().float() / logits.size(0)
  implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
  return loss, implicit_acc


def _predictions(seed: int, samples: int, spread: float):
  """(policy prediction, reference prediction, target) [samples, 4, 6, 6], float32: each
  prediction `spread` away from the one before, close enough that no loss saturates."""
  rng = np.random.default_rng(seed)
  target = rng.standard_normal((samples, 4, 6, 6)).astype(np.float32)
  reference = target + spread * rng.standard_normal(target.shape).astype(np.float32)
  policy = reference + spread * rng.standard_normal(target.shape).astype(np.float32)
  return policy, reference, target


def _torch_value_and_grad(official, policy, *others):
  prediction = torch.tensor(policy, requires_grad=True)
  loss, *rest = official(prediction, *map(torch.from_numpy, others))
  loss.backward()
  return loss.item(), [r.item() for r in rest], prediction.grad.numpy()


def _our_value_and_grad(loss_of_errors, policy, target):
  """`_evaluate` with respect to the prediction, through `per_sample_error`."""
  return _evaluate(
      lambda prediction: loss_of_errors(losses.per_sample_error(prediction, jnp.asarray(target))),
      policy)


@pytest.mark.parametrize("loss_type, ours", [("sigmoid", losses.dpo_loss),
                                             ("hinge", losses.hinge_loss),
                                             ("ipo", losses.ipo_loss)])
def test_pair_losses_equal_diffusers_example_at_half_the_beta(loss_type, ours):
  """Our β = 5000 is diffusers' --beta_dpo 2500, for every loss type; 'sigmoid' is DPO."""
  beta = 5000.0
  policy, reference, target = _predictions(seed=0, samples=2 * 5, spread=0.05)
  args = types.SimpleNamespace(loss_type=loss_type, beta_dpo=beta / 2)
  expected, (accuracy,), expected_grad = _torch_value_and_grad(
      lambda p, r, t: _official_diffusers_loss(p, r, t, args), policy, reference, target)
  reference_errors = losses.per_sample_error(jnp.asarray(reference), jnp.asarray(target))
  loss, metrics, grad = _our_value_and_grad(lambda e: ours(e, reference_errors, beta),
                                            policy, target)
  inside = beta / 2 * np.asarray(losses.implicit_margins(
      losses.per_sample_error(jnp.asarray(policy), jnp.asarray(target)), reference_errors))
  assert 0.05 < np.abs(inside).min() and np.abs(inside).max() < 5, inside  # Not saturated.
  if loss_type == "hinge":
    assert (inside < 1).any() and (inside > 1).any(), inside  # Both sides of the hinge.
  assert 0 < accuracy < 1
  assert loss == pytest.approx(expected, rel=1e-5)
  assert metrics["implicit_acc"] == pytest.approx(accuracy)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4,
                             atol=1e-4 * np.abs(expected_grad).max())


# --- MaPO, reference-free (mapo-t2i/mapo) ---

MAPO = dict(beta=0.1, snr=0.5, num_train_timesteps=1000)  # The official defaults, T of SD.
# Winners then losers: pair 0 ranked right, pair 1 wrong, pair 2 tied; T·Δs is O(1).
MAPO_ERRORS = [0.1, 0.5, 0.3, 0.104, 0.497, 0.3]


def _mapo_by_hand(errors, beta, snr, num_train_timesteps):
  """loss, per-pair T·Δs and the gradient w.r.t. [L_w, L_l], from the formula in float64."""
  errors = np.asarray(errors, np.float64)
  x = snr * errors
  score = x / (np.exp(x) - 1)
  dscore = snr * (np.exp(x) - 1 - x * np.exp(x)) / (np.exp(x) - 1)**2  # ds/dL
  winners, losers = np.split(np.arange(len(errors)), 2)
  logits = num_train_timesteps * (score[winners] - score[losers])
  loss = errors[winners].mean() - beta * np.mean(np.log(sigmoid(logits)))
  pull = beta * sigmoid(-logits) * num_train_timesteps / len(winners)
  grad_w = 1 / len(winners) - pull * dscore[winners]
  grad_l = pull * dscore[losers]
  return loss, logits, np.concatenate([grad_w, grad_l])


def test_mapo_hand_derived_value_gradient_and_metrics():
  expected, logits, expected_grad = _mapo_by_hand(MAPO_ERRORS, **MAPO)
  assert 0.1 < np.abs(logits[:2]).min() and np.abs(logits).max() < 3 and logits[2] == 0
  loss, metrics, grad = _evaluate(lambda e: losses.mapo_loss(e, **MAPO), MAPO_ERRORS)
  assert loss == pytest.approx(expected, rel=1e-5)
  assert metrics["implicit_acc"] == pytest.approx(1.5 / 3)
  assert metrics["score_margin"] == pytest.approx(
      logits.mean() / MAPO["num_train_timesteps"], rel=1e-3)
  # s(L_w) − s(L_l) cancels digits of two float32 scores near 1: T·Δs carries ~1e-4.
  assert metrics["margin_loss"] == pytest.approx(
      expected - np.mean(MAPO_ERRORS[:3]), rel=1e-4)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4)
  # Every winner's error is pushed down, every loser's up, even the tied pair's.
  assert (grad[:3] > 0).all() and (grad[3:] < 0).all()
  assert float(losses.mapo_score(jnp.array(1e-6), 0.5)) == pytest.approx(1.0, abs=1e-6)


def _official_mapo_loss(args, noise_scheduler, model_pred, target, dtype=torch.float32):
  """mapo-t2i/mapo utils.py `compute_loss`, line for line, its `.float()` as `.to(dtype)`."""
  model_losses = F.mse_loss(model_pred.to(dtype), target.to(dtype), reduction="none")
  model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
  model_losses_w, model_losses_l = model_losses.chunk(2)
  log_odds = (args.snr_value * model_losses_w) / (
      torch.exp(args.snr_value * model_losses_w) - 1) - (
      args.snr_value * model_losses_l
  ) / (torch.exp(args.snr_value * model_losses_l) - 1)
  ratio = F.logsigmoid(log_odds * noise_scheduler.config.num_train_timesteps)
  ratio_losses = args.beta_mapo * ratio
  loss = model_losses_w.mean() - ratio_losses.mean()
  return loss, model_losses_w, model_losses_l, ratio_losses


def test_mapo_equals_the_official_compute_loss():
  """Against the official code run in float64, value and gradient. In float32, as it runs,
  its exp(x) − 1 loses digits near x = 0 that T = 1000 multiplies: it is 2e-3 off the exact
  value where ours (expm1, float32) is 1e-5 off."""
  policy, _, target = _predictions(seed=1, samples=2 * 4, spread=0.1)
  args = types.SimpleNamespace(snr_value=MAPO["snr"], beta_mapo=MAPO["beta"])
  scheduler = types.SimpleNamespace(config=types.SimpleNamespace(num_train_timesteps=1000))
  prediction = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
  official = lambda p, dtype: _official_mapo_loss(args, scheduler, p, torch.from_numpy(target),
                                                  dtype)
  loss, _, _, ratio_losses = official(prediction, torch.float64)
  loss.backward()
  ours, metrics, grad = _our_value_and_grad(lambda e: losses.mapo_loss(e, **MAPO), policy,
                                            target)
  assert ours == pytest.approx(loss.item(), rel=1e-4)
  assert ours == pytest.approx(official(torch.from_numpy(policy), torch.float32)[0].item(),
                               rel=5e-3)
  assert metrics["margin_loss"] == pytest.approx(-ratio_losses.mean().item(), rel=1e-3)
  assert 0 < metrics["implicit_acc"] < 1
  expected_grad = prediction.grad.numpy()
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-3,
                             atol=1e-3 * np.abs(expected_grad).max())


# --- Diffusion-KTO (jacklishufan/diffusion-kto) ---

KTO_POLICY = [1.0, 0.5, 0.75, 2.0]
KTO_REFERENCE = [1.25, 0.5, 0.5, 2.5]  # Rewards r = ref − policy = 0.25, 0, −0.25, 0.5.
KTO_LIKED = [True, False, True, False]
KTO = dict(beta=4.0, lambda_desirable=1.0, lambda_undesirable=2.0)


def _kto_by_hand(policy, reference, liked, beta, lambda_desirable, lambda_undesirable):
  rewards = np.asarray(reference, np.float64) - np.asarray(policy, np.float64)
  point = max(rewards.mean(), 0.0)
  signs = np.where(liked, 1.0, -1.0)
  signed = beta * signs * (rewards - point)
  weights = np.where(liked, lambda_desirable, lambda_undesirable)
  loss = np.mean(weights * (1 - sigmoid(signed)))
  # z carries no gradient: ∂/∂L_i = λ_i β y_i σ(s_i)(1 − σ(s_i)) / N.
  grad = weights * beta * signs * sigmoid(signed) * (1 - sigmoid(signed)) / len(rewards)
  return loss, point, signed, grad


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_kto_hand_derived_value_reference_point_and_gradient(shift):
  """shift 0: mean reward 0.125, the reference point; shift 1 lowers every reward by 1, so
  the mean is < 0 and the point clips to 0."""
  policy = np.array(KTO_POLICY) + shift
  expected, point, signed, expected_grad = _kto_by_hand(policy, KTO_REFERENCE, KTO_LIKED, **KTO)
  assert point == (0.125 if shift == 0 else 0.0)
  loss, metrics, grad = _evaluate(
      lambda e: losses.kto_loss(e, jnp.array(KTO_REFERENCE), jnp.array(KTO_LIKED), **KTO), policy)
  assert loss == pytest.approx(expected, rel=1e-6)
  assert metrics["kto_reference_point"] == pytest.approx(point)
  assert metrics["implicit_acc"] == pytest.approx(np.mean(signed > 0))
  rewards = np.array(KTO_REFERENCE) - policy - point
  assert metrics["reward_desirable"] == pytest.approx(rewards[[0, 2]].mean())
  assert metrics["reward_undesirable"] == pytest.approx(rewards[[1, 3]].mean())
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5)
  # Descent lowers every liked image's error and raises every disliked one's.
  assert (grad[[0, 2]] > 0).all() and (grad[[1, 3]] < 0).all()


def test_kto_at_step_one_is_half_with_half_the_samples_right():
  errors = jnp.array(KTO_POLICY)
  loss, metrics = losses.kto_loss(errors, errors, jnp.array(KTO_LIKED), beta=1000.0)
  assert float(loss) == 0.5 and float(metrics["implicit_acc"]) == 0.5
  assert float(metrics["kto_reference_point"]) == 0.0


def _official_kto_loss(model_losses, ref_loss, labels, args, reduce=lambda x: x):
  """train_kto_sd_v1.5.py from `policy_KL_logps` to `loss` with --loss kto --halo sigmoid
  --bce_offset none, line for line; `reduce` stands for accelerator.reduce(mean)."""
  policy_KL_logps = -model_losses
  reference_KL_logps = -ref_loss
  g_term = policy_KL_logps - reference_KL_logps
  scale_term = args.beta_dpo
  label_sgn = 2 * labels - 1
  labels_binary = labels == 1
  kl_gpu = g_term.mean().detach()
  kl = reduce(kl_gpu)
  kl = kl.clamp(min=0).detach()
  g_term = g_term - kl
  label_scale_g = label_sgn * scale_term * g_term
  h = torch.sigmoid(label_scale_g)
  w_y = args.lambda_d_kto * labels_binary + args.lambda_u_kto * ~labels_binary
  l_kto = w_y * (1 - h)
  return l_kto.mean()


def test_kto_equals_the_official_code_on_one_process_and_on_two():
  """One process: the official loss and its gradient. Two processes (each half the batch,
  the reference point averaged by accelerator.reduce, the gradients by DDP): the same loss
  and gradient as ours over the whole global batch."""
  # The policy nearer the targets than the reference: a positive reference point.
  reference, policy, target = _predictions(seed=2, samples=8, spread=0.03)
  liked = np.array([1, 0, 0, 1, 1, 0, 1, 1])
  args = types.SimpleNamespace(beta_dpo=1000, lambda_d_kto=1.0, lambda_u_kto=1.5)
  errors = lambda p, t: ((p.float() - t.float())**2).mean(dim=[1, 2, 3])
  prediction = torch.tensor(policy, requires_grad=True)
  reference_errors = errors(torch.from_numpy(reference), torch.from_numpy(target))
  model_losses = errors(prediction, torch.from_numpy(target))
  loss = _official_kto_loss(model_losses, reference_errors, torch.from_numpy(liked), args)
  loss.backward()
  one_process_grad = prediction.grad.numpy().copy()

  halves = [slice(0, 4), slice(4, 8)]
  point = torch.stack([(reference_errors[h] - model_losses[h]).mean() for h in halves]).mean()
  prediction.grad = None
  two = [_official_kto_loss(errors(prediction[h], torch.from_numpy(target[h])),
                            reference_errors[h], torch.from_numpy(liked[h]), args,
                            reduce=lambda _: point.detach()) for h in halves]
  two_loss = sum(two) / 2
  two_loss.backward()  # DDP averages the two processes' gradients.
  two_process_grad = prediction.grad.numpy()

  ours, metrics, grad = _our_value_and_grad(
      lambda e: losses.kto_loss(e, jnp.asarray(reference_errors.numpy()), jnp.asarray(liked == 1),
                                beta=1000.0, lambda_desirable=1.0, lambda_undesirable=1.5),
      policy, target)
  assert 0.05 < ours < 1.2 and 0 < metrics["implicit_acc"] < 1
  assert metrics["kto_reference_point"] > 0  # The clip is not what decides here.
  for expected, expected_grad in ((loss.item(), one_process_grad),
                                  (two_loss.item(), two_process_grad)):
    assert ours == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4,
                               atol=1e-4 * np.abs(expected_grad).max())
  assert math.isclose(metrics["kto_reference_point"], point.item(), rel_tol=1e-5)


def test_mapo_and_kto_without_a_learning_rate_are_refused_in_one_line():
  """The recipe's inverse-β learning rate is DPO's β; MaPO and KTO ask for optim.peak_lr."""
  config = default_config.get_config()
  config.data.format = "synthetic"
  for name in ("mapo", "kto"):
    config.dpo.loss = name
    with pytest.raises(UserError, match=rf"dpo.loss='{name}' has no learning-rate recipe; "
                       r"set --config.optim.peak_lr"):
      config_checks.check_config(config)
  config.dpo.loss = "hinge"  # DPO's β, DPO's recipe.
  config_checks.check_config(config)
  config.dpo.loss = "orpo"
  with pytest.raises(UserError, match="use one of dpo, sft, hinge, ipo, mapo, kto"):
    config_checks.check_config(config)


# --- Each loss through the real train step (`train.build_program`) ---


class _Denoiser(nn.Module):
  """A one-conv stand-in for the UNet: the step, its loss wiring, state and optimiser are
  the real ones, and it compiles in a second where the tiny UNet takes ten (the UNet's
  own training is tested with DPO and SFT, which see the same per-image errors)."""

  @nn.compact
  def __call__(self, noisy, timesteps, context):
    del timesteps  # The winners' channel-0 offset is learnable without them.
    return nn.Conv(noisy.shape[-1], (3, 3))(noisy) + nn.Dense(noisy.shape[-1])(
        context.mean(axis=1))[:, None, None, :]


@pytest.fixture(scope="module")
def stand_in():
  """The synthetic config at the smoke tests' size, the stand-in models and one batch of 4
  synthetic pairs (winners' latents have a positive channel-0 mean, losers' a negative)."""
  config = tiny_config.synthetic_config()
  config.train.batch_pairs = 4
  config.optim.peak_lr = 1e-3
  denoiser = _Denoiser()
  batch = synthetic.synthetic_pairs(np.arange(4), seed=0, latent_size=4, channels=4,
                                    context_length=3, context_dim=8)
  params = denoiser.init(jax.random.key(0), batch["latents"][:, 0], jnp.zeros(4),
                         batch["context"])["params"]
  models = train.Models(denoiser, params, diffusion.NoiseSchedule.from_scheduler_config(
      diffusion.DEFAULT_SCHEDULER))
  return config, models, batch


def _steps(stand_in, loss_name: str, count: int = 5, **dpo) -> tuple[list[dict], object]:
  """`count` steps of the run's train step on the same batch (each step's metrics are those
  of the params before its update), and the state's reference params at the start."""
  config, models, host_batch = stand_in
  config = config.copy_and_resolve_references()
  config.dpo.update(dict(loss=loss_name, **dpo))
  config_checks.check_config(config)
  state, program = train.build_program(config, models,
                                       parallel.make_mesh(-1, 1, jax.devices()[:1]))
  reference = state.reference_params
  batch = program.step_input(host_batch)
  records = []
  for _ in range(count):
    state, metrics = program.step_fn(state, batch)
    records.append({k: float(v) for k, v in metrics.items()})
  assert all(np.isfinite(list(r.values())).all() for r in records), records
  assert records[0]["grad_norm"] > 0
  return records, reference


@pytest.mark.slow
@pytest.mark.parametrize("loss_name, dpo", [("hinge", {"beta": 50.0}), ("mapo", {}),
                                            ("kto", {"kto_beta": 10.0})])
def test_loss_falls_through_the_train_step(stand_in, loss_name, dpo):
  """β lowered so that the loss does not saturate within the 5 steps."""
  records, reference = _steps(stand_in, loss_name, **dpo)
  losses_ = [r["loss"] for r in records]
  assert all(after < before for before, after in zip(losses_, losses_[1:])), losses_
  if loss_name == "mapo":  # No reference model: none in the state, none in the metrics.
    assert reference is None and "reference_error_winner" not in records[0]
    assert records[-1]["score_margin"] > records[0]["score_margin"]
  elif loss_name == "hinge":  # Policy = reference at step 1: every pair at inside = 0.
    assert losses_[0] == 1.0 and records[0]["implicit_acc"] == 0.5
  else:  # KTO at step 1: every reward 0, so the loss is ½ and the reference point 0.
    assert losses_[0] == 0.5 and records[0]["kto_reference_point"] == 0.0
    assert records[-1]["reward_desirable"] > records[-1]["reward_undesirable"]


@pytest.mark.slow
def test_ipo_moves_the_margin_towards_one_over_beta_through_the_train_step(stand_in):
  """IPO's loss starts at (0 − 1/β)²; its steps raise the mean margin towards 1/β."""
  records, _ = _steps(stand_in, "ipo", beta=50.0)
  assert records[0]["loss"] == pytest.approx(1 / 50.0**2, rel=1e-6)
  margins = [r["reward_margin"] for r in records]
  assert margins[0] == 0.0 and 0 < margins[-1], margins
  assert records[-1]["loss"] < records[0]["loss"]
