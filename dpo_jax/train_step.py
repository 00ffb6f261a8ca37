"""The jitted Diffusion-DPO update: one function of (state, batch), state donated."""
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import diffusion, loss as losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # The policy: trained, float32 master weights.
  reference_params: Any  # The frozen reference: never differentiated nor seen by the optimiser.
  opt_state: Any


def pair_noise(seed: int, pair_ids: jax.Array, latent_shape: tuple[int, ...],
               num_train_timesteps: int) -> tuple[jax.Array, jax.Array]:
  """One (t, ε) per pair from a key folded from (seed, pair id): independent of the step,
  the device count and the batch layout, so runs are reproducible across all of them."""
  def draw(pair_id):
    key_t, key_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), pair_id))
    t = jax.random.randint(key_t, (), 0, num_train_timesteps)
    return t, jax.random.normal(key_noise, latent_shape, jnp.float32)
  return jax.vmap(draw)(pair_ids)


def make_train_step(model, schedule: diffusion.NoiseSchedule, optimizer: optax.GradientTransformation,
                    *, beta: float, loss_name: str, seed: int) -> Callable:
  """`step(state, batch) -> (state, metrics)`; batch holds latents [2B,H,W,C] (winners first),
  context [B,T,D] and pair_ids [B]."""

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    latents = batch["latents"]
    timesteps, noise = pair_noise(seed, batch["pair_ids"], latents.shape[1:],
                                  schedule.num_train_timesteps)
    # Winner and loser of a pair share (t, ε) and the prompt.
    timesteps, noise = jnp.concatenate([timesteps] * 2), jnp.concatenate([noise] * 2)
    context = jnp.concatenate([batch["context"]] * 2)
    noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
    target = diffusion.training_target(schedule, latents, noise, timesteps)
    predict = lambda params: model.apply({"params": params}, noisy, timesteps, context)
    reference_errors = losses.per_sample_error(predict(state.reference_params), target)

    def loss_fn(params):
      policy_errors = losses.per_sample_error(predict(params), target)
      if loss_name == "sft":
        return losses.sft_loss(policy_errors)
      return losses.dpo_loss(policy_errors, reference_errors, beta)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, donate_argnums=0)
