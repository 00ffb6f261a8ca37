"""Your own preference pairs: JSONL files of {"prompt", "chosen", "rejected"}, one pair a line.

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


def _parse(line: bytes) -> tuple[str, str, str] | str:
  """(prompt, chosen, rejected), or why the line is not a pair."""
  try:
    entry = json.loads(line)
  except ValueError as e:  # Includes bad UTF-8.
    return f"not JSON ({e})"
  if not isinstance(entry, dict):
    return "not a JSON object"
  missing = [key for key in KEYS if not isinstance(entry.get(key), str)]
  if missing:
    return f"{', '.join(missing)} missing or not a string"
  if not entry["chosen"] or not entry["rejected"]:
    return "empty image path"
  return entry["prompt"], entry["chosen"], entry["rejected"]


class JsonlPairsSource:
  """A grain `RandomAccessDataSource`: pair id -> {caption, winner, loser (image bytes), pair_ids}.

  Pair ids number the well-formed lines in file order, so they are the same on every host.
  Picklable and thread-safe: it holds only strings and opens each image per read.
  """

  def __init__(self, train_files: str | Sequence[str]):
    self._paths = (files_lib.expand_files(train_files, example="pairs.jsonl")
                   if isinstance(train_files, str) else list(train_files))
    self._prompts, self._chosen, self._rejected = [], [], []
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
        pair = _parse(line)
        if isinstance(pair, str):
          self.num_malformed += 1
          if self.num_malformed <= _MAX_WARNINGS:
            logging.warning("%s:%d: skipping the line: %s", path, number, pair)
          continue
        prompt, chosen, rejected = pair
        self._prompts.append(prompt)
        # os.path.join keeps an absolute second argument as it is.
        self._chosen.append(os.path.join(folder, os.path.expanduser(chosen)))
        self._rejected.append(os.path.join(folder, os.path.expanduser(rejected)))
        digest.update(line.strip() + b"\n")
    if self.num_malformed > _MAX_WARNINGS:
      logging.warning("%d more malformed lines skipped", self.num_malformed - _MAX_WARNINGS)
    if not self._prompts:
      raise UserError(f"data.train_files: none of the {self.num_lines} line(s) in "
                      f"{len(self._paths)} file(s) is a pair; each line must be a JSON object "
                      '{"prompt": str, "chosen": path, "rejected": path}')
    # Names the data by its lines, not where the files live, so a resumed run may move them.
    self._digest = digest.hexdigest()[:16]
    logging.info("JSONL pairs: %d files, %d pairs kept, %d malformed lines skipped",
                 len(self._paths), len(self._prompts), self.num_malformed)

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
    return f"JsonlPairsSource(files={len(self._paths)}, pairs={len(self)}, digest={self._digest})"

  def __getitem__(self, pair_id: int) -> dict:
    record = {"caption": self._prompts[pair_id], "pair_ids": int(pair_id)}
    try:
      for side, path in (("winner", self._chosen[pair_id]), ("loser", self._rejected[pair_id])):
        with open(path, "rb") as file:
          record[side] = file.read()
    except OSError as e:
      # A missing image must not end a long run: the pair is skipped and counted.
      return skips.skipped("file", pair_id, f"cannot read {e.filename} ({e.strerror})")
    return record
