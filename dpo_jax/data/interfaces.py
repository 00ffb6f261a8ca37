"""The two interfaces of the data layer, written down.

`PairSource`: random access to preference pairs, what grain reads (Pick-a-Pic, JSONL, TFDS,
the latent cache, a random subset of any of them). `BatchIterator`: this host's batches as
the training loop takes them (`loader.PairBatches`, `synthetic.SyntheticIterator`).
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class PairSource(Protocol):
  """A grain `RandomAccessDataSource` of pairs.

  `source[i]` is a record (a dict with `pair_ids`, or {'skip': kind, ...} for a pair found
  unusable on read); `skipped_at_start` counts what was left out while indexing, by `skips`
  kind, the same on every host. Sources must pickle (grain workers) and their `repr` must
  name the data, not where it lives: grain checks a restored position against it. A source
  read in blocks (Pick-a-Pic's parquet row groups) may also have `group_starts`, the first
  index of each block (its indices consecutive), for a windowed order (`order.make_order`).
  """

  @property
  def skipped_at_start(self) -> dict[str, int]: ...

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


@runtime_checkable
class BatchIterator(Protocol):
  """This host's batches, forever, with a position that checkpoints save and restore.

  `counts`: this host's pairs kept and skipped (by `skips` kind) since the run began;
  `skipped_at_start`: the source's (see `PairSource`); `get_state()` is JSON-ready, its
  position the same on every host, and `set_state(get_state())` on a fresh iterator (on any
  host count) continues with the next batch.
  """

  @property
  def counts(self) -> dict[str, int]: ...

  @property
  def skipped_at_start(self) -> dict[str, int]: ...

  def __next__(self) -> dict: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...
