"""One preference pair -> training arrays: decode, resize, crop, flip, prompt dropout, tokenize.

Pure functions of (record, seed, epoch, pair id), following the official Diffusion-DPO code:
any image mode converted to RGB (CMYK, greyscale, palette; alpha dropped), torchvision
`Resize(R)` (shorter side to R, bilinear; PIL's resize is antialiased as torchvision's PIL
path), center or random crop, an independent random flip per image (or, as an option, one per
pair), [-1, 1] scaling, the caption replaced by "" for a fraction of pairs. Crop coordinates
follow diffusers' SDXL convention (flip, then crop; (top, left) in the resized image) so they
can feed time ids. A pair that cannot be used comes out as a `skips.skipped` record.
"""
import io
from collections.abc import Sequence

import grain.python as grain
import numpy as np
import transformers
from PIL import Image

# Not dpo_jax.encode: that pulls JAX and Flax into every grain worker process.
from dpo_jax.data import skips
from dpo_jax.models import tokenizer as tokenizer_lib

# Draws per image, in this order: flip, crop top, crop left.
_DRAWS_PER_IMAGE = 3
# Images that would be upscaled more than this (a 1-pixel image, a thumbnail) carry no
# detail worth learning from; longer aspect ratios would make a huge intermediate resize.
MAX_UPSCALE = 8
MAX_ASPECT_RATIO = 8


def pair_rng(seed: int, epoch: int, pair_id: int) -> np.random.Generator:
  """The pair's own stream: a function of (seed, epoch, pair id), never of batch or host."""
  return np.random.default_rng([int(seed), int(epoch), int(pair_id)])


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


class UnusableImage(ValueError):
  """An image that decodes but that no run should train on (see `unusable_size`)."""


def decode_image(data: bytes, resolution: int | None = None) -> Image.Image:
  """Any format PIL reads (JPEG, PNG, WebP, ...) in any mode, as RGB as the official code.

  With `resolution`, an image of unusable size raises UnusableImage before its pixels are
  decoded (PIL reads the size from the header).
  """
  with Image.open(io.BytesIO(data)) as image:
    if resolution and (why := unusable_size(image, resolution)):
      raise UnusableImage(why)
    return image.convert("RGB")


def unusable_size(image: Image.Image, resolution: int) -> str | None:
  """Why an image is too small or too elongated to train on at `resolution`, or None."""
  short, long = sorted(image.size)
  if short * MAX_UPSCALE < resolution:
    return f"{image.width}x{image.height} is too small for resolution {resolution}"
  if long > short * MAX_ASPECT_RATIO:
    return f"{image.width}x{image.height} is more elongated than {MAX_ASPECT_RATIO}:1"
  return None


def pair_draws(seed: int, epoch: int, pair_id: int, *, shared_flip: bool) -> np.ndarray:
  """[1 + 2 x 3] uniforms: prompt dropout, then (flip, crop top, crop left) per image.

  With `shared_flip` the loser takes the winner's flip draw: both images flip together.
  """
  draws = pair_rng(seed, epoch, pair_id).random(1 + 2 * _DRAWS_PER_IMAGE)
  if shared_flip:
    draws[1 + _DRAWS_PER_IMAGE] = draws[1]
  return draws


def prepare_pair(record: dict, *, seed: int, resolution: int, random_crop: bool,
                 random_flip: bool, empty_prompt_prob: float, shared_flip: bool = False) -> dict:
  """A source record plus its `epochs` -> one pair's arrays, or a `skips.skipped` record.

  Output: pixels [2, R, R, 3] float32 (winner, loser), original_size and crop_top_left
  [2, 2] int32 (h, w) / (top, left), caption (str), pair_ids and epochs (int32 scalars).
  An unpaired record (one `image` and its `desirable` label, for KTO) gives one image on
  that axis ([1, R, R, 3], [1, 2]) and keeps `desirable` (bool).
  """
  ids = {"pair_ids": np.int32(record["pair_ids"]), "epochs": np.int32(record["epochs"])}
  if "skip" in record:  # The source left it out: a tie, a missing image file, ...
    return {**record, **ids}
  skip = lambda kind, why: {**skips.skipped(kind, record["pair_ids"], why), **ids}
  if not isinstance(record["caption"], str):
    return skip("caption", "no caption")
  try:
    images = [decode_image(record[side], resolution) for side in _sides(record)]
  except UnusableImage as e:
    return skip("image", str(e))
  except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
    return skip("image", f"undecodable image ({e})")
  draws = pair_draws(seed, record["epochs"], record["pair_ids"], shared_flip=shared_flip)
  # One dropout decision per pair: winner and loser must be judged under the same prompt.
  caption = "" if draws[0] < empty_prompt_prob else record["caption"]
  outputs = [augment(image, resolution, image_draws, random_crop=random_crop,
                     random_flip=random_flip)
             for image, image_draws in zip(images, draws[1:].reshape(2, _DRAWS_PER_IMAGE))]
  pixels, original, crop = zip(*outputs)
  label = {"desirable": np.bool_(record["desirable"])} if "desirable" in record else {}
  return {"pixels": np.stack(pixels), "original_size": np.asarray(original, np.int32),
          "crop_top_left": np.asarray(crop, np.int32), "caption": caption, **ids, **label}


def _sides(record: dict) -> tuple[str, ...]:
  """The record's images in the order the batch holds them: a pair's winner then loser, or
  an unpaired example's one image."""
  return ("image",) if "image" in record else ("winner", "loser")


def tokenize_pair(element: dict, tokenizers: Sequence[transformers.CLIPTokenizer]) -> dict:
  """Replaces `caption` by `input_ids_{i}` [L_i] int32, one per tokenizer, as the pipelines pad."""
  element = dict(element)
  caption = element.pop("caption")
  for i, tokenizer in enumerate(tokenizers):
    element[f"input_ids_{i}"] = tokenizer_lib.tokenize(
        tokenizer, [caption], max_length=tokenizer.model_max_length)[0]
  return element


class PreparePair(grain.MapTransform):
  """`prepare_pair` with the run's options (keyword arguments of `prepare_pair`)."""

  def __init__(self, **options):
    self._options = options

  def map(self, element: dict) -> dict:
    return prepare_pair(element, **self._options)


class Tokenize(grain.MapTransform):
  """`tokenize_pair`; runs after `skips.CountSkipped`, so only on pairs that are kept."""

  def __init__(self, tokenizers: Sequence[transformers.CLIPTokenizer]):
    self._tokenizers = tuple(tokenizers)

  def map(self, element: dict) -> dict:
    return tokenize_pair(element, self._tokenizers)
