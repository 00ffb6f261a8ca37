"""Pixels, prompts or a latent cache -> the UNet's inputs, exactly as the diffusers pipelines.

The one home of input encoding: the train step's encode program, `prepare` (the latent
cache) and the step itself (posterior samples, SDXL's added conditions) all call it. Every
function is pure over arrays: modules and configs are Python-level structure, so pass
params as traced arguments and everything else by closure.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from dpo_jax.models import tokenizer as tokenizer_lib
from dpo_jax.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class Encoders:
  """A pipeline's frozen modules that turn pixels and token ids into UNet inputs: static
  structure in a jit. Their params travel apart, as traced arguments: `frozen` =
  {'vae': ..., 'text_encoders': (one per encoder)} (`pipeline_encoders`)."""
  kind: str  # 'sd' (SD 1.x/2.x) or 'sdxl'.
  vae: vae_lib.AutoencoderKL
  text_encoders: tuple[nn.Module, ...] = ()  # model_index order: one for 'sd', two for 'sdxl'.


def pipeline_encoders(pipe) -> tuple[Encoders, dict]:
  """A loaded `Pipeline`'s encoders and their params (`frozen`)."""
  encoders = Encoders(pipe.kind, pipe.vae, tuple(module for module, _ in pipe.text_encoders))
  frozen = {"vae": pipe.vae_params,
            "text_encoders": tuple(params for _, params in pipe.text_encoders)}
  return encoders, frozen


def tokenize_prompts(tokenizers: Sequence[transformers.CLIPTokenizer],
                     prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
  """One int32 (len(prompts), model_max_length) id array per tokenizer (SDXL: the same
  prompt through both), padded and truncated as the pipelines' `encode_prompt`."""
  return tuple(tokenizer_lib.tokenize(t, prompts, max_length=t.model_max_length)
               for t in tokenizers)


def encode_prompts(encoders: Encoders, text_params: Sequence[Any],
                   token_ids: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array | None]:
  """(context, pooled) for the UNet, as diffusers' `encode_prompt` without clip_skip.

  Args:
    encoders: `kind` and the text encoder modules.
    text_params: their params, in the same order (`frozen['text_encoders']`).
    token_ids: one (B, T) int array per text encoder (`tokenize_prompts`).

  Returns:
    'sd': the encoder's last hidden state (after the final layer norm) (B, T, D), and None.
    'sdxl': both encoders' penultimate hidden states (no final layer norm) concatenated on
    the feature axis (B, T, D1 + D2), and the second encoder's projected pooled output
    (B, projection_dim), the UNet's `text_embeds`.
  """
  outputs = [module.apply({"params": params}, ids) for module, params, ids
             in zip(encoders.text_encoders, text_params, token_ids, strict=True)]
  if encoders.kind == "sd":
    return outputs[0].last_hidden_state, None
  context = jnp.concatenate([out.hidden_states[-2] for out in outputs], axis=-1)
  return context, outputs[-1].text_embeds


def encode_images(vae: vae_lib.AutoencoderKL, vae_params,
                  images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, H, W, 3) images in [-1, 1] -> the posterior's (mean, logvar), each (B, h, w, C).

  The moments, not a sample, are what the latent cache stores: each step then draws its own
  sample (`posterior_samples`), as encoding the image anew would.
  """
  return vae.apply({"params": vae_params}, images, method="encode")


def encode_pairs(encoders: Encoders, frozen, batch, images: int = 2) -> dict:
  """A pixel batch -> what the latent cache stores for it (the train step's input).

  Args:
    encoders: the frozen modules; `frozen` their params.
    batch: `pixels` [B, 2, R, R, 3] in [-1, 1] and `input_ids_{i}` [B, L] per encoder.
    images: encode each pair's first `images` images: 2, or 1 for the winners alone (SFT).

  Returns:
    `latent_mean`, `latent_logvar` [B, images, h, w, C] (the VAE posterior's moments),
    `context` [B, T, D] and, for SDXL, `pooled` [B, P] (`encode_prompts`).
  """
  pairs, _, height, width, _ = batch["pixels"].shape
  pixels = batch["pixels"][:, :images].reshape(pairs * images, height, width, 3)
  mean, logvar = encode_images(encoders.vae, frozen["vae"], pixels)
  token_ids = [batch[f"input_ids_{i}"] for i in range(len(encoders.text_encoders))]
  context, pooled = encode_prompts(encoders, frozen["text_encoders"], token_ids)
  out = {"latent_mean": mean.reshape(pairs, images, *mean.shape[1:]),
         "latent_logvar": logvar.reshape(pairs, images, *logvar.shape[1:]), "context": context}
  if pooled is not None:
    out["pooled"] = pooled
  return out


def encoded_batch(encoders: Encoders, frozen, batch, images: int = 2) -> dict:
  """A pixel batch -> the encoded batch the train step takes (what the latent cache holds),
  keeping `pair_ids`, `epochs` and SDXL's sizes and crops; no gradient flows back."""
  encoded = encode_pairs(encoders, frozen, batch, images)
  kept = {k: v for k, v in batch.items() if k != "pixels" and not k.startswith("input_ids_")}
  return {**kept, **jax.lax.stop_gradient(encoded)}


def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: jax.Array,
                         vae_config: vae_lib.VAEConfig) -> jax.Array:
  """A posterior sample, scaled (and shifted) into the latents the UNet is trained on."""
  return vae_lib.to_model_latents(vae_lib.sample_latents(mean, logvar, rng), vae_config)


def posterior_samples(vae_config: vae_lib.VAEConfig, mean: jax.Array, logvar: jax.Array,
                      keys: jax.Array) -> jax.Array:
  """[B, k, h, w, C] moments (k = 2, or 1 for the winners alone) -> model latents: each
  image draws its own posterior sample (the official code's latent_dist.sample()) from its
  pair's key, so a cached pair and the same pair encoded in the step get the same sample."""
  images = mean.shape[1]
  image_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1))[:images])(keys)
  sample = lambda m, lv, k: latents_from_moments(m, lv, k, vae_config)
  return jax.vmap(jax.vmap(sample))(mean.astype(jnp.float32), logvar.astype(jnp.float32),
                                    image_keys)


def added_conditions(kind: str, batch, resolution: tuple[int, int], images: int,
                     time_ids: str = "constant") -> dict:
  """SDXL's `text_embeds` and `time_ids` for the first `images` images of each pair, in
  [B·images] order; {} for SD 1.x/2.x. `time_ids` 'constant' conditions every image on
  (R, R, 0, 0, R, R) as the official DPO code does; 'actual' on its own original size and
  crop (`original_size`, `crop_top_left` [B, 2, 2]), diffusers' training convention."""
  if kind != "sdxl":
    return {}
  pairs = batch["pair_ids"].shape[0]
  if time_ids == "constant":
    ids = jnp.tile(sdxl_time_ids(resolution, (0, 0), resolution), (pairs * images, 1))
  else:
    per_image = lambda name: batch[name][:, :images].reshape(-1, 2)
    ids = sdxl_time_ids(per_image("original_size"), per_image("crop_top_left"), resolution)
  return {"text_embeds": jnp.repeat(batch["pooled"].astype(jnp.float32), images, axis=0),
          "time_ids": ids}


def unet_inputs(encoders: Encoders | None, batch, keys: jax.Array, images: int = 2,
                time_ids: str = "constant") -> tuple[jax.Array, jax.Array, dict]:
  """A step's batch -> (latents [B, images, h, w, C], context [B, T, D], added conditions
  in [B·images] order) for the first `images` images of each pair.

  The batch is either encoded (`latent_mean`, `latent_logvar`, `context`, SDXL's `pooled`:
  the latent cache's or `encoded_batch`'s), whose latents are posterior samples drawn from
  each pair's key, or ready `latents` and `context` (no encoders, no added conditions).
  """
  if "latent_mean" not in batch:
    return batch["latents"][:, :images], batch["context"], {}
  moments = (batch[name][:, :images] for name in ("latent_mean", "latent_logvar"))
  latents = posterior_samples(encoders.vae.config, *moments, keys)
  factor = encoders.vae.config.downscale_factor
  resolution = (latents.shape[2] * factor, latents.shape[3] * factor)
  added = added_conditions(encoders.kind, batch, resolution, images, time_ids)
  return latents, batch["context"].astype(jnp.float32), added


def sdxl_time_ids(original_size, crop_top_left, target_size) -> jax.Array:
  """SDXL's micro-conditioning: float32 (..., 6) = original (h, w), crop (top, left),
  target (h, w), the order of diffusers' `_get_add_time_ids`.

  Each argument is a (height, width)-style pair, or a (B, 2) array for per-sample values.
  """
  parts = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.float32)
                                 for x in (original_size, crop_top_left, target_size)))
  return jnp.concatenate(parts, axis=-1)
