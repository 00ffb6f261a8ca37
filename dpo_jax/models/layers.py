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


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the last (channel) axis of [B, ..., C], statistics in float32,
  with nn.GroupNorm's params (`scale`, `bias` [C]) and output dtype (`dtype`).

  The statistics sum over the spatial axes first, to [B, C], and only then over each
  group's channels: XLA:CPU ran that 1.3-3x faster forward+backward than nn.GroupNorm's
  reduction over a [B, HW, G, C/G] view at a UNet's shapes, and up to 4x forward, the most
  on the largest maps (benchmarks/group_norm.py). The variance is the mean square of the
  centred values, as torch computes it: E[x²] − E[x]² loses digits on large activations.
  """
  groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (channels,))
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
    spatial = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (channels // self.groups)
    per_group = lambda sums: jnp.repeat(  # [B, C] channel sums -> each channel's group's mean.
        sums.reshape(-1, self.groups, channels // self.groups).sum(-1) / count,
        channels // self.groups, axis=-1).reshape((x.shape[0],) + (1,) * len(spatial)
                                                  + (channels,))
    x = x.astype(jnp.float32)
    centred = x - per_group(jnp.sum(x, axis=spatial))
    variance = per_group(jnp.sum(centred * centred, axis=spatial))
    return (centred * (jax.lax.rsqrt(variance + self.epsilon) * scale) + bias).astype(self.dtype)


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> GroupNorm:
  return GroupNorm(groups, eps, dtype, name=name)


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


class PointwiseConv(nn.Module):
  """nn.Conv(features, (1, 1)) as a product over the last axis: the same params (kernel
  [1, 1, C, features], bias) and result to rounding, on any leading shape; XLA:CPU ran the
  product 1.3-5x faster than the convolution forward and 1.4-2x forward+backward at a
  UNet's shapes (benchmarks/pointwise_conv.py, BENCHMARKS.md)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.dot(x, kernel[0, 0]) + bias


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional time embedding added in between."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    conv = lambda name: nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype,
                                name=name)
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv("conv1")(h)
    if temb is not None:
      temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + temb[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv("conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = PointwiseConv(self.out_channels, self.dtype, name="conv_shortcut")(x)
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


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "blocked")


def attention_implementation(requested: str | None, queries: int, keys: int,
                             backend: str | None = None) -> str | None:
  """The attention kernel of one layer (`model.attention_implementation`):

  - 'blocked': ours, `dot_product_attention` (query blocks, FlashAttention's backward pass);
  - 'cudnn': jax.nn.dot_product_attention's fused flash kernel on NVIDIA GPUs, only where
    it takes both lengths (the image self-attention, where the time goes), else XLA's
    (None), e.g. for the 77-token text cross-attention;
  - 'xla', or None: jax.nn.dot_product_attention's XLA path (None: JAX's default).

  Unset (None) means 'blocked' on the CPU backend (`backend`, default JAX's), where it ran
  the UNet's attention 4-5x faster than XLA's path (BENCHMARKS.md), and XLA's elsewhere:
  its query blocks are sized for a CPU's cache, and on an accelerator they would only
  serialize the work.
  """
  if requested is None and (backend or jax.default_backend()) == "cpu":
    return "blocked"
  if requested == "cudnn" and (queries % CUDNN_SEQUENCE_MULTIPLE
                               or keys % CUDNN_SEQUENCE_MULTIPLE):
    return None
  return requested


# The float32 logits of one query block, [B, N, c, S], take at most this many bytes: blocks
# that stay in a CPU's cache ran the backward pass fastest (128 of 1024 queries at 8 MiB).
ATTENTION_BLOCK_BYTES = 8 << 20


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q·kᵀ/√H)·v for q [B, T, N, H] and k, v [B, S, N, H], logits and softmax in float32:
  jax.nn.dot_product_attention's XLA path (equal to rounding), but faster on XLA:CPU
  (BENCHMARKS.md, "The CPU gap to PyTorch, op by op").

  That path vmaps its einsums over query groups, which XLA:CPU ran 6-8x slower than plain
  einsums, and its autodiff keeps the [B, N, T, S] probabilities for the backward pass. Here
  queries go in blocks (`ATTENTION_BLOCK_BYTES`), and the backward pass is FlashAttention's:
  it keeps only the output and each row's log-sum-exp, recomputes a block's probabilities P,
  and takes rowsum(P∘dP) as rowsum(dO∘O), [B, T, N] instead of a pass over [B, N, T, S].
  """
  return _attention(q, k, v)


def _query_block(q: jax.Array, k: jax.Array) -> int:
  """The most queries, T halved while even, whose float32 logits fit ATTENTION_BLOCK_BYTES."""
  batch, block, heads, _ = q.shape
  while block % 2 == 0 and 4 * batch * heads * block * k.shape[1] > ATTENTION_BLOCK_BYTES:
    block //= 2
  return block


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, T, ...] -> [T/c, B, c, ...] for c = block."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _join_blocks(x: jax.Array) -> jax.Array:
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _scaled_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """[B, N, T, S] float32, scaled after the product as jax.nn.dot_product_attention does."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  return logits * (1 / math.sqrt(q.shape[-1]))


def _attention_with_lse(q, k, v):
  """(output [B, T, N, H], log-sum-exp of each row of logits [T/c, B, N, c])."""

  def block(q):
    logits = _scaled_logits(q, k)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("bnts,bsnh->btnh", (unnormalized / total).astype(v.dtype), v)
    return out, (peak + jnp.log(total))[..., 0]

  out, lse = jax.lax.map(block, _blocks(q, _query_block(q, k)))
  return _join_blocks(out), lse


@jax.custom_vjp
def _attention(q, k, v):
  return _attention_with_lse(q, k, v)[0]


def _attention_forward(q, k, v):
  out, lse = _attention_with_lse(q, k, v)
  return out, (q, k, v, out, lse)


def _attention_backward(residuals, d_out):
  q, k, v, out, lse = residuals
  scale = 1 / math.sqrt(q.shape[-1])
  # rowsum(P∘dP) = rowsum(dO∘O): dP = dO·vᵀ and O = P·v.
  d_rows = jnp.einsum("btnh,btnh->btn", d_out, out, preferred_element_type=jnp.float32)

  def block(carry, blocks):
    d_k, d_v = carry
    q, d_out, lse, d_rows = blocks
    probs = jnp.exp(_scaled_logits(q, k) - lse[..., None])
    d_v = d_v + jnp.einsum("bnts,btnh->bsnh", probs.astype(d_out.dtype), d_out,
                           preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("btnh,bsnh->bnts", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - jnp.moveaxis(d_rows, 1, 2)[..., None]) * scale
    d_logits = d_logits.astype(q.dtype)
    d_q = jnp.einsum("bnts,bsnh->btnh", d_logits, k, preferred_element_type=jnp.float32)
    d_k = d_k + jnp.einsum("bnts,btnh->bsnh", d_logits, q, preferred_element_type=jnp.float32)
    return (d_k, d_v), d_q

  size = _query_block(q, k)  # The forward pass's: lse comes in its blocks.
  zeros = jnp.zeros(k.shape, jnp.float32)
  (d_k, d_v), d_q = jax.lax.scan(block, (zeros, zeros), (
      _blocks(q, size), _blocks(d_out, size), lse, _blocks(d_rows, size)))
  return _join_blocks(d_q).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention.defvjp(_attention_forward, _attention_backward)


class Attention(nn.Module):
  """diffusers' Attention projections around an attention kernel.

  Attention logits and softmax are float32 in ours, XLA's and cuDNN's kernels, so
  diffusers' `upcast_attention` / `upcast_softmax` hold by construction. `implementation`
  picks the kernel (`attention_implementation`): ours on the CPU, XLA's elsewhere, unless
  set.
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
    if implementation == "blocked":
      out = dot_product_attention(q, k, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    out = out.reshape(*x.shape[:2], inner)
    return nn.Dense(self.out_features, dtype=self.dtype, name="to_out.0")(out)
