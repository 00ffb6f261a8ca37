"""The demo's rater: a transparent rule standing in for a human. It prefers the image whose
shape sits nearer the centre of the canvas.

The subject is every pixel that differs from the background (the median colour of the
image's border) by more than `THRESHOLD` in some channel; its centroid's distance from the
canvas centre, as a fraction of the half-diagonal, gives the score 1 - distance. An image
with (almost) no subject scores 0, below any drawn shape.
"""
import numpy as np

THRESHOLD = 48  # 0..255: well above a VAE's ripples on a flat background.
MIN_PIXELS = 4


def subject_mask(image: np.ndarray) -> np.ndarray:
  """bool [H, W]: the pixels that differ from the background colour."""
  image = np.asarray(image, np.int32)
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  background = np.median(border, axis=0)
  return np.abs(image - background).max(axis=-1) > THRESHOLD


def centredness(image: np.ndarray) -> float:
  """In [0, 1]: 1 for a subject centred exactly, 0 for none at all (see the module doc)."""
  mask = subject_mask(image)
  if mask.sum() < MIN_PIXELS:
    return 0.0
  height, width = mask.shape
  y, x = np.nonzero(mask)
  # Pixel i covers [i, i + 1): its centre is i + ½, and the canvas centre is (W/2, H/2).
  dx, dy = x.mean() + 0.5 - width / 2, y.mean() + 0.5 - height / 2
  return float(1 - np.hypot(dx, dy) / np.hypot(width / 2, height / 2))


class CentredJudge:
  """The rule as a scorer (`scorers.load_scorer(None, 'centred')`): the same call as the
  model scorers, `judge(images, prompts) -> float32 [N]`; prompts are not needed."""
  devices = 1  # Runs on the host: any batch size will do.

  def __call__(self, images, prompts=None) -> np.ndarray:
    """Images are channels-last uint8, or floats in [0, 1] (as the model scorers take)."""
    from dpo_jax.scorers import to_uint8
    return np.asarray([centredness(to_uint8(image)) for image in images], np.float32)
