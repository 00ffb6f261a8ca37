"""The jitted Diffusion-DPO update: one function of (state, frozen, batch), state donated."""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import diffusion, encode, loss as losses
from dpo_jax.models import vae as vae_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # The policy: trained, float32 master weights.
  reference_params: Any  # The frozen reference: never differentiated nor seen by the optimiser.
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Encoders:
  """The frozen modules that turn pixels and token ids into UNet inputs (static in the jit);
  their params travel separately, as the step's `frozen` argument."""
  kind: str  # 'sd' or 'sdxl'.
  vae: vae_lib.AutoencoderKL
  text_encoders: tuple  # Modules, model_index order.
  # SDXL: condition every image on (R, R, 0, 0, R, R) as the official DPO code does, rather
  # than on its real original size and crop (diffusers' convention).
  constant_time_ids: bool = True


def pair_keys(seed: int, epochs: jax.Array, pair_ids: jax.Array) -> jax.Array:
  """One key per pair folded from (seed, epoch, pair id): independent of the step, the device
  count and the batch layout, so runs are reproducible across all of them."""
  fold = lambda epoch, pair: jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), epoch), pair)
  return jax.vmap(fold)(epochs, pair_ids)


def pair_noise(keys: jax.Array, latent_shape: tuple[int, ...],
               num_train_timesteps: int) -> tuple[jax.Array, jax.Array]:
  """(t, ε) per pair, shared by its winner and loser."""
  def draw(key):
    key_t, key_noise = jax.random.split(jax.random.fold_in(key, 0))
    t = jax.random.randint(key_t, (), 0, num_train_timesteps)
    return t, jax.random.normal(key_noise, latent_shape, jnp.float32)
  return jax.vmap(draw)(keys)


def _posterior_samples(encoders: Encoders, mean: jax.Array, logvar: jax.Array,
                       keys: jax.Array) -> jax.Array:
  """[B, 2, h, w, C] moments -> model latents: each image draws its own posterior sample
  (the official code's latent_dist.sample()) from its pair's key, so a cached pair and the
  same pair encoded in the step get the same sample."""
  image_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1)))(keys)
  noise = jax.vmap(jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32)))(
      image_keys, mean)
  latents = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
  return vae_lib.to_model_latents(latents, encoders.vae.config)


def _added_conditions(encoders: Encoders, batch, pooled, resolution: tuple[int, int]) -> dict:
  """SDXL's `text_embeds` and `time_ids` for the [2B] images; {} for SD 1.x/2.x."""
  if encoders.kind != "sdxl":
    return {}
  images = 2 * batch["pair_ids"].shape[0]
  if encoders.constant_time_ids:
    time_ids = jnp.tile(encode.sdxl_time_ids(resolution, (0, 0), resolution), (images, 1))
  else:
    time_ids = encode.sdxl_time_ids(batch["original_size"].reshape(-1, 2),
                                    batch["crop_top_left"].reshape(-1, 2), resolution)
  return {"text_embeds": jnp.repeat(pooled.astype(jnp.float32), 2, axis=0), "time_ids": time_ids}


def _encode_pixels(encoders: Encoders, frozen, batch, keys):
  """Pixels [B, 2, R, R, 3] and token ids -> latents [B, 2, h, w, C], context, added conds."""
  pairs, _, height, width, _ = batch["pixels"].shape
  images = batch["pixels"].reshape(2 * pairs, height, width, 3)
  mean, logvar = encode.encode_images(encoders.vae, frozen["vae"], images)
  moments = (x.reshape(pairs, 2, *x.shape[1:]) for x in (mean, logvar))
  latents = _posterior_samples(encoders, *moments, keys)
  token_ids = [batch[f"input_ids_{i}"] for i in range(len(encoders.text_encoders))]
  prompt_encoders = encode.PromptEncoders(
      encoders.kind, tuple(zip(encoders.text_encoders, frozen["text_encoders"])))
  context, pooled = encode.encode_prompts(prompt_encoders, token_ids)
  added = _added_conditions(encoders, batch, pooled, (height, width))
  return tuple(jax.lax.stop_gradient(x) for x in (latents, context, added))


def _from_cache(encoders: Encoders, batch, keys):
  """A latent-cache batch (`data.latent_cache`): moments and embeddings -> the same inputs
  `_encode_pixels` makes, without the frozen encoders."""
  latents = _posterior_samples(encoders, batch["latent_mean"], batch["latent_logvar"], keys)
  factor = encoders.vae.config.downscale_factor
  resolution = (latents.shape[2] * factor, latents.shape[3] * factor)
  added = _added_conditions(encoders, batch, batch.get("pooled"), resolution)
  return latents, batch["context"].astype(jnp.float32), added


def make_pair_loss(model, schedule: diffusion.NoiseSchedule, *, beta: float, loss_name: str,
                   seed: int, encoders: Encoders | None = None) -> Callable:
  """`pair_loss(params, reference_params, frozen, batch) -> (loss, metrics)` for one batch.

  The batch keeps pairs on its leading axis so that each device holds whole pairs: either
  `pixels` [B, 2, R, R, 3] (winner at index 0 of axis 1) with `input_ids_{i}` [B, L] per text
  encoder (and SDXL's `original_size`, `crop_top_left` [B, 2, 2]), encoded here by the
  frozen `encoders`; or the latent cache's `latent_mean`, `latent_logvar` [B, 2, h, w, C],
  `context` [B, T, D] (and SDXL's `pooled` [B, P]); or ready `latents` [B, 2, h, w, C] and
  `context` [B, T, D]. `pair_ids` (and optional `epochs`) [B] seed each pair's randomness.
  `frozen` holds the encoders' params ({'vae', 'text_encoders'}), needed only for pixels.
  """

  def pair_loss(params, reference_params, frozen, batch):
    pairs = batch["pair_ids"].shape[0]
    epochs = batch.get("epochs", jnp.zeros_like(batch["pair_ids"]))
    keys = pair_keys(seed, epochs, batch["pair_ids"])
    if "pixels" in batch:
      latents, context, added = _encode_pixels(encoders, frozen, batch, keys)
    elif "latent_mean" in batch:
      latents, context, added = _from_cache(encoders, batch, keys)
    else:
      latents, context, added = batch["latents"], batch["context"], {}
    # [B, 2, ...] -> [2B, ...] interleaves w0, l0, w1, l1 without moving data between devices.
    latents = latents.reshape(2 * pairs, *latents.shape[2:])
    timesteps, noise = pair_noise(keys, latents.shape[1:], schedule.num_train_timesteps)
    timesteps, noise, context = (jnp.repeat(x, 2, axis=0) for x in (timesteps, noise, context))
    noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
    target = diffusion.training_target(schedule, latents, noise, timesteps)
    predict = lambda p: model.apply({"params": p}, noisy, timesteps, context, **added)
    # The loss wants winners first; reordering a [2B] vector costs nothing.
    errors = lambda p: losses.per_sample_error(predict(p), target).reshape(pairs, 2).T.reshape(-1)
    if loss_name == "sft":
      return losses.sft_loss(errors(params))
    return losses.dpo_loss(errors(params), errors(reference_params), beta)

  return pair_loss


def make_eval_step(pair_loss: Callable) -> Callable:
  """`eval_step(state, frozen, batch) -> metrics` of the policy against the reference."""
  return jax.jit(lambda state, frozen, batch: pair_loss(
      state.params, state.reference_params, frozen, batch)[1])


def make_train_step(pair_loss: Callable, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, state_shardings, frozen_shardings=None,
                    batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """`step(state, frozen, batch) -> (state, metrics)`, jitted with the given shardings and
  the state donated. `grad_accum` splits the batch into sequential microbatches."""

  def pair_gradients(params, reference_params, frozen, batch):
    (_, metrics), grads = jax.value_and_grad(pair_loss, has_aux=True)(
        params, reference_params, frozen, batch)
    return grads, metrics

  def accumulated_gradients(state: TrainState, frozen, batch):
    if grad_accum == 1:
      return pair_gradients(state.params, state.reference_params, frozen, batch)
    # Microbatch k takes every grad_accum-th pair: [B] -> [B/k, k] -> [k, B/k] keeps each
    # device's pairs on that device, so every microbatch uses all devices.
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                             *x.shape[1:]), 1, 0)
    micro = jax.tree_util.tree_map(split, batch)

    def add(total, microbatch):
      grads, metrics = pair_gradients(state.params, state.reference_params, frozen, microbatch)
      return jax.tree_util.tree_map(jnp.add, total, (grads, metrics)), None

    zeros = jax.eval_shape(lambda: pair_gradients(state.params, state.reference_params, frozen,
                                                  jax.tree_util.tree_map(lambda x: x[0], micro)))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    total, _ = jax.lax.scan(add, zeros, micro)
    # Mean over microbatches = the gradient and metrics of the whole batch (equal sizes).
    return jax.tree_util.tree_map(lambda x: x / grad_accum, total)

  def step(state: TrainState, frozen, batch) -> tuple[TrainState, dict]:
    grads, metrics = accumulated_gradients(state, frozen, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  # Fixed output shardings keep the state's layout step after step, so the donated buffers
  # are reused in place and the step never recompiles.
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
