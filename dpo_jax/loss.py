"""Diffusion-DPO and its SFT baseline as pure functions of per-sample denoising errors.

Batches are 2B samples, winners first then losers, that share one (t, ε) per pair. The
β convention is the paper's and the official code's: the ½ is inside the sigmoid, so
β=5000 here equals β=2500 in diffusers' train_diffusion_dpo.py example.
"""
import jax
import jax.numpy as jnp


def per_sample_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every axis but the first, in float32 (bf16 sums lose digits)."""
  squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(squared, axis=tuple(range(1, squared.ndim)))


def _winners_losers(errors: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.split(errors, 2)


def dpo_loss(policy_errors: jax.Array, reference_errors: jax.Array, beta: float):
  """Paper Eq. 14: −log σ(−β/2 · ((L_w − L_l)_policy − (L_w − L_l)_ref)), mean over pairs.

  Args:
    policy_errors: [2B] per-sample errors of the trained model, winners first.
    reference_errors: [2B] the frozen reference's errors on the same noisy inputs; gradients
      are stopped here so no caller can train the reference by accident.
    beta: the KL-regularisation strength β (> 0).
  Returns:
    (loss, metrics): implicit_acc counts a pair as right when inside > 0 and ½ on a tie
    (inside == 0), as diffusers' DPO example does; the official code counts a tie as wrong,
    so at step 1, where every pair ties, it reports 0 and this reports ½.
  """
  reference_errors = jax.lax.stop_gradient(reference_errors)
  policy_w, policy_l = _winners_losers(policy_errors)
  reference_w, reference_l = _winners_losers(reference_errors)
  inside = 0.5 * beta * implicit_margins(policy_errors, reference_errors)
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  implicit_acc = implicit_accuracy(inside)
  metrics = {
      "loss": loss,
      "implicit_acc": implicit_acc,
      "reward_margin": jnp.mean(inside) / beta * 2,
      "policy_error_winner": jnp.mean(policy_w),
      "policy_error_loser": jnp.mean(policy_l),
      "reference_error_winner": jnp.mean(reference_w),
      "reference_error_loser": jnp.mean(reference_l),
  }
  return loss, metrics


def implicit_margins(policy_errors: jax.Array, reference_errors: jax.Array) -> jax.Array:
  """Per pair [B], the DPO inside term without β/2: −((L_w − L_l)_policy − (L_w − L_l)_ref).
  Positive when the policy prefers the winner more than the reference does."""
  policy_w, policy_l = _winners_losers(policy_errors)
  reference_w, reference_l = _winners_losers(reference_errors)
  return -((policy_w - policy_l) - (reference_w - reference_l))


def implicit_accuracy(margins) -> jax.Array:
  """The share of pairs with a positive margin, a tie (0) counting ½ (as `dpo_loss`)."""
  margins = jnp.asarray(margins)
  return jnp.mean(jnp.where(margins == 0, 0.5, (margins > 0).astype(jnp.float32)))


def sft_loss(winner_errors: jax.Array):
  """The paper's §5.5 supervised baseline: the plain denoising loss on the winners.

  Args:
    winner_errors: [B] per-sample errors of the trained model on the winners alone: the
      step never runs the UNet on the losers, which SFT does not use.
  """
  loss = jnp.mean(winner_errors)
  return loss, {"loss": loss, "policy_error_winner": loss}
