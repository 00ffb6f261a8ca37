"""A diffusers `unet/config.json`, validated and normalised into one frozen dataclass.

Per-block settings that diffusers accepts as an int or a list are expanded to tuples here,
once, so the model code never branches on the config's spelling. Anything we do not
implement is refused at load time with one line naming the key, instead of being silently
ignored and producing a different network.
"""
import dataclasses
from typing import Any

from dpo_jax.errors import UserError

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
