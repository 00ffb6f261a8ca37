"""A whole diffusers Stable Diffusion pipeline folder <-> the Flax models DPO trains with.

`load_pipeline` reads `model_index.json` and every component DPO needs; `export_pipeline`
writes the tuned UNet beside byte-for-byte copies of everything else, so the result is the
source pipeline with only the UNet swapped, loadable by `diffusers.DiffusionPipeline`.
"""
import dataclasses
import os
import shutil
import uuid
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import transformers

from dpo_jax import diffusion
from dpo_jax.errors import UserError
from dpo_jax.models import clip, model_files, tokenizer, unet as unet_lib, vae as vae_lib
from dpo_jax.models.unet import UNet2DConditionModel
from dpo_jax.models.vae import AutoencoderKL

MODEL_INDEX = "model_index.json"

# Pipeline class -> (kind, its (text encoder, tokenizer, encoder class) slots in model_index.json).
_PIPELINES = {
    "StableDiffusionPipeline": ("sd", (("text_encoder", "tokenizer", "CLIPTextModel"),)),
    "StableDiffusionXLPipeline": ("sdxl", (
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"))),
}


@dataclasses.dataclass(frozen=True, eq=False)  # Holds arrays: identity, not value, equality.
class Pipeline:
  """The frozen parts of a Stable Diffusion pipeline and the UNet DPO starts from.

  Attributes:
    kind: 'sd' (SD 1.x / 2.x) or 'sdxl'.
    folder: the local pipeline folder it was read from (a hub snapshot for hub ids).
    unet, unet_params: the UNet module and its float32 params (host numpy arrays).
    vae, vae_params: the AutoencoderKL module and its float32 params.
    text_encoders: ((module, params), ...) in model_index order: one for 'sd', two for 'sdxl'.
    tokenizers: the matching transformers CLIPTokenizers.
    scheduler_config: scheduler/scheduler_config.json as a dict.
    noise_schedule: the training noise schedule that config defines.
  """
  kind: str
  folder: str
  unet: UNet2DConditionModel
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoders: tuple[tuple[nn.Module, Any], ...]
  tokenizers: tuple[transformers.CLIPTokenizer, ...]
  scheduler_config: dict
  noise_schedule: diffusion.NoiseSchedule


def read_model_index(folder: str) -> dict:
  """model_index.json of a pipeline folder; a one-line error when it is not one."""
  if not os.path.isfile(os.path.join(folder, MODEL_INDEX)):
    raise UserError(f"{folder} has no {MODEL_INDEX}; model.pretrained must be a diffusers "
                    "pipeline folder (the one holding model_index.json, unet/, vae/, ...)")
  return model_files.read_config(folder, MODEL_INDEX)


def _kind_and_encoders(index: dict, where: str):
  name = index.get("_class_name")
  if name not in _PIPELINES:
    raise UserError(f"{where}: pipeline class '{name}' is not supported; use a "
                    f"{' or '.join(_PIPELINES)} folder (SD 1.x/2.x or SDXL base)")
  return _PIPELINES[name]


def components(index: dict) -> tuple[str, ...]:
  """The components model_index.json lists, without the null ones (e.g. safety_checker)."""
  return tuple(name for name, value in index.items()
               if not name.startswith("_") and isinstance(value, list) and None not in value)


def _require(index: dict, name: str, cls: str | None, where: str) -> None:
  listed = index.get(name)
  if not isinstance(listed, list) or None in listed:
    raise UserError(f"{where}: the pipeline has no '{name}' component, which training needs; "
                    "use a complete pipeline folder")
  if cls and listed[1] != cls:
    raise UserError(f"{where}: '{name}' is a {listed[1]}, expected {cls}")


def _check_compatible(unet: UNet2DConditionModel, encoders, where: str) -> None:
  """The UNet must take what the text encoders produce; catches mixed-up component folders."""
  context = sum(module.config.hidden_size for module, _ in encoders)
  if context != unet.config.cross_attention_dim[0]:
    raise UserError(f"{where}: the text encoders give {context}-wide states but the UNet's "
                    f"cross_attention_dim is {unet.config.cross_attention_dim[0]}; the "
                    "components do not belong together")
  if unet.config.addition_embed_type == "text_time":
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    projection = encoders[-1][0].config.projection_dim
    if projection != pooled:
      raise UserError(f"{where}: text_encoder_2 projects to {projection} but the UNet's "
                      f"add_embedding expects {pooled}; the components do not belong together")


def _unet_folder(folder: str) -> str:
  """`model.unet_init`: a UNet folder (config.json) or a pipeline-like folder with unet/."""
  folder = model_files.resolve_pretrained(folder, key="model.unet_init")
  if os.path.isfile(os.path.join(folder, "unet", "config.json")):
    return os.path.join(folder, "unet")
  if os.path.isfile(os.path.join(folder, "config.json")):
    return folder
  raise UserError(f"model.unet_init: {folder} holds neither config.json nor unet/config.json; "
                  "point it at a diffusers UNet folder or a pipeline folder")


def load_pipeline(folder_or_hub_id: str, *, dtype=jnp.float32, vae_dtype=None,
                  text_encoder_dtype=None, variant: str | None = None,
                  attention_implementation: str | None = None, remat: bool = False,
                  remat_policy: str = "full", vae: str | None = None, unet_init: str | None = None,
                  revision: str | None = None) -> Pipeline:
  """Reads a StableDiffusionPipeline or StableDiffusionXLPipeline folder (or hub id).

  Args:
    folder_or_hub_id: a local diffusers pipeline folder, or a hub id like 'org/name'.
    dtype: compute dtype of the UNet, and of the VAE and text encoders unless theirs are
      given; params stay float32.
    vae_dtype, text_encoder_dtype: compute dtypes of the VAE and of the text encoders.
    variant: weights variant of every component (e.g. 'fp16'), as diffusers' `variant`.
    attention_implementation: for the UNet (`layers.attention_implementation`) and, when
      'xla' or 'cudnn', for the text encoders; None: each module's default.
    remat: recompute the UNet's blocks in the backward pass.
    remat_policy: what a recomputed block keeps (`unet.REMAT_POLICIES`).
    vae: a VAE folder (or hub id) to use instead of the pipeline's vae/ (e.g. SDXL's
      fp16-fix VAE); export still writes the pipeline's own.
    unet_init: a UNet (or pipeline) folder whose UNet replaces the pipeline's, e.g. an
      earlier fine-tune to start policy and reference from.
    revision: the hub revision of `folder_or_hub_id` (a branch, tag or commit).

  Raises:
    UserError: not a pipeline folder, an unsupported pipeline class, or a missing or
      mismatched component.
  """
  folder = model_files.resolve_pretrained(folder_or_hub_id, revision=revision)
  index = read_model_index(folder)
  where = os.path.join(folder, MODEL_INDEX)
  kind, slots = _kind_and_encoders(index, where)
  for name in ("unet", "vae", "scheduler"):
    _require(index, name, None, where)
  for encoder_name, tokenizer_name, cls in slots:
    _require(index, encoder_name, cls, where)
    _require(index, tokenizer_name, None, where)
  attention = ({"attention_implementation": attention_implementation}
               if attention_implementation else {})  # Else each module's own default.
  # Ours ('blocked') is the UNet's; the text encoders' causal attention stays XLA's.
  text_attention = {} if attention_implementation == "blocked" else attention
  sub = lambda name: os.path.join(folder, name)

  unet_folder = _unet_folder(unet_init) if unet_init else sub("unet")
  unet, unet_params = unet_lib.load_unet(unet_folder, variant=variant, dtype=dtype, remat=remat,
                                        remat_policy=remat_policy, **attention)
  vae_folder = model_files.resolve_pretrained(vae, key="model.vae") if vae else sub("vae")
  vae_model, vae_params = vae_lib.load_vae(vae_folder, variant=variant, dtype=vae_dtype or dtype)
  encoders, tokenizers = [], []
  for encoder_name, tokenizer_name, cls in slots:
    encoders.append(clip.load_clip(sub(encoder_name), cls, dtype=text_encoder_dtype or dtype,
                                   variant=variant, **text_attention))
    tokenizers.append(tokenizer.load_tokenizer(sub(tokenizer_name)))
  _check_compatible(unet, encoders, where)
  scheduler_config = model_files.read_config(sub("scheduler"), "scheduler_config.json")
  return Pipeline(
      kind=kind, folder=folder, unet=unet, unet_params=unet_params, vae=vae_model,
      vae_params=vae_params, text_encoders=tuple(encoders), tokenizers=tuple(tokenizers),
      scheduler_config=scheduler_config,
      noise_schedule=diffusion.NoiseSchedule.from_scheduler_config(scheduler_config))


def _check_output(output_folder: str, overwrite: bool) -> None:
  if os.path.isfile(output_folder):
    raise UserError(f"export output {output_folder} is a file; give a folder path")
  if os.path.isdir(output_folder) and os.listdir(output_folder) and not overwrite:
    raise UserError(f"export output {output_folder} exists and is not empty; choose a new "
                    "folder or pass overwrite=True (--overwrite) to replace it")


def _write_pipeline(pipeline: Pipeline, unet_params, folder: str) -> None:
  source = pipeline.folder
  index = read_model_index(source)
  shutil.copy2(os.path.join(source, MODEL_INDEX), folder)
  for name in components(index):
    if name == "unet":
      unet_lib.save_unet(pipeline.unet, unet_params, os.path.join(folder, name))
      continue
    if not os.path.isdir(os.path.join(source, name)):
      raise UserError(f"{source} lists component '{name}' but has no {name}/ folder; "
                      "restore the source pipeline before exporting")
    # Copied, never re-serialised: what DPO did not change stays bit-identical. Hub
    # snapshots hold symlinks into the cache; copy what they point to.
    shutil.copytree(os.path.join(source, name), os.path.join(folder, name))


def _sibling(folder: str, tag: str) -> str:
  parent, name = os.path.split(folder)
  return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")


def export_pipeline(pipeline: Pipeline, unet_params, output_folder: str, *,
                    overwrite: bool = False) -> None:
  """Writes the pipeline with its UNet replaced by `unet_params` as a diffusers folder.

  The UNet is written in its params' dtype (unet/config.json + safetensors); every other
  component listed in model_index.json is copied file by file from `pipeline.folder`. The
  folder is assembled beside `output_folder` and renamed into place, so an interrupted
  export never leaves a half-written output.

  Raises:
    UserError: `output_folder` is a file, or a non-empty folder and not `overwrite`.
  """
  output_folder = os.path.abspath(output_folder)
  _check_output(output_folder, overwrite)
  os.makedirs(os.path.dirname(output_folder), exist_ok=True)
  # A sibling, so the final rename stays on one file system; os.mkdir (not mkdtemp, 0o700)
  # gives the output the permissions any other new folder gets.
  staging = _sibling(output_folder, "partial")
  os.mkdir(staging)
  try:
    _write_pipeline(pipeline, unet_params, staging)
    if os.path.isdir(output_folder):
      # A folder cannot be replaced in one rename: move the old one aside first, so the
      # output path never holds a mix of old and new files.
      old = _sibling(output_folder, "old")
      os.rename(output_folder, old)
      os.rename(staging, output_folder)
      shutil.rmtree(old)
    else:
      os.rename(staging, output_folder)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
