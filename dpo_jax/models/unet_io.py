"""A diffusers `unet/` folder <-> (UNet2DConditionModel, params)."""
import os

import jax.numpy as jnp

from dpo_jax.models import model_files, weights
from dpo_jax.models.unet import UNet2DConditionModel, init_abstract
from dpo_jax.models.unet_config import UNetConfig


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
