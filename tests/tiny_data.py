"""Pick-a-Pic-schema parquet files with a learnable preference: warm images beat cool ones."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

WORDS = ("a", "cat", "photo", "of", "dog", "red", "blue", "tree")


def jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def textured(rng: np.random.Generator, size: int, warm: bool) -> np.ndarray:
  """Random texture whose colour balance is warm (red-orange) or cool (blue-cyan)."""
  base = np.array([200, 110, 40] if warm else [40, 120, 200], np.float32)
  noise = rng.normal(0, 35, (size, size, 3)) + rng.normal(0, 30, (1, 1, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_warm_vs_cool(path: str, pairs: int, seed: int, size: int = 40,
                       models: tuple[tuple[str, str], ...] = (("m0", "m1"),),
                       captions: tuple[str, ...] = ()) -> None:
  """`pairs` rows in the published schema; the warm image wins, on a random side.

  Row i's (model_0, model_1) is models[i % len(models)], for tests of data.model_filter.
  Row i's caption is captions[i % len(captions)] if given (prompts judged many times, as
  in Pick-a-Pic), else random words.
  """
  rng = np.random.default_rng(seed)
  rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0",
                          "model_1", "has_label", "are_different", "best_image_uid")}
  for i in range(pairs):
    warm_first = bool(rng.integers(2))
    images = [textured(rng, size, warm_first), textured(rng, size, not warm_first)]
    # Drawn even when `captions` replaces it: the images do not depend on `captions`.
    caption = " ".join(rng.choice(WORDS, size=rng.integers(1, 5)))
    if captions:
      caption = captions[i % len(captions)]
    for key, value in (("caption", caption), ("jpg_0", jpeg(images[0])),
                       ("jpg_1", jpeg(images[1])), ("label_0", float(warm_first)),
                       ("label_1", float(not warm_first)),
                       ("model_0", models[i % len(models)][0]),
                       ("model_1", models[i % len(models)][1]), ("has_label", True),
                       ("are_different", True),
                       ("best_image_uid", f"{seed}-{i}")):
      rows[key].append(value)
  pq.write_table(pa.table(rows), path, row_group_size=16)
