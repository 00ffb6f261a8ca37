"""Diffusion-DPO, its SFT baseline and the other preference losses (`dpo.loss`), as pure
functions of per-sample denoising errors (docs/losses.md compares them).

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
  inside = _inside(policy_errors, reference_errors, beta)
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  return loss, _pair_metrics(loss, inside, policy_errors, reference_errors, beta)


def _inside(policy_errors: jax.Array, reference_errors: jax.Array, beta: float) -> jax.Array:
  """Per pair, DPO's inside term β/2 · margin, with the reference's gradient stopped."""
  return 0.5 * beta * implicit_margins(policy_errors, jax.lax.stop_gradient(reference_errors))


def _pair_metrics(loss, inside, policy_errors, reference_errors, beta) -> dict:
  """What every reference-based pair loss logs, as `dpo_loss` defines it."""
  policy_w, policy_l = _winners_losers(policy_errors)
  reference_w, reference_l = _winners_losers(jax.lax.stop_gradient(reference_errors))
  return {
      "loss": loss,
      "implicit_acc": implicit_accuracy(inside),
      "reward_margin": jnp.mean(inside) / beta * 2,
      "policy_error_winner": jnp.mean(policy_w),
      "policy_error_loser": jnp.mean(policy_l),
      "reference_error_winner": jnp.mean(reference_w),
      "reference_error_loser": jnp.mean(reference_l),
  }


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


def hinge_loss(policy_errors: jax.Array, reference_errors: jax.Array, beta: float):
  """diffusers' train_diffusion_dpo.py `--loss_type hinge` (SLiC-HF's calibration loss,
  Zhao et al. 2023, with margin 1): mean over pairs of max(0, 1 − inside), inside = β/2 ·
  `implicit_margins` as in `dpo_loss`.

  diffusers writes relu(1 − β_d · logits), logits = ref_diff − model_diff (our margin) and
  β_d = --beta_dpo without the ½: β_d = β/2 (its 2500 is 5000 here). A pair whose inside
  term reaches 1 (margin 2/β) no longer contributes. Arguments and metrics as `dpo_loss`.
  """
  inside = _inside(policy_errors, reference_errors, beta)
  loss = jnp.mean(jax.nn.relu(1.0 - inside))
  return loss, _pair_metrics(loss, inside, policy_errors, reference_errors, beta)


def ipo_loss(policy_errors: jax.Array, reference_errors: jax.Array, beta: float):
  """diffusers' train_diffusion_dpo.py `--loss_type ipo` (IPO, Azar et al. 2023, its
  sampled loss (h − 1/(2τ))²): mean over pairs of (margin − 1/β)², margin =
  `implicit_margins`, with no β on it.

  diffusers writes (logits − 1/(2·β_d))², logits = our margin and β_d = β/2, so its target
  margin 1/(2β_d) is 1/β here. (Its branch reads `args.beta`, which its parser never
  defines, so it raises there; --beta_dpo, its one β, is meant, as in TRL's IPO loss.)
  The square pulls every margin to 1/β from both sides: a pair already past it has its
  winner's error pushed back up. Arguments and metrics as `dpo_loss` (inside = β/2 · margin).
  """
  margins = implicit_margins(policy_errors, jax.lax.stop_gradient(reference_errors))
  inside = 0.5 * beta * margins
  loss = jnp.mean(jnp.square(margins - 1.0 / beta))
  return loss, _pair_metrics(loss, inside, policy_errors, reference_errors, beta)


def mapo_score(errors: jax.Array, snr: float) -> jax.Array:
  """MaPO's bounded score of a denoising error L: a·L / (exp(a·L) − 1), a = `snr`; 1 at
  L → 0, falling towards 0 as L grows (expm1 keeps the digits exp(x) − 1 loses near 0)."""
  scaled = snr * errors
  return scaled / jnp.expm1(scaled)


def mapo_loss(policy_errors: jax.Array, *, beta: float, snr: float, num_train_timesteps: int):
  """MaPO (Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion
  Models without Reference", arXiv 2406.06424), reference-free, as its official code
  computes it (mapo-t2i/mapo utils.py `compute_loss`):

    s(L) = a·L / (exp(a·L) − 1)                                  (`mapo_score`, a = snr)
    loss = mean(L_w) − β · mean(log σ(T · (s(L_w) − s(L_l))))

  The first term is the winners' denoising loss (SFT); the second widens the margin between
  the winner's and the loser's scores, multiplied by T = num_train_timesteps as the official
  code does. Its defaults: β = --beta_mapo 0.1, a = --snr_value 0.5.

  Args:
    policy_errors: [2B] per-sample errors of the trained model, winners first; no reference.
    beta, snr, num_train_timesteps: β, a and T above.
  Returns:
    (loss, metrics): implicit_acc is the share of pairs the policy itself ranks right
    (s(L_w) > s(L_l), i.e. L_w < L_l; a tie counts ½), score_margin mean(s(L_w) − s(L_l))
    and margin_loss the second term (the official log's "OR loss").
  """
  policy_w, policy_l = _winners_losers(policy_errors)
  score_margins = mapo_score(policy_w, snr) - mapo_score(policy_l, snr)
  margin_loss = -beta * jnp.mean(jax.nn.log_sigmoid(num_train_timesteps * score_margins))
  loss = jnp.mean(policy_w) + margin_loss
  return loss, {
      "loss": loss,
      "implicit_acc": implicit_accuracy(score_margins),
      "score_margin": jnp.mean(score_margins),
      "margin_loss": margin_loss,
      "policy_error_winner": jnp.mean(policy_w),
      "policy_error_loser": jnp.mean(policy_l),
  }


def kto_loss(policy_errors: jax.Array, reference_errors: jax.Array, desirable: jax.Array, *,
             beta: float, lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0):
  """Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
  arXiv 2404.04465) on unpaired likes and dislikes, as its official code computes it with
  its defaults (jacklishufan/diffusion-kto train_kto_sd_v1.5.py: --loss kto --halo sigmoid
  --bce_offset none):

    r_i = L_ref,i − L_i                  implicit reward (the log-likelihood gain, ≈ −L)
    z = max(0, mean_i r_i)               reference point (KTO's KL estimate), no gradient
    v_i = σ(β · y_i · (r_i − z))         utility, y_i = +1 liked, −1 disliked
    loss = mean_i λ_i · (1 − v_i)        λ_i = lambda_desirable or lambda_undesirable

  β has no ½ (the official --beta_dpo, default 1000, is β here). z is the mean over the
  whole batch, likes and dislikes together, as the official code averages it over every
  process; with gradient accumulation, over each microbatch, as there too.

  Args:
    policy_errors: [N] per-sample errors of the trained model.
    reference_errors: [N] the frozen reference's on the same inputs (gradient stopped).
    desirable: [N] bool, True for a liked image.
    beta, lambda_desirable, lambda_undesirable: β and the λs above.
  Returns:
    (loss, metrics): implicit_acc is the share of samples on the side of z their label
    asks for (a tie ½, so ½ at step 1), kto_reference_point z, and reward_desirable /
    reward_undesirable the mean r − z of each kind (0 when a batch has none).
  """
  reference_errors = jax.lax.stop_gradient(reference_errors)
  rewards = reference_errors - policy_errors
  reference_point = jax.lax.stop_gradient(jnp.maximum(jnp.mean(rewards), 0.0))
  signs = jnp.where(desirable, 1.0, -1.0)
  signed = beta * signs * (rewards - reference_point)
  weights = jnp.where(desirable, lambda_desirable, lambda_undesirable)
  loss = jnp.mean(weights * (1.0 - jax.nn.sigmoid(signed)))
  kind_mean = lambda mask: (jnp.sum(jnp.where(mask, rewards - reference_point, 0.0))
                            / jnp.maximum(jnp.sum(mask), 1))
  return loss, {
      "loss": loss,
      "implicit_acc": implicit_accuracy(signed),
      "kto_reference_point": reference_point,
      "reward_desirable": kind_mean(desirable),
      "reward_undesirable": kind_mean(~desirable),
      "policy_error": jnp.mean(policy_errors),
      "reference_error": jnp.mean(reference_errors),
  }
