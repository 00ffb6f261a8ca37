"""Pick-a-Pic (v1/v2) parquet shards, as published, as a random-access source of preference pairs.

Rows are addressed by a global index over the files in order. At start-up only the label
columns are read, to index the decisive rows (the official code drops ties, label_0 = 0.5);
image bytes are read on demand, one row group at a time, through a small per-process LRU.

Cost: a row group is the smallest unit pyarrow reads (shards written by Hugging Face
`datasets` hold ~100 MB, or 1000 rows, per group). A fully shuffled epoch touches a different
group for nearly every pair, so each pair would cost a whole group's bytes. Training reads
parquet in a windowed order instead (`order.WindowedOrder`, data.shuffle_window_groups):
pairs come from a few groups at a time, which the cache holds, so each group is read about
once per epoch per process (`row_group_reads` counts them). `python -m dpo_jax.prepare` reads in
order, each group once, and the latent cache it writes needs no JPEG decoding at all.
"""
import collections
import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging

from dpo_jax.data import files as files_lib
from dpo_jax.data import order
from dpo_jax.errors import UserError

LABEL_COLUMNS = ("label_0", "label_1")
PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1")
MODEL_COLUMNS = ("model_0", "model_1")


def _parquet_metadata(path: str) -> pq.FileMetaData:
  try:
    return pq.read_metadata(path)
  except (pa.ArrowInvalid, OSError):
    raise UserError(f"{path} is not a readable parquet file; point at the Pick-a-Pic parquet "
                    "shards") from None


def _read_metadata(path: str) -> pq.FileMetaData:
  metadata = _parquet_metadata(path)
  missing = [c for c in LABEL_COLUMNS + PAIR_COLUMNS if c not in metadata.schema.names]
  if missing:
    raise UserError(f"{path} lacks the Pick-a-Pic column(s) {', '.join(missing)}; use the "
                    "published shards or files with the same columns")
  return metadata


def parse_model_filter(spec: str | None) -> tuple[str, ...]:
  """'a, b' -> ('a', 'b'): the lower-cased substrings of `data.model_filter`; None/'' -> ()."""
  return tuple(part.strip().lower() for part in (spec or "").split(",") if part.strip())


def _both_models_match(table: pa.Table, substrings: Sequence[str]) -> np.ndarray:
  """Rows whose model_0 and model_1 both contain one of `substrings` (case-insensitive)."""
  keep = None
  for column in MODEL_COLUMNS:
    matches = [pc.match_substring(table[column], s, ignore_case=True) for s in substrings]
    either = matches[0]
    for match in matches[1:]:
      either = pc.or_(either, match)
    either = pc.fill_null(either, False)  # A row without a model name cannot match.
    keep = either if keep is None else pc.and_(keep, either)
  return keep.to_numpy(zero_copy_only=False)


def _decisive_rows(path: str, metadata: pq.FileMetaData, model_filter: Sequence[str] = ()
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """(row numbers, winner side 0/1, rows left out by `skips` kind) of the rows with a strict
  preference: the official code drops ties (label_0 = 0.5).

  has_label = False is 'unlabeled' (whatever the labels hold); otherwise a null or
  contradictory label is bad input ('label'). With `model_filter`, kept rows whose two
  images are not both from a matching model are 'filtered'. Each row counts once.
  """
  columns = list(LABEL_COLUMNS) + (["has_label"] if "has_label" in metadata.schema.names else [])
  if model_filter:
    missing = [c for c in MODEL_COLUMNS if c not in metadata.schema.names]
    if missing:
      raise UserError(f"{path} lacks the column(s) {', '.join(missing)} that data.model_filter "
                      "reads; unset --config.data.model_filter or use the published shards")
    columns += MODEL_COLUMNS
  with pq.ParquetFile(path, metadata=metadata) as file:
    table = file.read(columns=columns)
  # Nulls become NaN, which no test below passes.
  label_0 = table["label_0"].to_numpy(zero_copy_only=False).astype(np.float64)
  label_1 = table["label_1"].to_numpy(zero_copy_only=False).astype(np.float64)
  unlabeled = np.zeros(len(label_0), bool)
  if "has_label" in columns:
    unlabeled = ~table["has_label"].fill_null(False).to_numpy(zero_copy_only=False)
  decisive = ((label_0 == 0) | (label_0 == 1)) & (label_1 == 1 - label_0) & ~unlabeled
  tie = (label_0 == label_1) & (label_0 > 0) & (label_0 < 1) & ~unlabeled
  bad_label = ~(decisive | tie | unlabeled)
  filtered = np.zeros_like(decisive)
  if model_filter:
    filtered = decisive & ~_both_models_match(table, model_filter)
  keep = decisive & ~filtered
  left_out = {"label": int(bad_label.sum()), "unlabeled": int(unlabeled.sum()),
              "tie": int(tie.sum()), "filtered": int(filtered.sum())}
  rows = np.flatnonzero(keep)
  return rows, (label_0[rows] == 0).astype(np.int8), left_out


def read_captions(files: str | Sequence[str]) -> list[str]:
  """The distinct non-empty captions of parquet files in the Pick-a-Pic schema, in file order:
  the prompts of the `validation_unique` / `test_unique` splits, for evaluation."""
  paths = files_lib.expand_files(files) if isinstance(files, str) else list(files)
  captions = {}
  for path in paths:
    if "caption" not in _parquet_metadata(path).schema.names:
      raise UserError(f"{path} has no caption column; point at Pick-a-Pic's "
                      "validation_unique (or test_unique) parquet files")
    for caption in pq.read_table(path, columns=["caption"])["caption"].to_pylist():
      if isinstance(caption, str) and caption.strip():
        captions.setdefault(caption, None)
  return list(captions)


class PickapicSource:
  """A grain `RandomAccessDataSource`: pair id -> {caption, winner, loser (JPEG bytes), pair_ids}.

  Pair ids number the decisive rows in file order, so they are the same on every host, and a
  row group's pairs have consecutive ids (`group_starts`: the first of each group holding
  any). The `cache_row_groups` groups read last are kept, per process: a windowed order
  needs at least its window's (loader.make_source sizes it). Thread-safe (grain reads with a
  thread pool) and picklable (grain workers): handles and the cache are per process.
  """

  def __init__(self, train_files: str | Sequence[str], cache_row_groups: int = 4,
               model_filter: str | None = None):
    self._paths = (files_lib.expand_files(train_files) if isinstance(train_files, str)
                   else list(train_files))
    self._metadata = [_read_metadata(path) for path in self._paths]
    group_rows = [[m.row_group(g).num_rows for g in range(m.num_row_groups)]
                  for m in self._metadata]
    # Global first row of every row group, and which (file, group) it is.
    sizes = [n for groups in group_rows for n in groups]
    self._group_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    self._group_address = [(f, g) for f, groups in enumerate(group_rows)
                           for g in range(len(groups))]
    file_starts = np.concatenate([[0], np.cumsum([m.num_rows for m in self._metadata])])
    self._model_filter = parse_model_filter(model_filter)
    rows, winners, left_out = zip(*(_decisive_rows(p, m, self._model_filter)
                                    for p, m in zip(self._paths, self._metadata)))
    self._rows = np.concatenate([r + s for r, s in zip(rows, file_starts)]).astype(np.int64)
    self._winners = np.concatenate(winners)
    # Kept rows are in file order, so each row group's pairs have consecutive ids.
    self.group_starts = order.run_starts(
        np.searchsorted(self._group_starts, self._rows, side="right") - 1)
    self.num_rows = int(file_starts[-1])
    # Ties, unlabeled rows, bad labels and those data.model_filter leaves out.
    self.num_dropped = self.num_rows - len(self._rows)
    self.skipped_at_start = {kind: sum(counts[kind] for counts in left_out)
                             for kind in left_out[0]}
    if not len(self._rows) and self._model_filter:
      raise UserError(f"data.model_filter={model_filter!r} keeps no pair with a winner in the "
                      f"{len(self._paths)} file(s); check the model names or unset it")
    if not len(self._rows):
      raise UserError(f"data.train_files: the {len(self._paths)} file(s) hold no pair with a "
                      "winner (all ties or unlabeled); point at the Pick-a-Pic train shards")
    self._cache_size = cache_row_groups
    self._init_cache()
    logging.info("Pick-a-Pic: %d files, %d rows, %d pairs kept, left out: %s",
                 len(self._paths), self.num_rows, len(self._rows), self.skipped_at_start)

  @property
  def rows_at_start(self) -> int:
    return self.num_rows

  def _init_cache(self):
    self.row_group_reads = 0  # Groups read from their files by this process (benchmarks, tests).
    self._cache = collections.OrderedDict()
    self._loading = {}  # Row group -> the Future of the one read in flight.
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_cache"], state["_loading"], state["_lock"], state["row_group_reads"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return len(self._rows)

  def __repr__(self) -> str:
    # grain checks a restored iterator against this: it names the data, not where it lives,
    # so a resumed run may find the same shards under another folder.
    digest = hashlib.sha1(repr([(os.path.basename(p), m.num_rows) for p, m in
                                zip(self._paths, self._metadata)]).encode()).hexdigest()[:16]
    # The filter renumbers the pairs: a resume under another one must be refused.
    kept = f", models={','.join(self._model_filter)}" if self._model_filter else ""
    return f"PickapicSource(files={len(self._paths)}, pairs={len(self)}{kept}, digest={digest})"

  def _row_group(self, group: int) -> pa.Table:
    """The group's pair columns; one read per group however many threads want it at once.

    In-order reads (prepare) send grain's read threads to the same group together: without
    single-flight reads each would pull its own copy of a ~100 MB group.
    """
    with self._lock:
      if group in self._cache:
        self._cache.move_to_end(group)
        return self._cache[group]
      pending = self._loading.get(group)
      reader = pending is None
      if reader:
        pending = self._loading[group] = concurrent.futures.Future()
    if not reader:
      return pending.result()
    try:
      file, local = self._group_address[group]  # Read outside the lock: threads overlap I/O.
      with pq.ParquetFile(self._paths[file], metadata=self._metadata[file]) as parquet:
        table = parquet.read_row_group(local, columns=list(PAIR_COLUMNS))
    except BaseException as error:
      with self._lock:
        del self._loading[group]
      pending.set_exception(error)
      raise
    with self._lock:
      self.row_group_reads += 1
      self._cache[group] = table
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
      del self._loading[group]
    pending.set_result(table)
    return table

  def __getitem__(self, pair_id: int) -> dict:
    row = self._rows[pair_id]
    group = int(np.searchsorted(self._group_starts, row, side="right")) - 1
    offset = int(row - self._group_starts[group])
    table = self._row_group(group)
    images = [table[column][offset].as_py() for column in ("jpg_0", "jpg_1")]
    winner = int(self._winners[pair_id])
    return {"caption": table["caption"][offset].as_py(), "winner": images[winner],
            "loser": images[1 - winner], "pair_ids": int(pair_id)}
