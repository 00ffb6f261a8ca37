"""DDIM sampling (η = 0) with classifier-free guidance, as diffusers' pipelines with
`DDIMScheduler`: text-to-image and SDEdit image-to-image, one jitted `lax.scan` over steps.

Pure functions over arrays; the UNet, VAE and schedule come in as Python structure. Every
image's starting noise comes from its own seed, so an image depends only on (prompt, seed,
settings), never on the batch it was drawn in or the device count.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import diffusion, encode
from dpo_jax.errors import UserError
from dpo_jax.models import vae as vae_lib

_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class DDIMSettings:
  """diffusers' DDIMScheduler options that change the trajectory, with its defaults: a
  pipeline's scheduler config (PNDM, Euler, ...) read by `DDIMScheduler.from_config` keeps
  the keys it has and takes these for the rest."""
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0

  @classmethod
  def from_scheduler_config(cls, config: Mapping[str, Any]) -> "DDIMSettings":
    if config.get("thresholding"):
      raise UserError("scheduler_config.json: thresholding=True (dynamic thresholding) is not "
                      "supported by dpo_jax's DDIM sampler")
    defaults = cls()
    settings = cls(**{f.name: config.get(f.name, getattr(defaults, f.name))
                      for f in dataclasses.fields(cls)})
    if settings.timestep_spacing not in _SPACINGS:
      raise UserError(f"scheduler_config.json: timestep_spacing {settings.timestep_spacing!r} "
                      f"is not supported; use one of {', '.join(_SPACINGS)}")
    return settings


def ddim_timesteps(num_train_timesteps: int, steps: int, settings: DDIMSettings) -> np.ndarray:
  """The `steps` timesteps DDIMScheduler.set_timesteps visits, noisiest first (int64)."""
  if not 0 < steps <= num_train_timesteps:
    raise UserError(f"sampling steps must be in [1, {num_train_timesteps}], got {steps}")
  if settings.timestep_spacing == "linspace":
    timesteps = np.linspace(0, num_train_timesteps - 1, steps).round()[::-1]
  elif settings.timestep_spacing == "leading":
    ratio = num_train_timesteps // steps
    timesteps = (np.arange(0, steps) * ratio).round()[::-1] + settings.steps_offset
  else:  # trailing
    ratio = num_train_timesteps / steps
    timesteps = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
  return timesteps.astype(np.int64)


def ddim_step(schedule: diffusion.NoiseSchedule, settings: DDIMSettings, model_output: jax.Array,
              t: jax.Array, x: jax.Array, steps: int) -> jax.Array:
  """One deterministic DDIM update x_t -> x_{t - T/steps} (DDIMScheduler.step, eta=0)."""
  alphas = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  previous = t - schedule.num_train_timesteps // steps
  final = 1.0 if settings.set_alpha_to_one else alphas[0]
  alpha = alphas[t]
  alpha_prev = jnp.where(previous >= 0, alphas[jnp.maximum(previous, 0)], final)
  x, model_output = x.astype(jnp.float32), model_output.astype(jnp.float32)
  if schedule.prediction_type == "epsilon":
    x0 = (x - jnp.sqrt(1 - alpha) * model_output) / jnp.sqrt(alpha)
    eps = model_output
  else:  # v_prediction
    x0 = jnp.sqrt(alpha) * x - jnp.sqrt(1 - alpha) * model_output
    eps = jnp.sqrt(alpha) * model_output + jnp.sqrt(1 - alpha) * x
  if settings.clip_sample:
    x0 = jnp.clip(x0, -settings.clip_sample_range, settings.clip_sample_range)
  return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What the UNet is conditioned on, [B, ...] per prompt and for the unconditional branch:
  `context` [B, T, D] and SDXL's added conditions (`text_embeds`, `time_ids`) or {}."""
  context: jax.Array
  added: dict
  uncond_context: jax.Array
  uncond_added: dict


jax.tree_util.register_dataclass(Conditioning, data_fields=[f.name for f in
                                                            dataclasses.fields(Conditioning)],
                                 meta_fields=[])


def denoise(unet, params, schedule: diffusion.NoiseSchedule, settings: DDIMSettings,
            latents: jax.Array, conditioning: Conditioning, timesteps: jax.Array, *,
            total_steps: int, guidance_scale: float) -> jax.Array:
  """Runs DDIM from `latents` at timesteps[0] through every timestep in `timesteps`.

  Classifier-free guidance as the pipelines: one UNet call on [uncond; cond] (2B), then
  uncond + scale · (cond − uncond). `total_steps` is the schedule's step count (the
  spacing of the timesteps; SDEdit runs only its last part).
  """
  guided = guidance_scale > 1.0
  context = conditioning.context
  added = conditioning.added
  if guided:
    context = jnp.concatenate([conditioning.uncond_context, context])
    added = {k: jnp.concatenate([conditioning.uncond_added[k], v]) for k, v in added.items()}

  def step(x, t):
    model_input = jnp.concatenate([x, x]) if guided else x
    t_batch = jnp.full((model_input.shape[0],), t)
    out = unet.apply({"params": params}, model_input, t_batch, context, **added)
    if guided:
      uncond, cond = jnp.split(out.astype(jnp.float32), 2)
      out = uncond + guidance_scale * (cond - uncond)
    return ddim_step(schedule, settings, out, t, x, total_steps), None

  latents, _ = jax.lax.scan(step, latents.astype(jnp.float32), timesteps)
  return latents


def initial_noise(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[B, *shape] standard normal noise, image i's drawn from its own seeds[i] alone."""
  return jax.vmap(lambda seed: jax.random.normal(jax.random.key(seed), shape))(seeds)


def sdedit_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
  """The tail of the schedule SDEdit runs for `strength` in (0, 1] (diffusers'
  img2img `get_timesteps`): the last int(steps · strength) timesteps."""
  if not 0 < strength <= 1:
    raise UserError(f"SDEdit strength must be in (0, 1], got {strength}")
  steps = len(timesteps)
  start = max(steps - min(int(steps * strength), steps), 0)
  if start == steps:
    raise UserError(f"strength {strength} with {steps} steps runs no step; raise either")
  return timesteps[start:]


def sdedit_start(schedule: diffusion.NoiseSchedule, image_latents: jax.Array, noise: jax.Array,
                 first_timestep) -> jax.Array:
  """Clean image latents noised to SDEdit's first timestep (the scheduler's add_noise)."""
  t = jnp.full((image_latents.shape[0],), first_timestep)
  return diffusion.add_noise(schedule, image_latents, noise, t)


def decode_images(vae: vae_lib.AutoencoderKL, vae_params, latents: jax.Array) -> jax.Array:
  """Model latents -> float32 images in [0, 1], channels last (the pipelines' postprocess)."""
  images = vae.apply({"params": vae_params},
                     vae_lib.from_model_latents(latents, vae.config), method="decode")
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def prompt_conditioning(encoders: encode.Encoders, text_params, token_ids, uncond_token_ids, *,
                        resolution: tuple[int, int], zero_uncond: bool) -> Conditioning:
  """Encodes prompts and the unconditional (negative) prompts into `Conditioning`.

  `zero_uncond`: SDXL's `force_zeros_for_empty_prompt` (its pipelines' default): with no
  negative prompt the unconditional embeddings are zeros, not the encoded "". SDXL's time
  ids are (H, W, 0, 0, H, W) for both branches, the pipelines' defaults.
  """
  context, pooled = encode.encode_prompts(encoders, text_params, token_ids)
  uncond_context, uncond_pooled = encode.encode_prompts(encoders, text_params, uncond_token_ids)
  if zero_uncond:
    uncond_context = jnp.zeros_like(uncond_context)
    uncond_pooled = None if uncond_pooled is None else jnp.zeros_like(uncond_pooled)
  added = uncond_added = {}
  if encoders.kind == "sdxl":
    time_ids = jnp.tile(encode.sdxl_time_ids(resolution, (0, 0), resolution),
                        (context.shape[0], 1))
    added = {"text_embeds": pooled, "time_ids": time_ids}
    uncond_added = {"text_embeds": uncond_pooled, "time_ids": time_ids}
  return Conditioning(context, added, uncond_context, uncond_added)
