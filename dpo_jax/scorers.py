"""Image scorers that judge generated images: CLIP score, PickScore and the LAION aesthetic score.

Every scorer is a transformers `CLIPModel` folder run by our Flax CLIP (`models/clip.py`), with
the preprocessing of the scorer's own `CLIPImageProcessor` and one formula on top:

  'clip'              cos(image, text): the paper's evaluation code (SalesforceAIResearch/
                      DiffusionDPO, utils/clip_utils.py) takes `image_features @ text_features.T`
                      of OpenCLIP ViT-H-14 (laion2B-s32B-b79K), whose features are L2-normalised;
                      that model is on the hub in transformers format as
                      laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
  'clip_torchmetrics' 100 * max(cos, 0): torchmetrics' CLIPScore (default model
                      openai/clip-vit-large-patch14), the other common "CLIP score".
  'pickscore'         exp(logit_scale) * cos: the PickScore authors' inference code
                      (yuvalkirstain/PickScore README; model yuvalkirstain/PickScore_v1, processor
                      and tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K). DiffusionDPO's
                      utils/pickscore_utils.py returns the bare cosine unless softmax=True;
                      PickScores as reported for SD models (about 20-23) are on this
                      exp(logit_scale) ~ 100 scale.
  'aesthetic'         MLP(image_features / |image_features|): LAION's improved-aesthetic-predictor
                      v2 (christophschuhmann/improved-aesthetic-predictor, simple_inference.py;
                      sac+logos+ava1-l14-linearMSE.pth) on openai/clip-vit-large-patch14, as
                      DiffusionDPO's utils/aes_utils.py. The MLP is five Linear layers without
                      activations (Dropouts between them are inactive at evaluation).

Rules that need no model are scorers too, with the same call:

  'centred'           the demo's rater (dpo_jax/demo/judge.py): 1 minus the distance of the
                      subject's centroid from the canvas centre, as a fraction of the
                      half-diagonal; 0 when nothing is drawn.

cos is the cosine similarity of the projected embeddings (`get_image_features`,
`get_text_features`) of image i and prompt i; every score is float32 of shape (B,).
"""
from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import safetensors
import safetensors.numpy

from dpo_jax.errors import UserError
from dpo_jax.models import clip
from dpo_jax.models import tokenizer as tokenizer_lib

# OpenAI CLIP's normalisation: the defaults of transformers' CLIPImageProcessor and what
# openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K ship.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

_TEXT_FORMULAS = {
    "clip": lambda cos, logit_scale: cos,
    "clip_torchmetrics": lambda cos, logit_scale: 100.0 * jnp.maximum(cos, 0.0),
    "pickscore": lambda cos, logit_scale: jnp.exp(logit_scale) * cos,
}
KINDS = (*_TEXT_FORMULAS, "aesthetic")
RULE_KINDS = ("centred",)  # Need no folder: `load_scorer(None, 'centred')`.

# nn.Sequential indices of the aesthetic MLP's Linear layers; 1, 3 and 5 are Dropouts.
_MLP_LINEARS = (0, 2, 4, 6, 7)
_MLP_KEYS = frozenset(f"layers.{i}.{leaf}" for i in _MLP_LINEARS for leaf in ("weight", "bias"))
MLP_CONVERSION = ("python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
                  "'sac+logos+ava1-l14-linearMSE.pth', map_location='cpu'), "
                  "'sac+logos+ava1-l14-linearMSE.safetensors')\"")


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """What transformers' CLIPImageProcessor does to an image, as numbers.

  `resize` is the shortest edge (int) or an exact (height, width), None for no resize; `crop` a
  centre crop (height, width) or None. Disabled steps become identities (scale 1, mean 0, std 1)
  so `preprocess` has a single path.
  """
  resize: int | tuple[int, int] | None = 224
  crop: tuple[int, int] | None = (224, 224)
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _sizes(value, key: str, where: str) -> int | tuple[int, int]:
  """transformers' size / crop_size spellings: an int, {shortest_edge}, or {height, width}."""
  if isinstance(value, Mapping) and set(value) == {"shortest_edge"}:
    value = value["shortest_edge"]
  if _positive_int(value):
    return value
  if (isinstance(value, Mapping) and set(value) == {"height", "width"}
      and all(map(_positive_int, value.values()))):
    return value["height"], value["width"]
  raise UserError(f"{where}: '{key}' is {value!r}, expected an integer, {{'shortest_edge': n}} "
                  "or {'height': h, 'width': w}; use the scorer's own preprocessor_config.json")


def _triple(value, key: str, where: str) -> tuple[float, ...]:
  if (not isinstance(value, Sequence) or len(value) != 3
      or not all(isinstance(v, int | float) for v in value)):
    raise UserError(f"{where}: '{key}' is {value!r}, expected three numbers (one per RGB channel)")
  return tuple(float(v) for v in value)


def processing_from_config(config: Mapping, where: str = PREPROCESSOR_CONFIG) -> ImageProcessing:
  """The ImageProcessing of a CLIPImageProcessor config dict; missing keys take its defaults."""
  on = lambda flag: config.get(flag, True)
  resize = _sizes(config.get("size", 224), "size", where) if on("do_resize") else None
  crop = _sizes(config.get("crop_size", 224), "crop_size", where) if on("do_center_crop") else None
  crop = (crop, crop) if isinstance(crop, int) else crop
  if isinstance(resize, int) and crop and resize < min(crop):
    raise UserError(f"{where}: shortest edge {resize} is smaller than crop_size {crop}, which "
                    "CLIPImageProcessor fills with zeros; use the scorer's own config")
  mean, std = (0.0,) * 3, (1.0,) * 3
  if on("do_normalize"):
    mean = _triple(config.get("image_mean", OPENAI_CLIP_MEAN), "image_mean", where)
    std = _triple(config.get("image_std", OPENAI_CLIP_STD), "image_std", where)
  rescale_factor = float(config.get("rescale_factor", 1 / 255)) if on("do_rescale") else 1.0
  return ImageProcessing(resize, crop, int(config.get("resample", Image.Resampling.BICUBIC)),
                         rescale_factor, mean, std)


def read_processing(folder: str) -> ImageProcessing:
  """The folder's preprocessor_config.json, or OpenAI CLIP's defaults when it has none."""
  path = os.path.join(folder, PREPROCESSOR_CONFIG)
  if not os.path.isfile(path):
    return ImageProcessing()
  with open(path) as f:
    try:
      return processing_from_config(json.load(f), path)
    except json.JSONDecodeError as error:
      raise UserError(f"{path} is not valid JSON ({error}); restore it from the original") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
  """One (H, W, 3) image as the uint8 RGB a saved PNG holds.

  Floats are [0, 1] and become round(255 x), as diffusers' `numpy_to_pil` makes the PIL images
  the published scorers were run on. (CLIPImageProcessor itself would truncate, then rescale
  twice; every evaluation code passes it uint8 PIL images.)
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected channels-last RGB images (H, W, 3), got shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"images must be uint8 or floats in [0, 1], got {image.dtype}")
  image = image.astype(np.float32)
  if not (image.min() >= 0 and image.max() <= 1):  # Also refuses NaN.
    raise ValueError(f"float images must lie in [0, 1], got [{image.min()}, {image.max()}]")
  return np.round(image * 255).astype(np.uint8)


def _resized_size(height: int, width: int, resize: int | tuple[int, int]) -> tuple[int, int]:
  """transformers' `get_resize_output_image_size` (torchvision's rule): the long side truncates."""
  if not isinstance(resize, int):
    return resize
  if width <= height:
    return int(resize * height / width), resize
  return resize, int(resize * width / height)


def preprocess_one(image: np.ndarray, processing: ImageProcessing) -> np.ndarray:
  """One image -> float32 (h, w, 3) pixel values, equal to CLIPImageProcessor's (PIL backend).

  The resize is PIL's own, because that is what the scorers were trained and published with:
  jax.image.resize's bicubic differs from PIL's by up to 4/255 on noise (1/255 on smooth images).
  """
  image = to_uint8(image)
  if processing.resize is not None:
    height, width = _resized_size(*image.shape[:2], processing.resize)
    image = np.asarray(Image.fromarray(image).resize((width, height), processing.resample))
  if processing.crop is not None:
    (height, width), (crop_h, crop_w) = image.shape[:2], processing.crop
    if height < crop_h or width < crop_w:
      raise ValueError(f"a {height}x{width} image is smaller than the {crop_h}x{crop_w} crop")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    image = image[top:top + crop_h, left:left + crop_w]
  # The processor's own float arithmetic: rescale in float64, then float32 normalisation.
  pixels = (image.astype(np.float64) * processing.rescale_factor).astype(np.float32)
  mean, std = (np.asarray(v, np.float32) for v in (processing.mean, processing.std))
  return (pixels - mean) / std


def preprocess(images, processing: ImageProcessing) -> np.ndarray:
  """(B, H, W, 3) uint8 or [0, 1] float images (or a sequence of (H, W, 3) ones of any sizes)
  -> float32 (B, h, w, 3), the channels-last input of our CLIP vision tower."""
  return np.stack([preprocess_one(image, processing) for image in images])


def read_aesthetic_mlp(path: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """The aesthetic MLP's (weight (out, in), bias) per Linear layer, from safetensors.

  The predictor is published as a pickled .pth, which we never load (unpickling runs code);
  users convert it once in PyTorch with MLP_CONVERSION, which keeps the key names.
  """
  convert = f"convert the published .pth once with `{MLP_CONVERSION}`"
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raise UserError(f"{path} is a pickled PyTorch file, which we never load; {convert}")
  if not os.path.isfile(path):
    raise UserError(f"aesthetic MLP weights {path} do not exist; {convert}")
  try:
    state = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, TypeError) as error:
    raise UserError(f"cannot read {path} ({error}); {convert}") from None
  if set(state) != _MLP_KEYS:
    missing, unexpected = sorted(_MLP_KEYS - set(state)), sorted(set(state) - _MLP_KEYS)
    raise UserError(f"{path} is not the LAION aesthetic MLP (missing {missing}, unexpected "
                    f"{unexpected}); {convert}")
  layers = tuple((state[f"layers.{i}.weight"].astype(np.float32),
                  state[f"layers.{i}.bias"].astype(np.float32)) for i in _MLP_LINEARS)
  widths = [layers[0][0].shape[-1]]
  for weight, bias in layers:
    if weight.ndim != 2 or weight.shape[1] != widths[-1] or bias.shape != weight.shape[:1]:
      raise UserError(f"{path}: layer shapes {[w.shape for w, _ in layers]} do not chain; "
                      f"{convert}")
    widths.append(weight.shape[0])
  if widths[-1] != 1:
    raise UserError(f"{path}: the MLP outputs {widths[-1]} values, not one score; {convert}")
  return layers


def aesthetic_mlp(layers, embeddings: jax.Array) -> jax.Array:
  """The predictor on L2-normalised embeddings (B, D) -> (B,), float32; no activations."""
  x = _normalised(embeddings)
  for weight, bias in layers:
    x = x @ weight.T + bias
  return x[:, 0]


def _normalised(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)  # Norms in float32 whatever the compute dtype.
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _score_fn(module: clip.CLIPModel, kind: str):
  """(params, pixel_values, input_ids) -> float32 (B,) scores of pairs (image i, prompt i)."""
  def score(params, pixel_values, input_ids):
    image = module.apply({"params": params["clip"]}, pixel_values, method="get_image_features")
    if kind == "aesthetic":
      return aesthetic_mlp(params["mlp"], image)
    text = module.apply({"params": params["clip"]}, input_ids, method="get_text_features")
    cos = jnp.sum(_normalised(image) * _normalised(text), axis=-1)
    return _TEXT_FORMULAS[kind](cos, params["clip"]["logit_scale"]).astype(jnp.float32)
  return jax.jit(score)  # Compiled once per batch size.


@dataclasses.dataclass(frozen=True)
class Scorer:
  """A loaded scorer; call it on a batch: scorer(images, prompts) -> float32 (B,) numpy."""
  kind: str
  processing: ImageProcessing
  tokenizer: Any  # transformers.CLIPTokenizer; None for 'aesthetic', which reads no prompt.
  max_length: int  # Token ids per prompt: the text tower's max_position_embeddings.
  params: dict  # {"clip": CLIP params, "mlp": aesthetic layers (aesthetic only)}
  score_fn: Any = dataclasses.field(repr=False)
  # The batch axis over this host's devices (params replicated): a batch whose size the
  # device count divides is scored data-parallel.
  batch_sharding: Any = None

  def __call__(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Scores image i against prompt i (prompts are ignored, and may be None, for 'aesthetic').

    Images are channels-last uint8 or [0, 1] floats; each batch size compiles once, so keep
    batches the same size (pad the last one) when scoring many.
    """
    pixels = preprocess(images, self.processing)
    ids = None
    if self.tokenizer is not None:
      if isinstance(prompts, str) or prompts is None or len(prompts) != len(pixels):
        raise ValueError(f"'{self.kind}' needs one prompt string per image ({len(pixels)}), "
                         f"got {prompts!r:.80}")
      ids = tokenizer_lib.tokenize(self.tokenizer, prompts, self.max_length)
    if self.batch_sharding is not None and len(pixels) % self.batch_sharding.mesh.size == 0:
      pixels, ids = jax.device_put((pixels, ids), self.batch_sharding)
    return np.asarray(self.score_fn(self.params, pixels, ids), np.float32)

  @property
  def devices(self) -> int:
    """Devices a batch is split over: batch sizes that are multiples of this run sharded."""
    return self.batch_sharding.mesh.size if self.batch_sharding is not None else 1


def load_rule(kind: str):
  """A rule scorer (`RULE_KINDS`): `rule(images, prompts) -> float32 (B,)` on the host."""
  from dpo_jax.demo import judge
  return {"centred": judge.CentredJudge}[kind]()


def load_scorer(folder: str | None, kind: str, *, processor_folder: str | None = None,
                mlp_path: str | None = None, dtype=jnp.float32,
                attention_implementation: str = "xla") -> Scorer:
  """A scorer from a transformers CLIPModel folder (config.json + model.safetensors).

  `processor_folder` holds the tokenizer and preprocessor_config.json (default: `folder`);
  PickScore needs it, as its processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's. `mlp_path` is
  the aesthetic MLP as safetensors ('aesthetic' only). `dtype` is CLIP's compute dtype; norms,
  formulas and the MLP stay float32.
  """
  if kind in RULE_KINDS:
    if folder or processor_folder or mlp_path:
      raise UserError(f"the '{kind}' scorer is a rule and reads no model files; name it alone "
                      f"(--scorer {kind})")
    return load_rule(kind)
  if kind not in KINDS:
    raise UserError(f"scorer kind {kind!r} is not one of {', '.join(KINDS + RULE_KINDS)}")
  if not folder:
    raise UserError(f"the '{kind}' scorer needs its model folder: {kind}=FOLDER")
  if (kind == "aesthetic") != (mlp_path is not None):
    raise UserError("the 'aesthetic' scorer, and only it, needs mlp_path (the MLP's "
                    f"safetensors; convert the published .pth once with `{MLP_CONVERSION}`)")
  processor_folder = processor_folder or folder
  module, params = clip.load_clip(folder, "CLIPModel", dtype=dtype,
                                  attention_implementation=attention_implementation)
  processing = read_processing(processor_folder)
  vision = module.config.vision
  if processing.crop != (vision.image_size, vision.image_size):
    raise UserError(f"{processor_folder}: images are cropped to {processing.crop or 'no size'} "
                    f"but the model in {folder} takes {vision.image_size}x{vision.image_size}; "
                    "use the scorer's own preprocessor_config.json")
  params = {"clip": params}
  tokenizer = None
  if kind == "aesthetic":
    params["mlp"] = read_aesthetic_mlp(mlp_path)
    if params["mlp"][0][0].shape[1] != module.config.projection_dim:
      raise UserError(f"{mlp_path} takes {params['mlp'][0][0].shape[1]}-dim embeddings but "
                      f"{folder} makes {module.config.projection_dim}-dim ones; the LAION "
                      "predictor goes with openai/clip-vit-large-patch14")
  else:
    tokenizer = tokenizer_lib.load_tokenizer(processor_folder)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return Scorer(kind, processing, tokenizer, module.config.text.max_position_embeddings,
                params, _score_fn(module, kind),
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
