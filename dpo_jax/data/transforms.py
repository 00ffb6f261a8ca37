"""One preference pair -> training arrays: decode, resize, crop, flip, prompt dropout, tokenize.

Pure functions of (record, seed, epoch, pair id), following the official Diffusion-DPO code:
torchvision `Resize(R)` (shorter side to R, bilinear; PIL's resize is antialiased as torchvision's
PIL path), center or random crop, an independent random flip per image, [-1, 1] scaling,
the caption replaced by "" for a fraction of pairs. Crop coordinates follow diffusers' SDXL
convention (flip, then crop; (top, left) in the resized image) so they can feed time ids.
"""
import io
from collections.abc import Sequence

import grain.python as grain
import numpy as np
import transformers
from absl import logging
from PIL import Image

# Not dpo_jax.encode: that pulls JAX and Flax into every grain worker process.
from dpo_jax.models import tokenizer as tokenizer_lib

# Draws per image, in this order: flip, crop top, crop left.
_DRAWS_PER_IMAGE = 3


def pair_rng(seed: int, epoch: int, pair_id: int) -> np.random.Generator:
  """The pair's own stream: a function of (seed, epoch, pair id), never of batch or host."""
  return np.random.default_rng([seed, epoch, pair_id])


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision `Resize(size)`: the shorter side becomes `size`, the longer one truncated."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def augment(image: Image.Image, resolution: int, draws: np.ndarray, *, random_crop: bool,
            random_flip: bool) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """(pixels [R, R, 3] float32 in [-1, 1], original (h, w), crop (top, left)).

  `draws` are 3 uniforms in [0, 1): flip, crop top, crop left. They are drawn whether used
  or not, so turning one option off does not change what the others do.
  """
  original = (image.height, image.width)
  height, width = resized_size(*original, resolution)
  image = image.resize((width, height), Image.Resampling.BILINEAR)
  if random_flip and draws[0] < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if random_crop:
    top = int(draws[1] * (height - resolution + 1))
    left = int(draws[2] * (width - resolution + 1))
  else:
    top = int(round((height - resolution) / 2.0))
    left = int(round((width - resolution) / 2.0))
  image = image.crop((left, top, left + resolution, top + resolution))
  pixels = np.asarray(image, np.float32) / 127.5 - 1.0
  return pixels, original, (top, left)


def decode_jpeg(data: bytes) -> Image.Image:
  """Any format PIL reads (JPEG, PNG, WebP, ...): JSONL pairs are not only JPEGs."""
  with Image.open(io.BytesIO(data)) as image:
    return image.convert("RGB")


def prepare_pair(record: dict, *, seed: int, resolution: int, random_crop: bool,
                 random_flip: bool, empty_prompt_prob: float) -> dict:
  """A source record plus its `epochs` -> one pair's arrays, or {'error': why, ...} to skip.

  Output: pixels [2, R, R, 3] float32 (winner, loser), original_size and crop_top_left
  [2, 2] int32 (h, w) / (top, left), caption (str), pair_ids and epochs (int32 scalars).
  """
  ids = {"pair_ids": np.int32(record["pair_ids"]), "epochs": np.int32(record["epochs"])}
  if "error" in record:  # The source could not read the pair (e.g. a missing image file).
    return {"error": record["error"], **ids}
  if not isinstance(record["caption"], str):
    return {"error": "no caption", **ids}
  try:
    images = [decode_jpeg(record[side]) for side in ("winner", "loser")]
  except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
    return {"error": f"undecodable image ({e})", **ids}
  draws = pair_rng(seed, record["epochs"], record["pair_ids"]).random(1 + 2 * _DRAWS_PER_IMAGE)
  # One dropout decision per pair: winner and loser must be judged under the same prompt.
  caption = "" if draws[0] < empty_prompt_prob else record["caption"]
  outputs = [augment(image, resolution, image_draws, random_crop=random_crop,
                     random_flip=random_flip)
             for image, image_draws in zip(images, draws[1:].reshape(2, _DRAWS_PER_IMAGE))]
  pixels, original, crop = zip(*outputs)
  return {"pixels": np.stack(pixels), "original_size": np.asarray(original, np.int32),
          "crop_top_left": np.asarray(crop, np.int32), "caption": caption, **ids}


def tokenize_pair(element: dict, tokenizers: Sequence[transformers.CLIPTokenizer]) -> dict:
  """Replaces `caption` by `input_ids_{i}` [L_i] int32, one per tokenizer, as the pipelines pad."""
  element = dict(element)
  caption = element.pop("caption")
  for i, tokenizer in enumerate(tokenizers):
    element[f"input_ids_{i}"] = tokenizer_lib.tokenize(
        tokenizer, [caption], max_length=tokenizer.model_max_length)[0]
  return element


class PreparePair(grain.MapTransform):

  def __init__(self, *, seed: int, resolution: int, random_crop: bool, random_flip: bool,
               empty_prompt_prob: float):
    self._options = dict(seed=seed, resolution=resolution, random_crop=random_crop,
                         random_flip=random_flip, empty_prompt_prob=empty_prompt_prob)

  def map(self, element: dict) -> dict:
    return prepare_pair(element, **self._options)


class DropFailed(grain.FilterTransform):
  """Skips pairs `PreparePair` could not use: one bad row must not end a days-long run."""

  def filter(self, element: dict) -> bool:
    if "error" in element:
      logging.warning("Skipping pair %d: %s", element["pair_ids"], element["error"])
      return False
    return True


class Tokenize(grain.MapTransform):

  def __init__(self, tokenizers: Sequence[transformers.CLIPTokenizer]):
    self._tokenizers = tuple(tokenizers)

  def map(self, element: dict) -> dict:
    return tokenize_pair(element, self._tokenizers)
