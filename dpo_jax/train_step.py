"""The jitted Diffusion-DPO update: one function of (state, frozen, batch), state donated."""
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import diffusion, encode, loss as losses, precision
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


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
  """How each pair's (t, ε) is drawn: the official code's noising variants (`diffusion.*`)."""
  timesteps: tuple[int, ...] | None = None  # Draw t uniformly from these; None: all of them.
  offset: float = 0.0  # ε += offset · N(0, 1) per channel (offset noise); ε stays the target.
  input_perturbation: float = 0.0  # The noisy input uses ε + p · N(0, I); the target ε.


def pair_noise(keys: jax.Array, latent_shape: tuple[int, ...], num_train_timesteps: int,
               options: NoiseOptions = NoiseOptions()
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(t, ε, the ε that noises the input) per pair, shared by its winner and loser."""
  def draw(key):
    key_t, key_noise = jax.random.split(jax.random.fold_in(key, 0))
    if options.timesteps:
      allowed = jnp.asarray(options.timesteps, jnp.int32)
      t = allowed[jax.random.randint(key_t, (), 0, len(options.timesteps))]
    else:
      t = jax.random.randint(key_t, (), 0, num_train_timesteps)
    noise = jax.random.normal(key_noise, latent_shape, jnp.float32)
    if options.offset:
      channels = (1,) * (len(latent_shape) - 1) + latent_shape[-1:]
      noise += options.offset * jax.random.normal(jax.random.fold_in(key, 2), channels)
    input_noise = noise
    if options.input_perturbation:
      input_noise = noise + options.input_perturbation * jax.random.normal(
          jax.random.fold_in(key, 3), latent_shape)
    return t, noise, input_noise
  return jax.vmap(draw)(keys)


def _posterior_samples(encoders: Encoders, mean: jax.Array, logvar: jax.Array,
                       keys: jax.Array) -> jax.Array:
  """[B, k, h, w, C] moments (k = 2, or 1 for the winners alone) -> model latents: each
  image draws its own posterior sample (the official code's latent_dist.sample()) from its
  pair's key, so a cached pair and the same pair encoded in the step get the same sample."""
  images = mean.shape[1]
  image_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1))[:images])(keys)
  noise = jax.vmap(jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32)))(
      image_keys, mean)
  latents = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
  return vae_lib.to_model_latents(latents, encoders.vae.config)


def _added_conditions(encoders: Encoders, batch, pooled, resolution: tuple[int, int],
                      images: int) -> dict:
  """SDXL's `text_embeds` and `time_ids` for the first `images` images of each pair, in
  [B·images] order; {} for SD 1.x/2.x."""
  if encoders.kind != "sdxl":
    return {}
  pairs = batch["pair_ids"].shape[0]
  if encoders.constant_time_ids:
    time_ids = jnp.tile(encode.sdxl_time_ids(resolution, (0, 0), resolution),
                        (pairs * images, 1))
  else:
    per_image = lambda name: batch[name][:, :images].reshape(-1, 2)
    time_ids = encode.sdxl_time_ids(per_image("original_size"), per_image("crop_top_left"),
                                    resolution)
  return {"text_embeds": jnp.repeat(pooled.astype(jnp.float32), images, axis=0),
          "time_ids": time_ids}


def _from_encoded(encoders: Encoders, batch, keys, images: int):
  """An encoded batch (the latent cache's, or `make_encode_step`'s): moments and embeddings
  -> latents [B, images, h, w, C] (posterior samples), context and added conditions."""
  moments = (batch[name][:, :images] for name in ("latent_mean", "latent_logvar"))
  latents = _posterior_samples(encoders, *moments, keys)
  factor = encoders.vae.config.downscale_factor
  resolution = (latents.shape[2] * factor, latents.shape[3] * factor)
  added = _added_conditions(encoders, batch, batch.get("pooled"), resolution, images)
  return latents, batch["context"].astype(jnp.float32), added


def make_pair_errors(model, schedule: diffusion.NoiseSchedule, *, seed: int,
                     encoders: Encoders | None = None, compute_dtype=jnp.float32,
                     noise: NoiseOptions = NoiseOptions(), reference_pass: str = "shared",
                     winners_only: bool = False) -> Callable:
  """`pair_errors(params, reference_params, batch) -> (policy, reference)`: per-image
  denoising errors [2B], winners first then losers (reference None if `winners_only`: [B]).

  The batch keeps pairs on its leading axis so that each device holds whole pairs: either
  the encoded pairs of the latent cache or of `make_encode_step` (`encode.encode_pairs`):
  `latent_mean`, `latent_logvar` [B, k, h, w, C] (winner at index 0 of axis 1), `context`
  [B, T, D] (and SDXL's `pooled` [B, P], `original_size`, `crop_top_left` [B, 2, 2]); or
  ready `latents` [B, 2, h, w, C] and `context` [B, T, D]. `pair_ids` (and optional
  `epochs`) [B] seed each pair's randomness. Policy and reference params are both cast to
  the dtypes the `compute_dtype` UNet uses them in (`precision`); `reference_pass`
  'shared' runs both through one compiled body (equal at step 1, bit for bit), 'separate'
  as two programs (less memory). `winners_only` (SFT) runs the UNet on the winners alone.
  """
  images = 1 if winners_only else 2

  def pair_errors(params, reference_params, batch):
    pairs = batch["pair_ids"].shape[0]
    epochs = batch.get("epochs", jnp.zeros_like(batch["pair_ids"]))
    keys = pair_keys(seed, epochs, batch["pair_ids"])
    if "latent_mean" in batch:
      latents, context, added = _from_encoded(encoders, batch, keys, images)
    else:
      latents, context, added = batch["latents"][:, :images], batch["context"], {}
    # [B, k, ...] -> [kB, ...] interleaves w0, l0, w1, l1 without moving data between devices.
    latents = latents.reshape(images * pairs, *latents.shape[2:])
    timesteps, target_noise, input_noise = (
        jnp.repeat(x, images, axis=0) for x in pair_noise(
            keys, latents.shape[1:], schedule.num_train_timesteps, noise))
    context = jnp.repeat(context, images, axis=0)
    noisy = diffusion.add_noise(schedule, latents, input_noise, timesteps)
    target = diffusion.training_target(schedule, latents, target_noise, timesteps)
    dtypes = precision.leaf_dtypes(params, compute_dtype)
    errors = lambda p: losses.per_sample_error(
        model.apply({"params": p}, noisy, timesteps, context, **added), target)
    if winners_only:
      return errors(precision.cast(params, dtypes)), None
    policy, reference = (precision.policy_and_reference if reference_pass == "shared"
                         else precision.separate_passes)(
        errors, precision.cast(params, dtypes), precision.cast(reference_params, dtypes))
    # Reordering a [2B] vector to winners first costs nothing.
    winners_first = lambda e: e.reshape(pairs, 2).T.reshape(-1)
    return winners_first(policy), winners_first(reference)

  return pair_errors


def make_pair_loss(model, schedule: diffusion.NoiseSchedule, *, beta: float, loss_name: str,
                   **options) -> Callable:
  """`pair_loss(params, reference_params, batch) -> (loss, metrics)` for one encoded batch:
  `loss_name` ('dpo' or 'sft') on `make_pair_errors(model, schedule, **options)`."""
  pair_errors = make_pair_errors(model, schedule, winners_only=loss_name == "sft", **options)

  def pair_loss(params, reference_params, batch):
    policy, reference = pair_errors(params, reference_params, batch)
    if loss_name == "sft":
      return losses.sft_loss(policy)
    return losses.dpo_loss(policy, reference, beta)

  return pair_loss


def _microbatches(batch, count: int):
  """[B, ...] -> [count, B/count, ...]: microbatch k takes every count-th pair, so each
  device's pairs stay on that device and every microbatch uses all devices."""
  return jax.tree_util.tree_map(
      lambda x: jnp.moveaxis(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 1, 0), batch)


def _merge_microbatches(micro):
  """The inverse of `_microbatches`."""
  return jax.tree_util.tree_map(
      lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), micro)


def encode_function(encoders: Encoders, images: int = 2) -> Callable:
  """`encode(frozen, batch)`: a pixel batch -> the encoded batch the step takes (what the
  latent cache holds), keeping `pair_ids`, `epochs` and SDXL's sizes and crops."""

  def encode_batch(frozen, batch):
    encoded = encode.encode_pairs(encoders.kind, encoders.vae, encoders.text_encoders, frozen,
                                  batch, images)
    kept = {k: v for k, v in batch.items() if k != "pixels" and not k.startswith("input_ids_")}
    return {**kept, **jax.lax.stop_gradient(encoded)}

  return encode_batch


def make_encode_step(encoders: Encoders, *, images: int = 2, grad_accum: int = 1,
                     frozen_shardings, batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """`encode_step(frozen, batch) -> encoded batch`, jitted: a program of its own, so the
  train step is one and the same program whether its batches come from images or from the
  latent cache (and so computes the same, in any dtype). It encodes `grad_accum`
  microbatches in sequence, as the step trains them, to bound the encoders' memory."""
  encode_batch = encode_function(encoders, images)

  def encode_step(frozen, batch):
    if grad_accum == 1:
      return encode_batch(frozen, batch)
    return _merge_microbatches(jax.lax.map(lambda micro: encode_batch(frozen, micro),
                                           _microbatches(batch, grad_accum)))

  return jax.jit(encode_step, in_shardings=(frozen_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def make_eval_step(pair_loss: Callable, encoders: Encoders | None = None) -> Callable:
  """`eval_step(state, frozen, batch) -> metrics` of the policy against the reference; pixel
  batches are encoded first by `encoders` with `frozen` params."""
  encode_batch = encode_function(encoders) if encoders else None

  def eval_step(state, frozen, batch):
    if "pixels" in batch:
      batch = encode_batch(frozen, batch)
    return pair_loss(state.params, state.reference_params, batch)[1]

  return jax.jit(eval_step)


def make_train_step(pair_loss: Callable, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, state_shardings,
                    batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """`step(state, batch) -> (state, metrics)` on an encoded batch, jitted with the given
  shardings and the state donated. `grad_accum` splits the batch into sequential
  microbatches."""

  def pair_gradients(params, reference_params, batch):
    (_, metrics), grads = jax.value_and_grad(pair_loss, has_aux=True)(
        params, reference_params, batch)
    return grads, metrics

  def accumulated_gradients(state: TrainState, batch):
    if grad_accum == 1:
      return pair_gradients(state.params, state.reference_params, batch)
    micro = _microbatches(batch, grad_accum)

    def add(total, microbatch):
      grads, metrics = pair_gradients(state.params, state.reference_params, microbatch)
      return jax.tree_util.tree_map(jnp.add, total, (grads, metrics)), None

    zeros = jax.eval_shape(lambda: pair_gradients(state.params, state.reference_params,
                                                  jax.tree_util.tree_map(lambda x: x[0], micro)))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    total, _ = jax.lax.scan(add, zeros, micro)
    # Mean over microbatches = the gradient and metrics of the whole batch (equal sizes).
    return jax.tree_util.tree_map(lambda x: x / grad_accum, total)

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    grads, metrics = accumulated_gradients(state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  # Fixed output shardings keep the state's layout step after step, so the donated buffers
  # are reused in place and the step never recompiles.
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
