"""The jitted Diffusion-DPO update: one function of (state, frozen, batch), state donated."""
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import diffusion, encode, loss as losses, precision


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # The policy: trained, float32 master weights.
  reference_params: Any  # The frozen reference: never differentiated nor seen by the optimiser.
  opt_state: Any
  # Steps skipped for a non-finite loss or gradient (`make_train_step`): in a row up to this
  # one, and in all. Counted in the state, so that no step waits for the host to read its
  # metrics; a checkpoint carries the total on.
  nonfinite_streak: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))
  nonfinite_total: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))


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


def make_pair_errors(model, schedule: diffusion.NoiseSchedule, *, seed: int,
                     encoders: encode.Encoders | None = None, compute_dtype=jnp.float32,
                     noise: NoiseOptions = NoiseOptions(), reference_pass: str = "shared",
                     reference: str = "live", images: int = 2,
                     policy_params: Callable | None = None,
                     sdxl_time_ids: str = "constant") -> Callable:
  """`pair_errors(params, reference_params, batch) -> (policy, reference)`: per-image
  denoising errors [2B], winners first then losers; with `images=1`, [B] of each row's first
  image alone (SFT's winners, or unpaired data's one image per row).

  The batch keeps pairs on its leading axis so that each device holds whole pairs: either
  the encoded pairs of the latent cache or of `make_encode_step` (`encode.encoded_batch`):
  `latent_mean`, `latent_logvar` [B, k, h, w, C] (winner at index 0 of axis 1), `context`
  [B, T, D] (and SDXL's `pooled` [B, P], `original_size`, `crop_top_left` [B, 2, 2]); or
  ready `latents` [B, 2, h, w, C] and `context` [B, T, D] (`encode.unet_inputs`, with
  `sdxl_time_ids`). `pair_ids` (and optional `epochs`) [B] seed each pair's randomness.
  Policy and reference params are both cast to the dtypes the `compute_dtype` UNet uses
  them in (`precision`); `reference_pass` 'shared' runs both through one compiled body
  (equal at step 1, bit for bit), 'separate' as two programs (less memory). `reference`
  'live' runs the frozen reference on every batch; 'precomputed' reads its errors from the
  batch's `reference_errors` [B, 2] (winner, loser; `dpo_jax.reference_errors` computes them
  for the very (t, ε) of each pair) and 'none' returns None (reference-free losses): neither
  runs a reference model, and `reference_params` may be None. `policy_params(params,
  reference_params)`, when given, makes the policy's UNet params of the trained ones (LoRA:
  the base, which is the reference, plus the adapters).
  """
  if images not in (1, 2):
    raise ValueError(f"images={images}: a row holds a pair (2) or one image (1)")

  def pair_errors(params, reference_params, batch):
    if policy_params is not None:
      params = policy_params(params, reference_params)
    pairs = batch["pair_ids"].shape[0]
    epochs = batch.get("epochs", jnp.zeros_like(batch["pair_ids"]))
    keys = pair_keys(seed, epochs, batch["pair_ids"])
    latents, context, added = encode.unet_inputs(encoders, batch, keys, images, sdxl_time_ids)
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
    # Reordering a [2B] vector to winners first costs nothing (nothing to do for one image).
    winners_first = lambda e: e.reshape(pairs, images).T.reshape(-1)
    if reference != "live":
      policy = errors(precision.cast(params, dtypes))
      precomputed = batch["reference_errors"] if reference == "precomputed" else None
      return winners_first(policy), (None if precomputed is None
                                      else winners_first(precomputed.astype(jnp.float32)))
    policy, reference_errors = (precision.policy_and_reference if reference_pass == "shared"
                                else precision.separate_passes)(
        errors, precision.cast(params, dtypes), precision.cast(reference_params, dtypes))
    return winners_first(policy), winners_first(reference_errors)

  return pair_errors


def make_pair_loss(model, schedule: diffusion.NoiseSchedule, *, beta: float, loss_name: str,
                   loss_options: dict | None = None, unpaired: bool = False,
                   **options) -> Callable:
  """`pair_loss(params, reference_params, batch) -> (loss, metrics)` for one encoded batch:
  `loss_name` ('dpo', 'sft', 'hinge', 'ipo', 'mapo' or 'kto': `dpo_jax.loss`) on
  `make_pair_errors(model, schedule, **options)`. `loss_options`: the keywords of
  `loss.mapo_loss` (beta, snr) or `loss.kto_loss` (beta, lambda_desirable,
  lambda_undesirable). 'sft' and 'mapo' run no reference model. 'kto' takes each pair's
  winner as a liked image and its loser as a disliked one, or, with `unpaired`, each row's
  one image and its label, the batch's `desirable` [B] (bool)."""
  loss_options = loss_options or {}
  if loss_name in ("sft", "mapo"):
    options = {**options, "reference": "none"}
  if unpaired and loss_name != "kto":
    raise ValueError(f"unpaired data trains with the 'kto' loss only, not {loss_name!r}")
  images = 1 if loss_name == "sft" or unpaired else 2
  pair_errors = make_pair_errors(model, schedule, images=images, **options)
  def liked(policy, batch):
    if unpaired:
      return batch["desirable"]
    return jnp.arange(policy.shape[0]) < policy.shape[0] // 2  # Winners first.

  loss_fn = {
      "dpo": lambda policy, reference, _: losses.dpo_loss(policy, reference, beta),
      "sft": lambda policy, _, __: losses.sft_loss(policy),
      "hinge": lambda policy, reference, _: losses.hinge_loss(policy, reference, beta),
      "ipo": lambda policy, reference, _: losses.ipo_loss(policy, reference, beta),
      "mapo": lambda policy, _, __: losses.mapo_loss(
          policy, num_train_timesteps=schedule.num_train_timesteps, **loss_options),
      "kto": lambda policy, reference, batch: losses.kto_loss(
          policy, reference, liked(policy, batch), **loss_options),
  }[loss_name]

  def pair_loss(params, reference_params, batch):
    return loss_fn(*pair_errors(params, reference_params, batch), batch)

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


def make_encode_step(encoders: encode.Encoders, *, images: int = 2, grad_accum: int = 1,
                     frozen_shardings, batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """`encode_step(frozen, batch) -> encoded batch`, jitted: a program of its own, so the
  train step is one and the same program whether its batches come from images or from the
  latent cache (and so computes the same, in any dtype). It encodes `grad_accum`
  microbatches in sequence, as the step trains them, to bound the encoders' memory."""
  encode_batch = lambda frozen, batch: encode.encoded_batch(encoders, frozen, batch, images)

  def encode_step(frozen, batch):
    if grad_accum == 1:
      return encode_batch(frozen, batch)
    return _merge_microbatches(jax.lax.map(lambda micro: encode_batch(frozen, micro),
                                           _microbatches(batch, grad_accum)))

  return jax.jit(encode_step, in_shardings=(frozen_shardings, batch_sharding),
                 out_shardings=batch_sharding)


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
      return jax.tree_util.tree_map(jnp.add, total, grads), metrics

    # The gradients are shaped like the params, so the carry starts without tracing the
    # UNet a second time (an `eval_shape` of the step cost as long as the loop body's trace);
    # the metrics come out per microbatch and are summed after.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(add, zeros, micro)
    metrics = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), metrics)
    # Mean over microbatches = the gradient and metrics of the whole batch (equal sizes).
    return jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, metrics))

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    grads, metrics = accumulated_gradients(state, batch)
    metrics["grad_norm"] = optax.global_norm(grads)

    def update():
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # A non-finite loss or gradient skips the update: params and optimiser state stay as they
    # were, bit for bit; the step and the data advance. A cond, not a select per leaf: XLA
    # (CPU) kept both the new and the old state alive for the select, +27% of the params'
    # bytes in temporaries; the cond costs what the plain update did.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state = jax.lax.cond(finite, update, lambda: (state.params, state.opt_state))
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
                          nonfinite_total=state.nonfinite_total + skipped)
    metrics.update(skipped_nonfinite=skipped, nonfinite_streak=state.nonfinite_streak,
                   skipped_nonfinite_total=state.nonfinite_total)
    return state, metrics

  # Fixed output shardings keep the state's layout step after step, so the donated buffers
  # are reused in place and the step never recompiles.
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
