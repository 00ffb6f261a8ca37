"""dpo_jax.loss against the official Diffusion-DPO training loss (SalesforceAIResearch/
DiffusionDPO train.py, re-implemented below in PyTorch from its formula) on tiny diffusers
UNets, plus hand-derived values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import tiny_models
from dpo_jax import diffusion, loss as losses, precision
from dpo_jax.models import unet as unet_lib, weights

SD15_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# Small enough that σ(inside) stays away from 0 and 1 (|inside| < 2.1 here), so the loss and its
# gradient respond to every pair's errors; paper-sized β saturates tiny random models.
BETA = 25.0
PAIRS = 3  # Odd, so implicit accuracy ≠ ½ and a winner/loser swap shows in it too.


def _official_dpo_loss(unet, ref_unet, noisy_latents, timesteps, encoder_hidden_states, target,
                       beta):
  """train.py's `args.train_method == 'dpo'` branch, line for line (plus the reward margin,
  which the README defines as mean(inside)/β·2)."""
  model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
  model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
  model_losses_w, model_losses_l = model_losses.chunk(2)
  model_diff = model_losses_w - model_losses_l
  with torch.no_grad():
    ref_pred = ref_unet(noisy_latents, timesteps, encoder_hidden_states).sample.detach()
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
  scale_term = -0.5 * beta
  inside_term = scale_term * (model_diff - ref_diff)
  implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
  loss = -1 * F.logsigmoid(inside_term).mean()
  return loss, implicit_acc, inside_term.mean() / beta * 2, inside_term


def _inputs(seed=0, size=8, tokens=5):
  """Winners first; ε, t and the prompt drawn once per pair and repeated for the losers, as
  train.py does (`noise.chunk(2)[0].repeat(2, 1, 1, 1)`)."""
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2 * PAIRS, 4, size, size), np.float32)
  noise = np.tile(rng.standard_normal((PAIRS, 4, size, size), np.float32), (2, 1, 1, 1))
  timesteps = np.tile(np.array([17, 480, 951]), 2)
  context = np.tile(rng.standard_normal((PAIRS, tokens, 32), np.float32), (2, 1, 1))
  return latents, noise, timesteps, context


def _torch_side(policy, reference, prediction_type):
  latents, noise, timesteps, context = map(torch.from_numpy, _inputs())
  scheduler = DDPMScheduler(**SD15_SCHEDULE, prediction_type=prediction_type)
  noisy = scheduler.add_noise(latents, noise, timesteps)
  target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                            timesteps)
  policy.zero_grad()
  loss, acc, margin, inside = _official_dpo_loss(policy, reference, noisy, timesteps, context,
                                                 target, BETA)
  loss.backward()
  grads = {name: p.grad.numpy().copy() for name, p in policy.named_parameters()}
  reference_grads = [p.grad for p in reference.parameters()]
  policy.zero_grad()
  return loss.item(), acc.item(), margin.item(), inside.detach().numpy(), grads, reference_grads


def _our_inputs(prediction_type):
  latents, noise, timesteps, context = _inputs()
  nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))
  latents, noise, timesteps = nhwc(latents), nhwc(noise), jnp.asarray(timesteps, jnp.int32)
  schedule = diffusion.NoiseSchedule.from_scheduler_config(
      {**SD15_SCHEDULE, "prediction_type": prediction_type})
  noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
  target = diffusion.training_target(schedule, latents, noise, timesteps)
  return noisy, timesteps, jnp.asarray(context), target


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
  """Once JAX is loaded, torch's 2-thread CPU kernels stall for seconds on these tiny tensors."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
  policy = tiny_models.make_unet(tiny_models.SD15_UNET, seed=0)
  reference = tiny_models.make_unet(tiny_models.SD15_UNET, seed=1)
  for p in reference.parameters():
    p.requires_grad_(False)  # Frozen, as train.py's ref_unet.
  folder = tmp_path_factory.mktemp("unets")
  policy.save_pretrained(folder / "policy")
  reference.save_pretrained(folder / "reference")
  model, policy_params = unet_lib.load_unet(str(folder / "policy"))
  _, reference_params = unet_lib.load_unet(str(folder / "reference"))
  return policy, reference, model, policy_params, reference_params


@pytest.fixture(scope="module")
def our_loss_and_grads(unets):
  """jit(value_and_grad) of dpo_loss w.r.t. BOTH the policy and the reference params, the
  reference's errors computed inside the differentiated function: its gradient must be zero."""
  model = unets[2]

  def loss_fn(policy_params, reference_params, noisy, timesteps, context, target):
    predict = lambda params: model.apply({"params": params}, noisy, timesteps, context)
    return losses.dpo_loss(losses.per_sample_error(predict(policy_params), target),
                           losses.per_sample_error(predict(reference_params), target), BETA)

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpo_loss_and_gradient_match_official_code(unets, our_loss_and_grads, prediction_type):
  policy, reference, _, policy_params, reference_params = unets
  loss, acc, margin, inside, grads, reference_grads = _torch_side(policy, reference,
                                                                  prediction_type)
  assert np.abs(inside).max() < 3 and np.abs(inside).min() > 0.1  # Not saturated, no ties.
  assert 0 < acc < 1

  (our_loss, metrics), (our_grads, our_reference_grads) = our_loss_and_grads(
      policy_params, reference_params, *_our_inputs(prediction_type))
  assert float(our_loss) == pytest.approx(loss, rel=1e-5)
  assert float(metrics["loss"]) == float(our_loss)
  assert float(metrics["implicit_acc"]) == pytest.approx(acc, abs=1e-7)
  # The margin is a mean of terms of both signs: its error is relative to their size.
  scale = float(np.abs(inside).mean()) / BETA * 2
  assert float(metrics["reward_margin"]) == pytest.approx(margin, rel=0, abs=1e-5 * scale)

  ours = weights.params_to_state_dict(our_grads)
  assert set(ours) == set(grads)
  error = math.sqrt(sum(np.sum((ours[k] - grads[k]).astype(np.float64)**2) for k in grads))
  norm = math.sqrt(sum(np.sum(g.astype(np.float64)**2) for g in grads.values()))
  assert norm > 0
  assert error / norm <= 1e-4, error / norm

  assert all(g is None for g in reference_grads)
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(our_reference_grads))


def test_identical_models_give_ln2_half_accuracy_zero_margin(unets):
  """At the start of training the policy IS the reference: every pair is a tie. Exactly so
  when both go through one compiled body (`precision.policy_and_reference`, the step's
  shared pass); two passes compiled apart may round differently (README, "Precision")."""
  _, _, model, policy_params, _ = unets
  copy = jax.tree_util.tree_map(np.copy, policy_params)

  @jax.jit
  def loss_fn(policy_params, reference_params, noisy, timesteps, context, target):
    errors = lambda params: losses.per_sample_error(
        model.apply({"params": params}, noisy, timesteps, context), target)
    return losses.dpo_loss(*precision.policy_and_reference(errors, policy_params,
                                                           reference_params), BETA)

  loss, metrics = loss_fn(policy_params, copy, *_our_inputs("epsilon"))
  assert float(loss) == np.float32(math.log(2))
  assert float(metrics["implicit_acc"]) == 0.5
  assert float(metrics["reward_margin"]) == 0.0
  assert metrics["policy_error_winner"] == metrics["reference_error_winner"]
  assert metrics["policy_error_loser"] == metrics["reference_error_loser"]


def test_equal_errors_give_ln2_exactly():
  errors = jnp.array([0.3, 1.7, 0.2, 0.9, 2.5, 0.4], jnp.float32)
  loss, metrics = losses.dpo_loss(errors, errors, beta=5000.0)
  assert float(loss) == np.float32(math.log(2))
  assert float(metrics["implicit_acc"]) == 0.5
  assert float(metrics["reward_margin"]) == 0.0


# Three pairs (winners first), dyadic values so differences are exact in float32:
#   pair 0: policy Δ = 1 − 2 = −1,      reference Δ = 1 − 1 = 0,          inside = −β/2·(−1) = 1
#   pair 1: policy Δ = 0.5 − 0.5 = 0,   reference Δ = 0.25 − 0.75 = −0.5, inside = −β/2·0.5 = −0.5
#   pair 2: policy Δ = 0.75 − 0.5,      reference Δ = 0.5 − 0.25,         inside = 0 (a tie)
HAND_POLICY = [1.0, 0.5, 0.75, 2.0, 0.5, 0.5]
HAND_REFERENCE = [1.0, 0.25, 0.5, 1.0, 0.75, 0.25]
HAND_BETA = 2.0
HAND_INSIDE = np.array([1.0, -0.5, 0.0])


def test_hand_derived_values():
  loss, metrics = losses.dpo_loss(jnp.array(HAND_POLICY), jnp.array(HAND_REFERENCE), HAND_BETA)
  softplus = lambda x: math.log1p(math.exp(x))
  expected_loss = (softplus(-1.0) + softplus(0.5) + math.log(2)) / 3  # −log σ(x) = softplus(−x)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
  assert float(metrics["implicit_acc"]) == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-7)
  assert float(metrics["reward_margin"]) == pytest.approx((0.5 / 3) / HAND_BETA * 2, rel=1e-6)
  assert float(metrics["policy_error_winner"]) == pytest.approx(0.75)
  assert float(metrics["policy_error_loser"]) == pytest.approx(1.0)
  assert float(metrics["reference_error_winner"]) == pytest.approx(1.75 / 3)
  assert float(metrics["reference_error_loser"]) == pytest.approx(2.0 / 3)


def test_hand_derived_gradient():
  """∂loss/∂L_w,i = β/2 · σ(−inside_i) / B and ∂loss/∂L_l,i = −∂loss/∂L_w,i: lowering a
  winner's error (raising a loser's) lowers the loss."""
  grad = jax.grad(lambda e: losses.dpo_loss(e, jnp.array(HAND_REFERENCE), HAND_BETA)[0])(
      jnp.array(HAND_POLICY))
  sigmoid = 1 / (1 + np.exp(HAND_INSIDE))
  winners = HAND_BETA / 2 * sigmoid / 3
  np.testing.assert_allclose(grad, np.concatenate([winners, -winners]), rtol=1e-6)


def test_beta_convention_has_the_half_inside():
  """β here = 2 × the β of diffusers' train_diffusion_dpo.py: a policy Δ of −1 at β=2 gives
  inside = 1, so the loss is softplus(−1)."""
  loss, _ = losses.dpo_loss(jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]), beta=2.0)
  assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_reference_gets_no_gradient_even_when_differentiated():
  """A caller that differentiates through reference_errors (or shares parameters between
  the two) still gets the policy-only gradient."""
  policy, reference = jnp.array(HAND_POLICY), jnp.array(HAND_REFERENCE)
  loss = lambda p, r: losses.dpo_loss(p, r, HAND_BETA)[0]
  grad_reference = jax.grad(loss, argnums=1)(policy, reference)
  assert grad_reference.shape == reference.shape and not np.any(grad_reference)

  # Both errors from one parameter θ: only the policy's dependence on θ counts.
  shared = lambda theta: loss(theta * policy, theta**2 * reference)
  policy_only = lambda theta: loss(theta * policy, reference)
  assert float(jax.grad(shared)(1.0)) == float(jax.grad(policy_only)(1.0)) != 0.0


def test_sft_loss_is_the_mean_winner_error():
  errors = jnp.array([0.5, 1.5, 0.25])
  loss, metrics = losses.sft_loss(errors)
  assert float(loss) == pytest.approx(0.75)
  assert set(metrics) == {"loss", "policy_error_winner"}
  assert float(metrics["policy_error_winner"]) == pytest.approx(0.75)
  grad = jax.grad(lambda e: losses.sft_loss(e)[0])(errors)
  np.testing.assert_allclose(grad, [1 / 3] * 3, rtol=1e-6)


def test_sft_matches_official_mse_on_winners():
  """train.py's SFT branch: F.mse_loss(model_pred, target) over a batch of winners only."""
  rng = np.random.default_rng(1)
  prediction, target = rng.standard_normal((2, 6, 4, 5, 5), np.float32)
  expected = F.mse_loss(torch.from_numpy(prediction[:3]), torch.from_numpy(target[:3])).item()
  winners = lambda x: jnp.asarray(x[:3])
  loss, _ = losses.sft_loss(losses.per_sample_error(winners(prediction), winners(target)))
  assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_per_sample_error_is_float32_mean_over_all_but_batch():
  rng = np.random.default_rng(2)
  prediction, target = rng.standard_normal((2, 4, 3, 5, 6), np.float32)
  expected = ((prediction - target)**2).mean(axis=(1, 2, 3))
  errors = losses.per_sample_error(jnp.asarray(prediction, jnp.bfloat16),
                                   jnp.asarray(target, jnp.bfloat16))
  assert errors.dtype == jnp.float32 and errors.shape == (4,)
  np.testing.assert_allclose(errors, expected, rtol=2e-2)
  np.testing.assert_allclose(losses.per_sample_error(prediction, target), expected, rtol=1e-6)
