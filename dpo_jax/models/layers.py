"""Building blocks shared by the UNet and the VAE, numerically equal to diffusers'.

Tensors are NHWC (channels last: the natural layout for XLA on TPU and GPU). Module names
follow diffusers' attribute names so that parameter paths are its state_dict keys (see
weights.py). Every module takes a compute `dtype`; parameters stay float32 and the
numerically delicate parts (normalisation statistics, softmax, timestep sinusoids) run in
float32 whatever the compute dtype.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  # use_fast_variance=False: E[x^2]-E[x]^2 loses digits on large activations; torch does not.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False,
                      name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' get_timestep_embedding: sinusoids of the (possibly fractional) timesteps."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding with act_fn='silu')."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional time embedding added in between."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    conv = lambda name, k: nn.Conv(self.out_channels, (k, k), padding=k // 2, dtype=self.dtype,
                                   name=name)
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv("conv1", 3)(h)
    if temb is not None:
      temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + temb[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv("conv2", 3)(h)
    if x.shape[-1] != self.out_channels:
      x = conv("conv_shortcut", 1)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv; padding=0 is diffusers' asymmetric (right/bottom) pad used by the VAE."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    pad = ((self.padding, self.padding),) * 2
    return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                   name="conv")(x)


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """torch's F.interpolate(mode='nearest'): source index floor(i * in / out)."""
  rows = (jnp.arange(height) * x.shape[1]) // height
  cols = (jnp.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour resize (x2, or to `size` when the input side was odd) then 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int] | None = None):
    height, width = size or (2 * x.shape[1], 2 * x.shape[2])
    x = resize_nearest(x, height, width)
    return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


# cuDNN's fused (flash) attention kernel takes sequence lengths in multiples of this; JAX
# refused the text cross-attention (4096 queries, 77 keys) of SD1.5 at 512 px on an H200.
CUDNN_SEQUENCE_MULTIPLE = 64


def attention_implementation(requested: str | None, queries: int, keys: int) -> str | None:
  """The `jax.nn.dot_product_attention` implementation for one attention layer: 'cudnn'
  only where its kernel takes both lengths (the image self-attention, where the time goes),
  else XLA's (None: JAX's default), e.g. for the 77-token text cross-attention."""
  if requested == "cudnn" and (queries % CUDNN_SEQUENCE_MULTIPLE
                               or keys % CUDNN_SEQUENCE_MULTIPLE):
    return None
  return requested


class Attention(nn.Module):
  """diffusers' Attention projections around jax.nn.dot_product_attention.

  Attention logits and softmax are float32 in both XLA's and cuDNN's kernels, so diffusers'
  `upcast_attention` / `upcast_softmax` hold by construction. `implementation` is passed to
  jax.nn.dot_product_attention (`attention_implementation`): 'cudnn' selects the fused flash
  kernel on NVIDIA GPUs for the layers whose lengths it takes.
  """
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.head_dim
    project = lambda name, y: nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype,
                                       name=name)(y).reshape(*y.shape[:2], self.heads,
                                                             self.head_dim)
    q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
    implementation = attention_implementation(self.implementation, q.shape[1], k.shape[1])
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    out = out.reshape(*x.shape[:2], inner)
    return nn.Dense(self.out_features, dtype=self.dtype, name="to_out.0")(out)
