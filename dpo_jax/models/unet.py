"""UNet2DConditionModel (Stable Diffusion 1.x, 2.x and XL) in Flax Linen.

Numerically diffusers' UNet2DConditionModel, with parameter paths equal to its state_dict
keys (weights.py), but channels-last: `sample` is (B, H, W, C) and so is the output.
`encoder_hidden_states` is (B, T, D). SDXL's extra conditioning (`text_embeds`, `time_ids`)
is passed as keyword arguments.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models.layers import (Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                   Upsample2D, group_norm, timestep_embedding)
from dpo_jax.models.unet_config import UNetConfig

Dtype = Any


class FeedForward(nn.Module):
  """GEGLU feed-forward: proj to 2x inner, value * gelu(gate), then back to `dim`."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    inner = 4 * self.dim
    h = nn.Dense(2 * inner, dtype=self.dtype, name="net.0.proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    # torch's F.gelu default is the exact (erf) form, not the tanh approximation.
    h = value * nn.gelu(gate, approximate=False)
    return nn.Dense(self.dim, dtype=self.dtype, name="net.2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward."""
  dim: int
  heads: int
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False,
                                     name=name)
    attention = lambda name: Attention(self.heads, self.dim // self.heads, self.dim,
                                       implementation=self.attention_implementation,
                                       dtype=self.dtype, name=name)
    x = x + attention("attn1")(norm("norm1")(x))
    x = x + attention("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, project to tokens, `layers` transformer blocks, project back, residual."""
  channels: int
  heads: int
  layers: int
  groups: int
  use_linear_projection: bool
  attention_implementation: str | None = None
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    # A 1x1 conv and a dense layer are the same map; diffusers stores them differently.
    if self.use_linear_projection:
      project = lambda name, y: nn.Dense(self.channels, dtype=self.dtype, name=name)(y)
    else:
      project = lambda name, y: nn.Conv(self.channels, (1, 1), dtype=self.dtype, name=name)(
          y[:, :, None, :])[:, :, 0, :]
    h = project("proj_in", h.reshape(batch, height * width, channels))
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.layers):
      h = block(self.channels, self.heads, self.attention_implementation, self.dtype,
                name=f"transformer_blocks.{i}")(h, context)
    h = project("proj_out", h)
    return h.reshape(batch, height, width, channels) + x


class UNet2DConditionModel(nn.Module):
  """Predicts noise (or v) for NHWC latents at integer or float `timesteps`.

  `dtype` is the compute dtype (bfloat16 on accelerators); parameters are float32.
  `remat` recomputes each resnet and transformer block in the backward pass, trading about
  a third more compute for activation memory that no longer grows with depth.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  remat: bool = False

  def _resnet(self, out_channels, name, scale=1.0):
    block = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return block(out_channels, self.config.norm_num_groups, self.config.norm_eps,
                 output_scale_factor=scale, dtype=self.dtype, name=name)

  def _transformer(self, channels, heads, layers, name):
    return Transformer2DModel(channels, heads, layers, self.config.norm_num_groups,
                              self.config.use_linear_projection, self.attention_implementation,
                              self.remat, self.dtype, name=name)

  def _embed_time(self, timesteps, batch, text_embeds, time_ids):
    cfg = self.config
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                              cfg.freq_shift).astype(self.dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="time_embedding")(temb)
    if cfg.addition_embed_type == "text_time":
      if text_embeds is None or time_ids is None:
        raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds "
                         "and time_ids")
      time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                       cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
      added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
      emb = emb + TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="add_embedding")(
          added.astype(self.dtype))
    return emb

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, *, text_embeds=None,
               time_ids=None):
    cfg = self.config
    emb = self._embed_time(timesteps, sample.shape[0], text_embeds, time_ids)
    context = encoder_hidden_states.astype(self.dtype)
    conv = lambda features, kernel, name: nn.Conv(features, (kernel, kernel), padding=kernel // 2,
                                                  dtype=self.dtype, name=name)
    h = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, "conv_in")(sample.astype(self.dtype))

    skips = [h]
    last = len(cfg.down_block_types) - 1
    for b, block_type in enumerate(cfg.down_block_types):
      channels, prefix = cfg.block_out_channels[b], f"down_blocks.{b}"
      for i in range(cfg.layers_per_block[b]):
        h = self._resnet(channels, f"{prefix}.resnets.{i}")(h, emb)
        if block_type == "CrossAttnDownBlock2D":
          h = self._transformer(channels, cfg.num_heads[b], cfg.transformer_layers_per_block[b],
                                f"{prefix}.attentions.{i}")(h, context)
        skips.append(h)
      if b != last:
        h = Downsample2D(channels, dtype=self.dtype, name=f"{prefix}.downsamplers.0")(h)
        skips.append(h)

    channels = cfg.block_out_channels[-1]
    h = self._resnet(channels, "mid_block.resnets.0", cfg.mid_block_scale_factor)(h, emb)
    h = self._transformer(channels, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1],
                          "mid_block.attentions.0")(h, context)
    h = self._resnet(channels, "mid_block.resnets.1", cfg.mid_block_scale_factor)(h, emb)

    for b, block_type in enumerate(cfg.up_block_types):
      level = last - b  # Up block b mirrors down block `level`.
      channels, prefix = cfg.block_out_channels[level], f"up_blocks.{b}"
      for i in range(cfg.layers_per_block[level] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._resnet(channels, f"{prefix}.resnets.{i}")(h, emb)
        if block_type == "CrossAttnUpBlock2D":
          h = self._transformer(channels, cfg.num_heads[level],
                                cfg.transformer_layers_per_block[level],
                                f"{prefix}.attentions.{i}")(h, context)
      if b != last:
        # Odd latent sides make the skip larger than 2x; diffusers then resizes to its size.
        h = Upsample2D(channels, dtype=self.dtype, name=f"{prefix}.upsamplers.0")(
            h, skips[-1].shape[1:3])

    h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(h))
    return conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out")(h)


def _example_inputs(config: UNetConfig, sample_size: int = 8, context_length: int = 4):
  """(args, kwargs) shapes for `init`: any size works, parameters do not depend on it."""
  struct = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (struct(1, sample_size, sample_size, config.in_channels), struct(1),
          struct(1, context_length, config.cross_attention_dim[0]))
  kwargs = {}
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    kwargs = dict(text_embeds=struct(1, text_dim), time_ids=struct(1, 6))
  return args, kwargs


def init_abstract(model: UNet2DConditionModel):
  """The params pytree's shapes and dtypes, without allocating or computing anything."""
  args, kwargs = _example_inputs(model.config)
  return jax.eval_shape(lambda a, k: model.init(jax.random.key(0), *a, **k), args, kwargs)["params"]


def init_params(model: UNet2DConditionModel, rng: jax.Array):
  """Randomly initialised float32 params (flax's default initialisers)."""
  args, kwargs = _example_inputs(model.config)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (args, kwargs))
  return jax.jit(lambda a, k: model.init(rng, *a, **k))(*zeros)["params"]
