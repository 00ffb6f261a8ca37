"""Procedural captioned images: one coloured shape on a white canvas, captioned
"a {size} {colour} {shape}". The shape's position is never in the caption: the base model
learns to put it anywhere, which leaves the rater's preference (judge.py) to teach."""
from collections.abc import Sequence

import numpy as np

RESOLUTION = 32
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 50, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
# Half-widths in pixels at RESOLUTION, for the two size words.
SIZES = {"small": 5.0, "large": 8.5}
_SUPERSAMPLE = 4  # Anti-aliased edges: coverage averaged over 4×4 subpixels.


def all_prompts() -> list[str]:
  """Every caption, in a fixed order: sizes × colours × shapes."""
  return [f"a {size} {colour} {shape}" for size in SIZES for colour in COLOURS
          for shape in SHAPES]


def split_prompts() -> tuple[list[str], list[str]]:
  """(training prompts, held-out prompts): every fourth caption is held out of the
  preference pairs, so a win rate on them measures what generalises."""
  prompts = all_prompts()
  return ([p for i, p in enumerate(prompts) if i % 4 != 3],
          [p for i, p in enumerate(prompts) if i % 4 == 3])


def parse(prompt: str) -> tuple[str, str, str]:
  """'a small red circle' -> ('small', 'red', 'circle')."""
  _, size, colour, shape = prompt.split()
  return size, colour, shape


def _coverage(shape: str, centre: tuple[float, float], half: float,
              resolution: int) -> np.ndarray:
  """float32 [H, W] in [0, 1]: the fraction of each pixel the shape covers."""
  n = resolution * _SUPERSAMPLE
  coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
  y, x = np.meshgrid(coords, coords, indexing="ij")
  cx, cy = centre
  if shape == "circle":
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
  elif shape == "square":
    inside = (np.abs(x - cx) <= 0.85 * half) & (np.abs(y - cy) <= 0.85 * half)
  elif shape == "triangle":  # Point up: apex above the centre, base below it.
    top, bottom = cy - half, cy + 0.8 * half
    inside = (y <= bottom) & (np.abs(x - cx) <= (y - top) * half / (bottom - top))
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return inside.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


def draw(prompt: str, centre: tuple[float, float], resolution: int = RESOLUTION) -> np.ndarray:
  """uint8 [H, W, 3]: the prompt's shape placed at `centre` (x, y in pixels): the centre of
  a circle or square, the middle of a triangle's height, whose centroid is 0.2·half below."""
  size, colour, shape = parse(prompt)
  half = SIZES[size] * resolution / RESOLUTION
  alpha = _coverage(shape, centre, half, resolution)[..., None]
  image = (1 - alpha) * np.float32(BACKGROUND) + alpha * np.float32(COLOURS[colour])
  return np.round(image).astype(np.uint8)


def random_centre(prompt: str, rng: np.random.Generator,
                  resolution: int = RESOLUTION) -> tuple[float, float]:
  """Uniform over the positions where the whole shape fits, with a pixel to spare."""
  half = SIZES[parse(prompt)[0]] * resolution / RESOLUTION
  low, high = half + 1, resolution - half - 1
  return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def captioned_batch(rng: np.random.Generator, count: int, prompts: Sequence[str] | None = None,
                    resolution: int = RESOLUTION) -> tuple[np.ndarray, list[str]]:
  """(uint8 [count, H, W, 3], captions): random captions, each drawn at a random place."""
  prompts = list(prompts or all_prompts())
  captions = [prompts[i] for i in rng.integers(0, len(prompts), count)]
  images = np.stack([draw(c, random_centre(c, rng, resolution), resolution) for c in captions])
  return images, captions
