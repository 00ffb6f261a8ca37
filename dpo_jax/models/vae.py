"""AutoencoderKL (the Stable Diffusion VAE) in Flax Linen, and its diffusers `vae/` folder I/O.

Numerically diffusers' AutoencoderKL, with parameter paths equal to its state_dict keys
(weights.py), but channels-last: images are (B, H, W, C) in [-1, 1] and latents (B, h, w, C).
Diffusion-DPO keeps the VAE frozen: it turns images into latent moments (in the step or once,
offline, for the latent cache) and latents back into images for evaluation.
"""
import dataclasses
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import UserError
from dpo_jax.models import model_files, weights
from dpo_jax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, group_norm

Dtype = Any

_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code it for every norm, attention's included.
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Keys whose only supported value is diffusers' default (any other value changes the network
# or, for latents_mean/std, the latent normalisation we would have to apply).
_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
# sample_size only sizes PyTorch's tiling; force_upcast works around float16 overflow, which
# bfloat16 (float32's exponent range) does not have.
_IGNORED = {"sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Every architectural choice of a supported AutoencoderKL; defaults are diffusers'."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @property
  def downscale_factor(self) -> int:
    """Pixels per latent along each side: every block but the last halves the image."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], where: str = "vae/config.json") -> "VAEConfig":
    """Validates a diffusers AutoencoderKL config dict; `where` names the file in errors."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise UserError(f"{where}: _class_name '{config['_class_name']}' is not supported; "
                      "only AutoencoderKL is")
    for key, default in _FIXED.items():
      if key in config and config[key] != default:
        raise UserError(f"{where}: {key}={config[key]!r} is not supported (only {default!r})")
    fields = {f.name for f in dataclasses.fields(cls)} - {"raw"}
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in fields | set(_FIXED) | _IGNORED | set(_BLOCK_TYPES))
    if unknown:
      raise UserError(f"{where}: key '{unknown[0]}' is not supported by dpo_jax's VAE")
    values = {k: config[k] for k in fields if k in config}
    values["block_out_channels"] = tuple(values.get("block_out_channels", cls.block_out_channels))
    result = cls(**values, raw=dict(config))
    result._check_shapes(config, where)
    return result

  def _check_shapes(self, config: dict[str, Any], where: str) -> None:
    levels = len(self.block_out_channels)
    for key, allowed in _BLOCK_TYPES.items():
      types = config.get(key, (allowed,))
      bad = [t for t in types if t != allowed]
      if bad:
        raise UserError(f"{where}: {key} entry '{bad[0]}' is not supported; only '{allowed}'")
      if len(types) != levels:
        raise UserError(f"{where}: {key} has {len(types)} entries but block_out_channels has "
                        f"{levels}; they must match")
    if not isinstance(self.layers_per_block, int):
      raise UserError(f"{where}: layers_per_block must be an int, got {self.layers_per_block!r}")
    if levels == 0 or any(c % self.norm_num_groups for c in self.block_out_channels):
      raise UserError(f"{where}: block_out_channels {list(self.block_out_channels)} must be "
                      f"non-empty multiples of norm_num_groups={self.norm_num_groups}")


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=dtype, name=name)


def _resnet(config: VAEConfig, channels: int, dtype: Dtype, name: str) -> ResnetBlock2D:
  return ResnetBlock2D(channels, config.norm_num_groups, _EPS, dtype=dtype, name=name)


class MidBlock(nn.Module):
  """Resnet, single-head self-attention over all pixels, resnet (diffusers' UNetMidBlock2D)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = _resnet(self.config, channels, self.dtype, "resnets.0")(x)
    if self.config.mid_block_add_attention:
      x = x + self._attention(x)
    return _resnet(self.config, channels, self.dtype, "resnets.1")(x)

  def _attention(self, x):
    batch, height, width, channels = x.shape
    # Named 'attentions.0.group_norm' beside 'attentions.0' (the projections) so the paths are
    # diffusers' keys without changing the Attention shared with the UNet.
    h = group_norm(self.config.norm_num_groups, _EPS, self.dtype, "attentions.0.group_norm")(x)
    h = Attention(1, channels, channels, qkv_bias=True, dtype=self.dtype, name="attentions.0")(
        h.reshape(batch, height * width, channels))
    return h.reshape(x.shape)


class Encoder(nn.Module):
  """Images -> 2 * latent_channels moments, downsampling 2x per level but the last."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    last = len(cfg.block_out_channels) - 1
    for b, channels in enumerate(cfg.block_out_channels):
      for i in range(cfg.layers_per_block):
        h = _resnet(cfg, channels, self.dtype, f"down_blocks.{b}.resnets.{i}")(h)
      if b != last:
        h = Downsample2D(channels, padding=0, dtype=self.dtype,
                         name=f"down_blocks.{b}.downsamplers.0")(h)
    h = MidBlock(cfg, self.dtype, name="mid_block")(h)
    h = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(h))
    return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents -> images, upsampling 2x per level but the last (no skip connections)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    h = _conv(cfg.block_out_channels[-1], 3, self.dtype, "conv_in")(z)
    h = MidBlock(cfg, self.dtype, name="mid_block")(h)
    last = len(cfg.block_out_channels) - 1
    for b, channels in enumerate(reversed(cfg.block_out_channels)):
      for i in range(cfg.layers_per_block + 1):
        h = _resnet(cfg, channels, self.dtype, f"up_blocks.{b}.resnets.{i}")(h)
      if b != last:
        h = Upsample2D(channels, dtype=self.dtype, name=f"up_blocks.{b}.upsamplers.0")(h)
    h = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(h))
    return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL; call `encode` / `decode` through `apply(..., method=...)`.

  `dtype` is the compute dtype; parameters are float32 and both methods return float32.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg, latent = self.config, self.config.latent_channels
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    self.quant_conv = _conv(2 * latent, 1, self.dtype) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(latent, 1, self.dtype) if cfg.use_post_quant_conv else None

  def encode(self, images):
    """(B, H, W, in_channels) images -> the posterior's (mean, logvar), each (B, h, w, latent)."""
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    # As diffusers' DiagonalGaussianDistribution: exp(0.5 * logvar) then stays finite.
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    """(B, h, w, latent_channels) unscaled latents -> (B, H, W, out_channels) images."""
    h = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      h = self.post_quant_conv(h)
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, images):
    """Reconstructs from the posterior mean; `init` runs it to create every parameter."""
    return self.decode(self.encode(images)[0])


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A draw from the diagonal Gaussian posterior (diffusers' latent_dist.sample())."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def to_model_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents -> the unit-variance latents the diffusion model sees."""
  if config.shift_factor is not None:
    latents = latents - config.shift_factor
  return latents * config.scaling_factor


def from_model_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """The inverse of `to_model_latents`: what `decode` takes."""
  latents = latents / config.scaling_factor
  if config.shift_factor is not None:
    latents = latents + config.shift_factor
  return latents


def build_vae(config: dict, *, where: str = "vae config", **model_options) -> AutoencoderKL:
  """The model for a diffusers config dict; `model_options` is the compute `dtype`."""
  return AutoencoderKL(VAEConfig.from_diffusers(config, where), **model_options)


def init_abstract(model: AutoencoderKL):
  """The params pytree's shapes and dtypes, without allocating or computing anything."""
  size = 2 ** len(model.config.block_out_channels)  # Survives every stride-2 level.
  images = jax.ShapeDtypeStruct((1, size, size, model.config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_CURRENT_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old hub VAEs name the mid-block attention query/key/value/proj_attn, some with 1x1-conv
  weights; diffusers renames them when loading, and so do we."""
  renamed = {}
  for key, value in state.items():
    match = _LEGACY_ATTENTION.match(key)
    if match:
      prefix, name, leaf = match.groups()
      key = f"{prefix}.{_CURRENT_NAME[name]}.{leaf}"
      value = np.squeeze(value, axis=(2, 3)) if value.ndim == 4 else value
    renamed[key] = value
  return renamed


def load_vae(folder: str, *, variant: str | None = None, params_dtype=jnp.float32,
             **model_options):
  """Reads config.json and the safetensors weights (single, sharded or a variant like fp16).

  Returns (model, params) with params as host numpy arrays in `params_dtype`.
  """
  config = model_files.read_config(folder)
  model = build_vae(config, where=os.path.join(folder, "config.json"), **model_options)
  state = model_files.read_state_dict(folder, model_files.DIFFUSERS_WEIGHTS, variant)
  params = weights.state_dict_to_params(_rename_legacy_attention(state), init_abstract(model),
                                        what=folder, dtype=params_dtype)
  return model, params


def save_vae(model: AutoencoderKL, params, folder: str, *, dtype=None,
             max_shard_bytes: int = model_files.DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes config.json + diffusion_pytorch_model(.safetensors | shards + index)."""
  state = weights.params_to_state_dict(params)
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  config = {**model.config.raw, "_class_name": "AutoencoderKL"}
  model_files.write_config(config, folder)
  model_files.write_state_dict(state, folder, model_files.DIFFUSERS_WEIGHTS, max_shard_bytes)
