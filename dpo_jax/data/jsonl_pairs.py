"""Your own preference data as JSONL files, one example a line: pairs {"prompt", "chosen",
"rejected"} (`JsonlPairsSource`), or unpaired likes and dislikes {"prompt", "image", "label"}
for Diffusion-KTO (`UnpairedJsonlSource`; label true/1 liked, false/0 disliked).

Image paths are relative to the folder of the JSONL file that names them (absolute paths are
taken as they are). Only the lines are read at start-up; images are read on demand, as raw
bytes, so records match `PickapicSource`'s and the same transforms decode them (any format
PIL reads: JPEG, PNG, WebP, ...).
"""
import hashlib
import json
import os
from collections.abc import Sequence

from absl import logging

from dpo_jax.data import files as files_lib, skips
from dpo_jax.errors import UserError

KEYS = ("prompt", "chosen", "rejected")
# A file of bad lines would otherwise flood the log: name this many, then count the rest.
_MAX_WARNINGS = 20


def _entry(line: bytes, keys: tuple[str, ...]) -> dict | str:
  """The line's JSON object with string `keys`, or why it is not one."""
  try:
    entry = json.loads(line)
  except ValueError as e:  # Includes bad UTF-8.
    return f"not JSON ({e})"
  if not isinstance(entry, dict):
    return "not a JSON object"
  missing = [key for key in keys if not isinstance(entry.get(key), str)]
  if missing:
    return f"{', '.join(missing)} missing or not a string"
  return entry


def _parse(line: bytes) -> tuple[str, tuple[str, ...], None] | str:
  """(prompt, (chosen, rejected), None), or why the line is not a pair."""
  entry = _entry(line, KEYS)
  if isinstance(entry, str):
    return entry
  if not entry["chosen"] or not entry["rejected"]:
    return "empty image path"
  return entry["prompt"], (entry["chosen"], entry["rejected"]), None


def _parse_unpaired(line: bytes) -> tuple[str, tuple[str, ...], bool] | str:
  """(prompt, (image,), liked), or why the line is not a judged image."""
  entry = _entry(line, ("prompt", "image"))
  if isinstance(entry, str):
    return entry
  if not entry["image"]:
    return "empty image path"
  label = entry.get("label")
  # JSON true/false, or 1/0 as the published KTO conversions of Pick-a-Pic write it (bool is
  # an int in Python, so this accepts both and nothing else).
  if label not in (0, 1) or isinstance(label, float):
    return f"label must be true/1 (liked) or false/0 (disliked), got {label!r}"
  return entry["prompt"], (entry["image"],), bool(label)


class JsonlPairsSource:
  """A grain `RandomAccessDataSource`: pair id -> {caption, winner, loser (image bytes), pair_ids}.

  Pair ids number the well-formed lines in file order, so they are the same on every host.
  Picklable and thread-safe: it holds only strings and opens each image per read.
  """
  _SIDES = ("winner", "loser")
  _EXAMPLE = "pairs.jsonl"
  _FORMAT = '{"prompt": str, "chosen": path, "rejected": path}'
  _parse_line = staticmethod(_parse)

  def __init__(self, train_files: str | Sequence[str]):
    self._paths = (files_lib.expand_files(train_files, example=self._EXAMPLE)
                   if isinstance(train_files, str) else list(train_files))
    # Labels are True, False or None (pairs): shared objects, so a long file costs a pointer
    # a line for them.
    self._prompts, self._images, self._labels = [], [], []
    digest = hashlib.sha1()
    self.num_lines = self.num_malformed = 0
    for path in self._paths:
      folder = os.path.dirname(os.path.abspath(path))
      try:
        with open(path, "rb") as file:
          lines = file.read().splitlines()
      except OSError as e:
        raise UserError(f"data.train_files: cannot read {path} ({e.strerror})") from None
      for number, line in enumerate(lines, start=1):
        if not line.strip():
          continue  # Blank lines (a trailing newline, spacing) are not pairs, nor errors.
        self.num_lines += 1
        parsed = self._parse_line(line)
        if isinstance(parsed, str):
          self.num_malformed += 1
          if self.num_malformed <= _MAX_WARNINGS:
            logging.warning("%s:%d: skipping the line: %s", path, number, parsed)
          continue
        prompt, images, label = parsed
        self._prompts.append(prompt)
        # os.path.join keeps an absolute second argument as it is.
        self._images.append(tuple(os.path.join(folder, os.path.expanduser(image))
                                  for image in images))
        self._labels.append(label)
        digest.update(line.strip() + b"\n")
    if self.num_malformed > _MAX_WARNINGS:
      logging.warning("%d more malformed lines skipped", self.num_malformed - _MAX_WARNINGS)
    if not self._prompts:
      raise UserError(f"data.train_files: none of the {self.num_lines} line(s) in "
                      f"{len(self._paths)} file(s) is usable; each line must be a JSON object "
                      f"{self._FORMAT}")
    # Names the data by its lines, not where the files live, so a resumed run may move them.
    self._digest = digest.hexdigest()[:16]
    logging.info("%s: %d files, %d examples kept, %d malformed lines skipped",
                 type(self).__name__, len(self._paths), len(self._prompts), self.num_malformed)

  @property
  def skipped_at_start(self) -> dict[str, int]:
    """What was left out while indexing, by `skips` kind: the malformed lines."""
    return {"line": self.num_malformed}

  @property
  def rows_at_start(self) -> int:
    return self.num_lines

  def __len__(self) -> int:
    return len(self._prompts)

  def __repr__(self) -> str:
    # grain checks a restored iterator against this.
    return (f"{type(self).__name__}(files={len(self._paths)}, pairs={len(self)}, "
            f"digest={self._digest})")

  def __getitem__(self, pair_id: int) -> dict:
    record = {"caption": self._prompts[pair_id], "pair_ids": int(pair_id)}
    if self._labels[pair_id] is not None:
      record["desirable"] = self._labels[pair_id]
    try:
      for side, path in zip(self._SIDES, self._images[pair_id]):
        with open(path, "rb") as file:
          record[side] = file.read()
    except OSError as e:
      # A missing image must not end a long run: the pair is skipped and counted.
      return skips.skipped("file", pair_id, f"cannot read {e.filename} ({e.strerror})")
    return record


class UnpairedJsonlSource(JsonlPairsSource):
  """Unpaired likes and dislikes for Diffusion-KTO: id -> {caption, image (bytes), desirable
  (bool), pair_ids}. Each line is one example, its id numbering the well-formed lines as
  `JsonlPairsSource`'s do; the loader batches these single images where it batches pairs."""
  _SIDES = ("image",)
  _EXAMPLE = "likes.jsonl"
  _FORMAT = '{"prompt": str, "image": path, "label": true | false}'
  _parse_line = staticmethod(_parse_unpaired)
