"""A TFDS dataset of Pick-a-Pic-schema pairs, stored as array_record, as a random-access source.

Read through `tfds.data_source`, TensorFlow-free: tensorflow-datasets is an optional extra
(`pip install 'dpo_jax[tfds]'`) and TensorFlow is never imported. Images arrive as their encoded
bytes (decoding is skipped in tfds), so records match `PickapicSource`'s and the same transforms
decode them.

Unlike the parquet source, the ties cannot be indexed at start-up without reading every record
(the images come with the labels), so every record keeps its pair id and a tie, an unlabeled
row, a bad label or one that data.model_filter leaves out comes back as {'skip': kind, ...}
(the `dpo_jax.data.skips` kinds), found on read.
"""
import math
import os
import threading

import numpy as np
from absl import logging

from dpo_jax.data import pickapic, skips
from dpo_jax.errors import UserError

IMAGE_FEATURES = ("jpg_0", "jpg_1")
LABEL_FEATURES = ("label_0", "label_1")
TEXT_FEATURES = ("caption",)
MODEL_FEATURES = pickapic.MODEL_COLUMNS
_INSTALL = "pip install 'dpo_jax[tfds]' (tensorflow-datasets; TensorFlow is not needed)"


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"reading a TFDS dataset needs tensorflow-datasets: {_INSTALL}") from None
  return tfds


def _first_line(error: Exception) -> str:
  # tfds's not-found message lists its whole catalog: the first line is the useful part.
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _builder(tfds, name: str, data_dir: str | None):
  """The builder of a prepared dataset: by name (in data_dir) or by its version folder."""
  folder = os.path.expanduser(name)
  try:
    if os.path.isdir(folder):
      if not os.path.exists(os.path.join(folder, "dataset_info.json")):
        raise UserError(f"{name} holds no dataset_info.json; point at the prepared TFDS "
                        "version folder (e.g. .../my_pairs/1.0.0)")
      return tfds.builder_from_directory(folder)
    builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  except (ValueError, OSError) as e:  # DatasetNotFoundError is a ValueError.
    raise UserError(f"TFDS dataset {name!r} not found in "
                    f"{data_dir or 'the default TFDS data_dir'} ({_first_line(e)}); prepare it "
                    "there with file_format='array_record', or pass its folder") from None
  if not builder.is_prepared():
    # A catalog name (e.g. 'mnist') resolves to its code even where no data was written.
    raise UserError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; build it "
                    "first (tfds build --file_format=array_record) or fix the data_dir")
  return builder


def _is_string(feature, tfds) -> bool:
  """A scalar string feature: Text, or Tensor(shape=(), dtype=object/string)."""
  if not isinstance(feature, tfds.features.Tensor) or tuple(feature.shape) != ():
    return False
  return np.dtype(feature.np_dtype).kind in "OSU"


def _check_features(builder, tfds, name: str, model_filter: tuple[str, ...]) -> None:
  features = builder.info.features
  wanted = IMAGE_FEATURES + LABEL_FEATURES + TEXT_FEATURES + (MODEL_FEATURES if model_filter
                                                              else ())
  missing = [key for key in wanted if key not in features]
  if missing and set(missing) <= set(MODEL_FEATURES):
    raise UserError(f"TFDS dataset {name!r} lacks the feature(s) {', '.join(missing)} that "
                    "data.model_filter reads; unset --config.data.model_filter")
  if missing:
    raise UserError(f"TFDS dataset {name!r} lacks the Pick-a-Pic feature(s) "
                    f"{', '.join(missing)}; it needs caption, jpg_0, jpg_1, label_0, label_1")
  wrong = [key for key in IMAGE_FEATURES
           if not isinstance(features[key], tfds.features.Image)
           and not _is_string(features[key], tfds)]
  wrong += [key for key in TEXT_FEATURES + (MODEL_FEATURES if model_filter else ())
            if not _is_string(features[key], tfds)]
  wrong += [key for key in LABEL_FEATURES
            if not isinstance(features[key], tfds.features.Tensor)
            or tuple(features[key].shape) != ()
            or np.dtype(features[key].np_dtype).kind not in "fiub"]
  if wrong:
    raise UserError(f"TFDS dataset {name!r}: feature(s) {', '.join(wrong)} have the wrong type; "
                    "images must be encoded (tfds.features.Image or bytes), captions and model "
                    "names text, labels scalar numbers")


def _open(name: str, split: str, data_dir: str | None, model_filter: tuple[str, ...]):
  """(tfds data source of `split`, its builder), features checked."""
  tfds = _import_tfds()
  builder = _builder(tfds, name, data_dir)
  _check_features(builder, tfds, name, model_filter)
  # Encoded bytes, as in the parquet shards: our transforms decode them with PIL.
  decoders = {key: tfds.decode.SkipDecoding() for key in IMAGE_FEATURES
              if isinstance(builder.info.features[key], tfds.features.Image)}
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    raise UserError(f"TFDS dataset {name!r} is stored as {file_format}, which has no random "
                    "access; rebuild it with file_format='array_record' "
                    "(tfds build --file_format=array_record)") from None
  except (ValueError, KeyError) as e:  # Unknown split, or a malformed slice.
    raise UserError(f"TFDS dataset {name!r} has no split {split!r} ({_first_line(e)}); use one "
                    f"of {', '.join(builder.info.splits)}") from None
  return source, builder


def _label(value) -> float:
  """The label as a float; NaN for a missing one (optional features read as None)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _text(value) -> str | None:
  """tfds reads strings as bytes: UTF-8 text, or None (a bad caption is skipped downstream)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return None
  return value if isinstance(value, str) else None


def _models_match(example: dict, substrings: tuple[str, ...]) -> bool:
  """Same rule as the parquet source: both model names contain one of `substrings`."""
  names = [(_text(example.get(key)) or "").lower() for key in MODEL_FEATURES]
  return all(any(s in name for s in substrings) for name in names)


def _label_skip(label_0: float, label_1: float, has_label) -> tuple[str, str | None] | None:
  """(skip kind, why) for a pair without a winner, else None; the parquet source's rules.

  has_label = False is 'unlabeled' whatever the labels hold; 0.5/0.5 (any equal pair strictly
  between 0 and 1) is a 'tie'; a null, NaN or contradictory label is bad input ('label').
  """
  if has_label is None or not has_label:
    return "unlabeled", None
  if label_0 in (0.0, 1.0) and label_1 == 1 - label_0:
    return None
  if label_0 == label_1 and 0 < label_0 < 1:
    return "tie", None
  if math.isnan(label_0) or math.isnan(label_1):
    return "label", "no label"
  return "label", f"contradictory labels ({label_0:g}, {label_1:g})"


def to_record(example: dict, pair_id: int, model_filter: tuple[str, ...] = ()) -> dict:
  """A decoded tfds example -> our record, winner first, or a {'skip': kind} record."""
  label_0, label_1 = (_label(example[key]) for key in LABEL_FEATURES)
  # Honoured where present, as for parquet: Pick-a-Pic marks its unlabeled rows so.
  skip = _label_skip(label_0, label_1, example.get("has_label", True))
  if skip:
    return skips.skipped(*skip[:1], pair_id, skip[1])
  if model_filter and not _models_match(example, model_filter):
    return skips.skipped("filtered", pair_id)
  images = [example[key].item() if isinstance(example[key], np.ndarray) else example[key]
            for key in IMAGE_FEATURES]
  winner = 0 if label_0 == 1 else 1
  if not all(isinstance(image, bytes) and image for image in images):
    return skips.skipped("image", pair_id, "no image bytes")
  return {"caption": _text(example["caption"]), "winner": images[winner],
          "loser": images[1 - winner], "pair_ids": int(pair_id)}


class TfdsPairsSource:
  """A grain `RandomAccessDataSource`: pair id -> {caption, winner, loser (bytes), pair_ids}.

  Pair ids are the record numbers of the split, the same on every host; ties, unlabeled or
  badly labelled records and those data.model_filter leaves out come back as {'skip': kind,
  ...}. Picklable (grain workers): the tfds source is reopened per process on first use.
  Thread-safe: array_record readers lock internally.
  """
  def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
               model_filter: str | None = None):
    self._name, self._split, self._data_dir = name, split, data_dir
    self._model_filter = pickapic.parse_model_filter(model_filter)
    source, builder = _open(name, split, data_dir, self._model_filter)
    # info.full_name is name[/config]/version: it names the data, not the folder it is in.
    self._full_name = builder.info.full_name
    self._length = len(source)
    if not self._length:
      raise UserError(f"TFDS dataset {name!r} split {split!r} is empty; use another split")
    self._init_source(source)
    logging.info("TFDS pairs: %s[%s], %d records (ties/unlabeled%s skipped on read)",
                 self._full_name, split, self._length,
                 f"/not {'|'.join(self._model_filter)}" if self._model_filter else "")

  def _init_source(self, source=None):
    self._source = source
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_source"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_source()

  def _data_source(self):
    with self._lock:  # One open per process, whichever read thread comes first.
      if self._source is None:
        self._source, _ = _open(self._name, self._split, self._data_dir, self._model_filter)
      return self._source

  @property
  def skipped_at_start(self) -> dict[str, int]:
    """Nothing is left out while opening: every skip is found on read, counted downstream."""
    return {}

  def __len__(self) -> int:
    return self._length

  def __repr__(self) -> str:
    # grain checks a restored iterator against this: data, version, split and filter (which
    # changes what the ids yield), not the folder, so a resumed run may find it elsewhere.
    kept = f", models={','.join(self._model_filter)}" if self._model_filter else ""
    return (f"TfdsPairsSource(dataset={self._full_name}, split={self._split!r}, "
            f"records={self._length}{kept})")

  def __getitem__(self, pair_id: int) -> dict:
    example = self._data_source()[int(pair_id)]
    return to_record(example, pair_id, self._model_filter)
