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
                    *, beta: float, loss_name: str, seed: int, state_shardings,
                    batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with the given shardings.

  The batch keeps pairs on its leading axis (latents [B, 2, H, W, C] with the winner at index
  0 of axis 1, context [B, T, D], pair_ids [B]) so that each device holds whole pairs and the
  flattening to 2B samples (w0, l0, w1, l1, ...) moves no data between devices.
  """

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    pairs = batch["latents"].shape[0]
    latents = batch["latents"].reshape(2 * pairs, *batch["latents"].shape[2:])
    timesteps, noise = pair_noise(seed, batch["pair_ids"], latents.shape[1:],
                                  schedule.num_train_timesteps)
    # Winner and loser of a pair share (t, ε) and the prompt.
    timesteps, noise, context = (jnp.repeat(x, 2, axis=0)
                                 for x in (timesteps, noise, batch["context"]))
    # The loss wants winners first; reordering a [2B] vector costs nothing.
    winners_first = lambda errors: errors.reshape(pairs, 2).T.reshape(-1)
    noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
    target = diffusion.training_target(schedule, latents, noise, timesteps)
    predict = lambda params: model.apply({"params": params}, noisy, timesteps, context)
    reference_errors = winners_first(
        losses.per_sample_error(predict(state.reference_params), target))

    def loss_fn(params):
      policy_errors = winners_first(losses.per_sample_error(predict(params), target))
      if loss_name == "sft":
        return losses.sft_loss(policy_errors)
      return losses.dpo_loss(policy_errors, reference_errors, beta)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  # Fixed output shardings keep the state's layout step after step, so the donated buffers
  # are reused in place and the step never recompiles.
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
