"""Images and prompts -> what the UNet is conditioned on, exactly as the diffusers pipelines.

Shared by the train step (encoders inside the jitted step) and the offline cache (encoders run
once). Every function is pure over arrays: modules and configs are Python-level structure, so
pass params as traced arguments and everything else by closure.
"""
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from dpo_jax.models import tokenizer as tokenizer_lib
from dpo_jax.models import vae as vae_lib


class PromptEncoders(NamedTuple):
  """What `encode_prompts` needs of a pipeline. Build one inside a jitted function to pair
  the (static) modules with traced params; a `Pipeline` has the same two attributes."""
  kind: str  # 'sd' or 'sdxl'.
  text_encoders: tuple[tuple[nn.Module, Any], ...]  # (module, params), model_index order.


def tokenize_prompts(tokenizers: Sequence[transformers.CLIPTokenizer],
                     prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
  """One int32 (len(prompts), model_max_length) id array per tokenizer (SDXL: the same
  prompt through both), padded and truncated as the pipelines' `encode_prompt`."""
  return tuple(tokenizer_lib.tokenize(t, prompts, max_length=t.model_max_length)
               for t in tokenizers)


def encode_prompts(encoders, token_ids: Sequence[jax.Array]
                   ) -> tuple[jax.Array, jax.Array | None]:
  """(context, pooled) for the UNet, as diffusers' `encode_prompt` without clip_skip.

  Args:
    encoders: a `Pipeline` or `PromptEncoders`: `kind` and `text_encoders`.
    token_ids: one (B, T) int array per text encoder (`tokenize_prompts`).

  Returns:
    'sd': the encoder's last hidden state (after the final layer norm) (B, T, D), and None.
    'sdxl': both encoders' penultimate hidden states (no final layer norm) concatenated on
    the feature axis (B, T, D1 + D2), and the second encoder's projected pooled output
    (B, projection_dim), the UNet's `text_embeds`.
  """
  outputs = [module.apply({"params": params}, ids)
             for (module, params), ids in zip(encoders.text_encoders, token_ids, strict=True)]
  if encoders.kind == "sd":
    return outputs[0].last_hidden_state, None
  context = jnp.concatenate([out.hidden_states[-2] for out in outputs], axis=-1)
  return context, outputs[-1].text_embeds


def encode_images(vae: vae_lib.AutoencoderKL, vae_params,
                  images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, H, W, 3) images in [-1, 1] -> the posterior's (mean, logvar), each (B, h, w, C).

  The moments, not a sample, are what the latent cache stores: each epoch then draws its own
  sample with `latents_from_moments`, as encoding the image anew would.
  """
  return vae.apply({"params": vae_params}, images, method="encode")


def encode_pairs(kind: str, vae: vae_lib.AutoencoderKL, text_encoders: Sequence[nn.Module],
                 frozen, batch, images: int = 2) -> dict:
  """A pixel batch -> what the latent cache stores for it (the train step's input).

  Args:
    kind: 'sd' or 'sdxl'.
    vae, text_encoders: the frozen modules (text encoders in model_index order).
    frozen: their params, {'vae': ..., 'text_encoders': (one per encoder)}.
    batch: `pixels` [B, 2, R, R, 3] in [-1, 1] and `input_ids_{i}` [B, L] per encoder.
    images: encode each pair's first `images` images: 2, or 1 for the winners alone (SFT).

  Returns:
    `latent_mean`, `latent_logvar` [B, images, h, w, C] (the VAE posterior's moments),
    `context` [B, T, D] and, for SDXL, `pooled` [B, P] (`encode_prompts`).
  """
  pairs, _, height, width, _ = batch["pixels"].shape
  pixels = batch["pixels"][:, :images].reshape(pairs * images, height, width, 3)
  mean, logvar = encode_images(vae, frozen["vae"], pixels)
  token_ids = [batch[f"input_ids_{i}"] for i in range(len(text_encoders))]
  context, pooled = encode_prompts(
      PromptEncoders(kind, tuple(zip(text_encoders, frozen["text_encoders"]))), token_ids)
  out = {"latent_mean": mean.reshape(pairs, images, *mean.shape[1:]),
         "latent_logvar": logvar.reshape(pairs, images, *logvar.shape[1:]), "context": context}
  if pooled is not None:
    out["pooled"] = pooled
  return out


def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: jax.Array,
                         vae_config: vae_lib.VAEConfig) -> jax.Array:
  """A posterior sample, scaled (and shifted) into the latents the UNet is trained on."""
  return vae_lib.to_model_latents(vae_lib.sample_latents(mean, logvar, rng), vae_config)


def sdxl_time_ids(original_size, crop_top_left, target_size) -> jax.Array:
  """SDXL's micro-conditioning: float32 (..., 6) = original (h, w), crop (top, left),
  target (h, w), the order of diffusers' `_get_add_time_ids`.

  Each argument is a (height, width)-style pair, or a (B, 2) array for per-sample values.
  """
  parts = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.float32)
                                 for x in (original_size, crop_top_left, target_size)))
  return jnp.concatenate(parts, axis=-1)
