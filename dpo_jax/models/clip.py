"""CLIP text and vision encoders in Flax Linen, numerically equal to transformers' PyTorch CLIP.

Module names mirror the transformers state_dict keys (see `weights.py`), so a checkpoint loads by
rename + transpose. Layer norms, softmax and the residual stream stay in float32 whatever the
compute `dtype`: CLIP's residual stream has a few very large channels that bfloat16 would round
away. Images are NHWC, already normalised as `CLIPImageProcessor` does.
"""
from collections.abc import Mapping
import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import UserError
from dpo_jax.models import model_files
from dpo_jax.models import weights

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is exact.
}
# Buffers that checkpoints written by transformers < 4.31 still hold; they are not parameters.
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _field(config: Mapping, key: str, default, what: str, number: bool = False):
  value = config.get(key, default)
  # bool is an int subclass, and a list here (e.g. image_size [h, w]) is a layout we do not build.
  if isinstance(value, bool) or not isinstance(value, (int, float) if number else int):
    raise UserError(f"{what}: config key '{key}' is {value!r}, expected "
                    f"{'a number' if number else 'one integer'}; use a standard CLIP config.json")
  return value


def _common_fields(config: Mapping, defaults: Mapping, what: str) -> dict:
  """Fields shared by the text and vision towers, with transformers' defaults."""
  fields = {key: _field(config, key, default, what) for key, default in defaults.items()}
  fields["layer_norm_eps"] = _field(config, "layer_norm_eps", 1e-5, what, number=True)
  fields["hidden_act"] = config.get("hidden_act", "quick_gelu")
  if fields["hidden_act"] not in _ACTIVATIONS:
    raise UserError(f"{what}: config key 'hidden_act' is {fields['hidden_act']!r}, only "
                    f"{' and '.join(map(repr, _ACTIVATIONS))} are supported; use a CLIP checkpoint")
  if fields["hidden_size"] % fields["num_attention_heads"]:
    raise UserError(f"{what}: config key 'hidden_size' ({fields['hidden_size']}) is not a "
                    f"multiple of 'num_attention_heads' ({fields['num_attention_heads']}); "
                    "restore the checkpoint's own config.json")
  return fields


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float
  eos_token_id: int
  projection_dim: int

  @classmethod
  def from_dict(cls, config: Mapping, what: str = "CLIP text config") -> "CLIPTextConfig":
    """From a CLIPTextModel(WithProjection) config.json, or a CLIPModel's `text_config`."""
    defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                    eos_token_id=49407, projection_dim=512)
    return cls(**_common_fields(config, defaults, what))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  image_size: int
  patch_size: int
  num_channels: int
  projection_dim: int

  @classmethod
  def from_dict(cls, config: Mapping, what: str = "CLIP vision config") -> "CLIPVisionConfig":
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                    projection_dim=512)
    return cls(**_common_fields(config, defaults, what))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int
  logit_scale_init_value: float

  @classmethod
  def from_dict(cls, config: Mapping, what: str = "CLIP config") -> "CLIPConfig":
    """From a CLIPModel config.json; the top-level `projection_dim` sizes both projections."""
    projection_dim = _field(config, "projection_dim", 512, what)
    towers = {}
    for name in ("text", "vision"):
      # Old configs also hold `text_config_dict`, which transformers lets override `text_config`.
      sub = {**(config.get(f"{name}_config") or {}), **(config.get(f"{name}_config_dict") or {}),
             "projection_dim": projection_dim}
      parse = CLIPTextConfig.from_dict if name == "text" else CLIPVisionConfig.from_dict
      towers[name] = parse(sub, f"{what} ({name}_config)")
    scale = _field(config, "logit_scale_init_value", 2.6592, what, number=True)
    return cls(towers["text"], towers["vision"], projection_dim, float(scale))


class TransformerOutput(NamedTuple):
  last_hidden_state: jax.Array  # (B, T, D); for text after the final layer norm, as transformers.
  pooler_output: jax.Array  # (B, D): text at the EOS token; vision the normed CLS token.
  hidden_states: tuple[jax.Array, ...]  # Embeddings, then every layer's output (no final norm).


class ProjectedTextOutput(NamedTuple):
  text_embeds: jax.Array  # (B, projection_dim): pooled output through text_projection.
  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]  # SDXL conditions on hidden_states[-2].


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Two-pass variance as PyTorch: E[x²] - E[x]² loses digits on CLIP's large residual channels.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
  num_heads: int
  causal: bool
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    dense = functools.partial(nn.Dense, width, dtype=self.dtype)
    q, k, v = (dense(name=name)(x).reshape(batch, length, self.num_heads, -1)
               for name in ("q_proj", "k_proj", "v_proj"))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                       implementation=self.attention_implementation)
    return dense(name="out_proj")(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = _ACTIVATIONS[self.config.hidden_act](x)
    return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    eps = self.config.layer_norm_eps
    attention = CLIPAttention(self.config.num_attention_heads, self.causal, self.dtype,
                              self.attention_implementation, name="self_attn")
    x = x + attention(_layer_norm(eps, "layer_norm1")(x))
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(_layer_norm(eps, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, x) -> tuple[jax.Array, ...]:
    """All hidden states: the input, then each layer's output."""
    hidden_states = [x]
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.causal, self.dtype, self.attention_implementation,
                           name=f"layers.{i}")(x)
      hidden_states.append(x)
    return tuple(hidden_states)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    length = input_ids.shape[-1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"{length} tokens but max_position_embeddings is "
                       f"{self.config.max_position_embeddings}")
    width = self.config.hidden_size
    tokens = nn.Embed(self.config.vocab_size, width, name="token_embedding")(input_ids)
    positions = nn.Embed(self.config.max_position_embeddings, width, name="position_embedding")
    return tokens + positions(jnp.arange(length))


def _eos_positions(input_ids, eos_token_id: int):
  """Where transformers' CLIPTextModel pools, rule for rule."""
  if eos_token_id == 2:
    # Configs written before transformers PR #24773 say 2; it then pools at the largest id,
    # which is the EOS token of the real CLIP vocabulary. SD 1.x, 2.x and XL all take this path.
    return jnp.argmax(input_ids, axis=-1)
  # The first EOS: tokenizers may pad with the EOS token itself.
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
  """Token ids (B, T) -> TransformerOutput, causal, as transformers' CLIPTextModel."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, input_ids) -> TransformerOutput:
    x = CLIPTextEmbeddings(self.config, name="embeddings")(input_ids)
    hidden_states = CLIPEncoder(self.config, True, self.dtype, self.attention_implementation,
                                name="encoder")(x)
    last = _layer_norm(self.config.layer_norm_eps, "final_layer_norm")(hidden_states[-1])
    eos = _eos_positions(input_ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return TransformerOutput(last, pooled, hidden_states)


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    config = self.config
    if pixel_values.shape[1:3] != (config.image_size, config.image_size):
      raise ValueError(f"images are {pixel_values.shape[1:3]} but the model takes "
                       f"{config.image_size}x{config.image_size}")
    patch = (config.patch_size, config.patch_size)
    patches = nn.Conv(config.hidden_size, patch, strides=patch, padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixel_values)
    patches = patches.reshape(patches.shape[0], -1, config.hidden_size)  # Row-major, as torch.
    cls = self.param("class_embedding", nn.initializers.normal(config.hidden_size**-0.5),
                     (config.hidden_size,))
    cls = jnp.broadcast_to(cls, (patches.shape[0], 1, config.hidden_size))
    x = jnp.concatenate([cls, patches.astype(cls.dtype)], axis=1)
    positions = nn.Embed(x.shape[1], config.hidden_size, name="position_embedding")
    return x + positions(jnp.arange(x.shape[1]))


class CLIPVisionTransformer(nn.Module):
  """NHWC images -> TransformerOutput, as transformers' CLIPVisionModel."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, pixel_values) -> TransformerOutput:
    eps = self.config.layer_norm_eps
    x = CLIPVisionEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values)
    x = _layer_norm(eps, "pre_layrnorm")(x)  # sic: transformers' spelling is the weight key.
    hidden_states = CLIPEncoder(self.config, False, self.dtype, self.attention_implementation,
                                name="encoder")(x)
    pooled = _layer_norm(eps, "post_layernorm")(hidden_states[-1][:, 0])
    return TransformerOutput(hidden_states[-1], pooled, hidden_states)


class CLIPTextModel(nn.Module):
  """SD 1.x / 2.x `text_encoder`, and SDXL's first one."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, input_ids) -> TransformerOutput:
    return CLIPTextTransformer(self.config, self.dtype, self.attention_implementation,
                               name="text_model")(input_ids)


class CLIPTextModelWithProjection(nn.Module):
  """SDXL's `text_encoder_2`."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, input_ids) -> ProjectedTextOutput:
    out = CLIPTextTransformer(self.config, self.dtype, self.attention_implementation,
                              name="text_model")(input_ids)
    text_embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                           name="text_projection")(out.pooler_output)
    return ProjectedTextOutput(text_embeds, out.last_hidden_state, out.hidden_states)


class CLIPModel(nn.Module):
  """Text and image towers with projections into one space (scorers such as PickScore)."""
  config: CLIPConfig
  dtype: Any = jnp.float32
  attention_implementation: str = "xla"

  def setup(self):
    config = self.config
    self.text_model = CLIPTextTransformer(config.text, self.dtype, self.attention_implementation)
    self.vision_model = CLIPVisionTransformer(config.vision, self.dtype,
                                              self.attention_implementation)
    self.text_projection = nn.Dense(config.projection_dim, use_bias=False, dtype=self.dtype)
    self.visual_projection = nn.Dense(config.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(config.logit_scale_init_value), ())

  def get_text_features(self, input_ids):
    """Projected, unnormalised text embeddings (B, projection_dim)."""
    return self.text_projection(self.text_model(input_ids).pooler_output)

  def get_image_features(self, pixel_values):
    """Projected, unnormalised image embeddings (B, projection_dim)."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def get_logit_scale(self):
    """The learnt log temperature; logits are exp(logit_scale) * cosine similarity."""
    return self.logit_scale

  def __call__(self, input_ids, pixel_values):
    """logits_per_image (B_images, B_texts) in float32, as transformers' CLIPModel."""
    def normalise(x):
      x = x.astype(jnp.float32)
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    text = normalise(self.get_text_features(input_ids))
    image = normalise(self.get_image_features(pixel_values))
    return jnp.exp(self.logit_scale) * image @ text.T


_TEXT_MODELS = {"CLIPTextModel": CLIPTextModel,
                "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def load_clip(folder: str, kind: str | None = None, *, dtype=jnp.float32,
              attention_implementation: str = "xla", variant: str | None = None):
  """(module, float32 params) from a transformers folder (config.json + model.safetensors).

  `kind` is the transformers class name ('CLIPTextModel', 'CLIPTextModelWithProjection' or
  'CLIPModel'); by default the config's `architectures` entry. `dtype` is the compute dtype.
  """
  config = model_files.read_config(folder)
  kind = kind or (config.get("architectures") or [None])[0]
  if kind == "CLIPModel":
    clip_config = CLIPConfig.from_dict(config, folder)
    module = CLIPModel(clip_config, dtype, attention_implementation)
    vision = clip_config.vision
    inputs = (jnp.zeros((1, clip_config.text.max_position_embeddings), jnp.int32),
              jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels)))
  elif kind in _TEXT_MODELS:
    text_config = CLIPTextConfig.from_dict(config, folder)
    module = _TEXT_MODELS[kind](text_config, dtype, attention_implementation)
    inputs = (jnp.zeros((1, text_config.max_position_embeddings), jnp.int32),)
  else:
    raise UserError(f"{folder}: CLIP kind {kind!r} is not supported; use one of "
                    f"{', '.join(['CLIPModel', *_TEXT_MODELS])}")
  state = model_files.read_state_dict(folder, weights_name=model_files.TRANSFORMERS_WEIGHTS,
                                      variant=variant)
  if not any(key.startswith("text_model.") for key in state):
    # transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix that hub
    # checkpoints (and our module tree) have.
    state = {f"text_model.{key}": value for key, value in state.items()}
  abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
  params = weights.state_dict_to_params(state, abstract, what=folder, dtype=np.float32,
                                        ignore_unexpected=_BUFFERS)
  return module, params
