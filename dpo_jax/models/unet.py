"""UNet2DConditionModel (Stable Diffusion 1.x, 2.x and XL) in Flax Linen: its config, the
network, and its diffusers `unet/` folder I/O, in one module as vae.py and clip.py.

Numerically diffusers' UNet2DConditionModel, with parameter paths equal to its state_dict
keys (weights.py), but channels-last: `sample` is (B, H, W, C) and so is the output.
`encoder_hidden_states` is (B, T, D). SDXL's extra conditioning (`text_embeds`, `time_ids`)
is passed as keyword arguments.

The config is a diffusers `unet/config.json`, validated and normalised into one frozen
dataclass: per-block settings that diffusers accepts as an int or a list are expanded to
tuples once, so the model code never branches on the config's spelling, and anything we do
not implement is refused at load time with one line naming the key, instead of being
silently ignored and producing a different network.
"""
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.errors import UserError
from dpo_jax.models import model_files, weights
from dpo_jax.models.layers import (Attention, Downsample2D, PointwiseConv, ResnetBlock2D,
                                   TimestepEmbedding, Upsample2D, group_norm, timestep_embedding)

# ---------------------------------------------------------------------------------------------
# The config.
# ---------------------------------------------------------------------------------------------

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys whose only supported value is diffusers' default (any other value changes the network).
_FIXED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,  # Only read by addition_embed_type='text'.
    "dropout": 0.0,  # Dropout is never used in fine-tuning runs; refuse rather than ignore.
}
# Keys that change nothing in the forward pass we compute.
_IGNORED = {"sample_size", "upcast_attention"}  # Attention logits are always float32.


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Every architectural choice of a supported UNet2DConditionModel, per block as tuples."""
  in_channels: int
  out_channels: int
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  transformer_layers_per_block: tuple[int, ...]
  num_heads: tuple[int, ...]
  cross_attention_dim: tuple[int, ...]
  use_linear_projection: bool
  norm_num_groups: int
  norm_eps: float
  flip_sin_to_cos: bool
  freq_shift: float
  mid_block_scale_factor: float
  conv_in_kernel: int
  conv_out_kernel: int
  addition_embed_type: str | None
  addition_time_embed_dim: int | None
  projection_class_embeddings_input_dim: int | None
  raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], where: str = "unet/config.json") -> "UNetConfig":
    """Validates a diffusers UNet config dict; `where` names the file in error messages."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise UserError(f"{where}: _class_name '{config['_class_name']}' is not supported; "
                      "only UNet2DConditionModel (SD 1.x, 2.x, XL) is")
    for key, default in _FIXED.items():
      if key in config and config[key] != default:
        raise UserError(f"{where}: {key}={config[key]!r} is not supported (only {default!r})")
    known = set(_FIXED) | _IGNORED | {f.name for f in dataclasses.fields(cls)} | {
        "attention_head_dim", "num_attention_heads"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
      raise UserError(f"{where}: key '{unknown[0]}' is not supported by dpo_jax's UNet")
    get = lambda key, default: config.get(key, default)
    blocks = len(get("down_block_types", ()))
    per_block = lambda key, default: _per_block(get(key, default), blocks, key, where)

    down = tuple(get("down_block_types", ()))
    up = tuple(get("up_block_types", ()))
    for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                                ("up_block_types", up, UP_BLOCKS)):
      bad = [t for t in types if t not in allowed]
      if bad:
        raise UserError(f"{where}: {key} entry '{bad[0]}' is not supported; use {allowed}")
    channels = tuple(get("block_out_channels", ()))
    if not (len(down) == len(up) == len(channels) > 0):
      raise UserError(f"{where}: down_block_types, up_block_types and block_out_channels "
                      "must have the same non-zero length")
    # diffusers' historical naming: `attention_head_dim` holds the number of HEADS unless
    # `num_attention_heads` is given (UNet2DConditionModel.__init__).
    heads = get("num_attention_heads", None) or get("attention_head_dim", 8)
    addition = get("addition_embed_type", None)
    if addition not in (None, "text_time"):
      raise UserError(f"{where}: addition_embed_type '{addition}' is not supported; "
                      "only 'text_time' (SDXL) or null")
    if addition and not (get("addition_time_embed_dim", None)
                         and get("projection_class_embeddings_input_dim", None)):
      raise UserError(f"{where}: addition_embed_type 'text_time' needs addition_time_embed_dim "
                      "and projection_class_embeddings_input_dim")
    for key in ("conv_in_kernel", "conv_out_kernel"):
      if get(key, 3) % 2 != 1:
        raise UserError(f"{where}: {key} must be odd, got {get(key, 3)}")
    return cls(
        in_channels=get("in_channels", 4),
        out_channels=get("out_channels", 4),
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=per_block("layers_per_block", 2),
        transformer_layers_per_block=per_block("transformer_layers_per_block", 1),
        num_heads=_per_block(heads, blocks, "attention_head_dim", where),
        cross_attention_dim=per_block("cross_attention_dim", 1280),
        use_linear_projection=bool(get("use_linear_projection", False)),
        norm_num_groups=get("norm_num_groups", 32),
        norm_eps=get("norm_eps", 1e-5),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=get("freq_shift", 0),
        mid_block_scale_factor=get("mid_block_scale_factor", 1),
        conv_in_kernel=get("conv_in_kernel", 3),
        conv_out_kernel=get("conv_out_kernel", 3),
        addition_embed_type=addition,
        addition_time_embed_dim=get("addition_time_embed_dim", None),
        projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim", None),
        raw=dict(config),
    )


def _per_block(value, blocks: int, key: str, where: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * blocks
  if isinstance(value, (list, tuple)) and len(value) == blocks and all(
      isinstance(v, int) for v in value):
    return tuple(value)
  raise UserError(f"{where}: {key} must be an int or a list of {blocks} ints, got {value!r}")

# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------

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


# What a block under remat keeps of its forward pass for the backward pass. 'full': nothing
# but its inputs, so the backward pass recomputes all of it. 'dots': also the outputs of its
# matrix products that have no batch dimension (the dense and 1x1 projections, the
# feed-forward), not the attention scores (batched products, which grow with the square of
# the tokens) nor the 3x3 convolutions: more memory, less recomputation.
REMAT_POLICIES = {"full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def recomputed(module_class, policy: str):
  """`module_class` recomputed in the backward pass, keeping what `policy` names."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}: one of {', '.join(REMAT_POLICIES)}")
  return nn.remat(module_class, policy=REMAT_POLICIES[policy])


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
  remat_policy: str = "full"

  @nn.compact
  def __call__(self, x, context):
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    # A 1x1 conv and a dense layer are the same map; diffusers stores them differently.
    layer = nn.Dense if self.use_linear_projection else PointwiseConv
    project = lambda name, y: layer(self.channels, dtype=self.dtype, name=name)(y)
    h = project("proj_in", h.reshape(batch, height * width, channels))
    block = recomputed(BasicTransformerBlock, self.remat_policy) if self.remat else \
        BasicTransformerBlock
    for i in range(self.layers):
      h = block(self.channels, self.heads, self.attention_implementation, self.dtype,
                name=f"transformer_blocks.{i}")(h, context)
    h = project("proj_out", h)
    return h.reshape(batch, height, width, channels) + x


class UNet2DConditionModel(nn.Module):
  """Predicts noise (or v) for NHWC latents at integer or float `timesteps`.

  `dtype` is the compute dtype (bfloat16 on accelerators); parameters are float32.
  `remat` recomputes each resnet and transformer block in the backward pass, trading about
  a third more compute for activation memory that no longer grows with depth;
  `remat_policy` says what a recomputed block keeps (`REMAT_POLICIES`).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  remat: bool = False
  remat_policy: str = "full"

  def _resnet(self, out_channels, name, scale=1.0):
    block = recomputed(ResnetBlock2D, self.remat_policy) if self.remat else ResnetBlock2D
    return block(out_channels, self.config.norm_num_groups, self.config.norm_eps,
                 output_scale_factor=scale, dtype=self.dtype, name=name)

  def _transformer(self, channels, heads, layers, name):
    return Transformer2DModel(channels, heads, layers, self.config.norm_num_groups,
                              self.config.use_linear_projection, self.attention_implementation,
                              self.remat, self.dtype, self.remat_policy, name=name)

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
  # The key is an argument, not a constant of the program: every seed runs one compiled
  # init (which takes XLA:CPU 10-20 s for a tiny UNet), from the persistent cache too.
  return jax.jit(lambda r, a, k: model.init(r, *a, **k))(rng, *zeros)["params"]

# ---------------------------------------------------------------------------------------------
# A diffusers `unet/` folder <-> (UNet2DConditionModel, params).
# ---------------------------------------------------------------------------------------------


def build_unet(config: dict, *, where: str = "unet config",
               **model_options) -> UNet2DConditionModel:
  """The model for a diffusers config dict; `model_options` are dtype, remat and
  attention_implementation."""
  return UNet2DConditionModel(UNetConfig.from_diffusers(config, where), **model_options)


def load_unet(folder: str, *, variant: str | None = None, params_dtype=jnp.float32,
              **model_options):
  """Reads config.json and the safetensors weights (single, sharded or a variant like fp16).

  Returns (model, params) with params as host numpy arrays in `params_dtype`.
  """
  config = model_files.read_config(folder)
  model = build_unet(config, where=os.path.join(folder, "config.json"), **model_options)
  state = model_files.read_state_dict(folder, model_files.DIFFUSERS_WEIGHTS, variant)
  params = weights.state_dict_to_params(state, init_abstract(model), what=folder,
                                        dtype=params_dtype)
  return model, params


def save_unet(model: UNet2DConditionModel, params, folder: str, *, dtype=None,
              max_shard_bytes: int = model_files.DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes config.json + diffusion_pytorch_model(.safetensors | shards + index)."""
  state = weights.params_to_state_dict(params)
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  config = {**model.config.raw, "_class_name": "UNet2DConditionModel"}
  model_files.write_config(config, folder)
  model_files.write_state_dict(state, folder, model_files.DIFFUSERS_WEIGHTS, max_shard_bytes)
