"""The run's order of pairs: one global sequence, the same on every host.

Position p of the endless sequence is, in epoch p // N (N pairs), the pair at index p % N of
that epoch's shuffled order, a permutation drawn from (train.seed, epoch) alone. Global batch
k is positions [k·B, (k+1)·B); a host reads its contiguous `parallel.host_slice` of each, as
the devices split a batch. The batches, and the one position a checkpoint saves, so do not
depend on the host count.

Two shuffles (`make_order` picks):
  `GlobalOrder`: every pair anywhere in the epoch (grain's `IndexSampler`, unsharded).
  `WindowedOrder` (data.shuffle_window_groups = W > 0, for a source read a row group at a
    time, Pick-a-Pic parquet): the row groups are shuffled from (seed, epoch) and cut into
    windows of W consecutive groups; the pairs of each window are shuffled among themselves
    from (seed, epoch, window). A fully shuffled epoch needs another row group for nearly
    every pair, so each group (~100s of MB of JPEGs in the published shards) is read about
    once per pair it holds; windowed, a reader whose cache holds W groups reads each group
    once per epoch. The price: a batch mixes pairs of W groups, not of the whole data.
"""
import collections
import threading
from collections.abc import Iterator, Sequence

import grain.python as grain
import numpy as np

# Each epoch draws twice: the groups' order, then each window's pairs. Tags keep the draws'
# streams apart (and apart from `subset.RandomSubset`'s, seeded by train.seed alone).
_GROUPS, _PAIRS = 0, 1
# Epoch layouts and window permutations kept at hand: the current ones and the neighbours a
# host at a boundary (or a stand-in) reaches. Anything else is recomputed, identically.
_EPOCHS_KEPT, _WINDOWS_KEPT = 2, 4


class GlobalOrder:
  """Position -> (epoch, source index), for `num_pairs` pairs shuffled anew every epoch."""

  def __init__(self, num_pairs: int, seed: int):
    self.num_pairs = num_pairs
    self._sampler = grain.IndexSampler(num_pairs, shard_options=grain.NoSharding(),
                                       shuffle=True, seed=seed, num_epochs=None)

  def __getitem__(self, position: int) -> tuple[int, int]:
    return position // self.num_pairs, self._sampler[position].record_key

  def stand_ins(self, position: int) -> Iterator[int]:
    return stand_ins(self.num_pairs, position)


class WindowedOrder:
  """Position -> (epoch, source index), shuffled within windows of `window_groups` row groups.

  `group_starts`: the first source index of each row group (ascending from 0; a group's pairs
  are consecutive indices, as `PickapicSource.group_starts`). Every epoch is a permutation of
  all pairs, and position -> pair is a pure function of (seed, epoch, position): the
  memos below only spare recomputing it, so threads, worker processes and a resumed run
  all find the same pair at a position.
  """

  def __init__(self, group_starts: Sequence[int], num_pairs: int, seed: int,
               window_groups: int):
    self.num_pairs, self.window_groups, self._seed = num_pairs, window_groups, seed
    self._starts = np.asarray(group_starts, np.int64)
    self._sizes = np.diff(np.append(self._starts, num_pairs))
    self._init_memo()

  def _init_memo(self):
    self._lock = threading.Lock()
    self._epochs = collections.OrderedDict()  # epoch -> (groups in order, window ends)
    self._windows = collections.OrderedDict()  # (epoch, window) -> its pairs' permutation

  def __getstate__(self):  # grain workers get the order pickled: the lock cannot travel.
    state = self.__dict__.copy()
    del state["_lock"], state["_epochs"], state["_windows"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_memo()

  @property
  def num_groups(self) -> int:
    return len(self._starts)

  def __getitem__(self, position: int) -> tuple[int, int]:
    epoch, offset = divmod(int(position), self.num_pairs)
    groups, ends = self._memo(self._epochs, epoch, _EPOCHS_KEPT, lambda: self._layout(epoch))
    window = int(np.searchsorted(ends, offset, side="right"))
    first = int(ends[window - 1]) if window else 0
    size = int(ends[window]) - first
    shuffled = self._memo(self._windows, (epoch, window), _WINDOWS_KEPT,
                          lambda: _rng(self._seed, epoch, _PAIRS, window).permutation(size))
    members = groups[window * self.window_groups:(window + 1) * self.window_groups]
    return epoch, self._nth_pair(members, int(shuffled[offset - first]))

  def stand_ins(self, position: int) -> Iterator[int]:
    return stand_ins(self.num_pairs, position)

  def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's groups in order, and where each window of them ends (in pairs)."""
    groups = _rng(self._seed, epoch, _GROUPS).permutation(self.num_groups)
    return groups, window_ends(self._sizes[groups], self.window_groups)

  def _nth_pair(self, members: np.ndarray, n: int) -> int:
    """The source index of the n-th pair of `members`' pairs laid end to end."""
    ends = np.cumsum(self._sizes[members])
    member = int(np.searchsorted(ends, n, side="right"))
    group = members[member]
    return int(self._starts[group] + n - (ends[member] - self._sizes[group]))

  def _memo(self, table: collections.OrderedDict, key, keep: int, make):
    with self._lock:
      if key in table:
        table.move_to_end(key)
        return table[key]
    value = make()  # Outside the lock: two threads may both make it, and get the same.
    with self._lock:
      table[key] = value
      while len(table) > keep:
        table.popitem(last=False)
    return value


def make_order(num_pairs: int, seed: int, group_starts: Sequence[int] | None = None,
               window_groups: int | None = None) -> GlobalOrder | WindowedOrder:
  """The windowed order where it saves reads, else the full shuffle.

  Windowed only for a source with row groups (`group_starts`, else None), a window set
  (`window_groups` > 0) and more groups than one window: fewer all fit in the source's cache
  (it holds at least a window's groups), so any order reads each once, and the full shuffle,
  the order of every other source, mixes best.
  """
  if group_starts is None or not window_groups or len(group_starts) <= window_groups:
    return GlobalOrder(num_pairs, seed)
  return WindowedOrder(group_starts, num_pairs, seed, window_groups)


def window_ends(sizes: np.ndarray, window_groups: int) -> np.ndarray:
  """Cumulative pair counts at the end of each window of `window_groups` consecutive groups
  of `sizes` (the last window may hold fewer groups)."""
  return np.cumsum(np.add.reduceat(sizes, np.arange(0, len(sizes), window_groups)))


def run_starts(labels: np.ndarray) -> np.ndarray:
  """The indices where a new run of equal labels begins: [3, 3, 5, 5, 5, 8] -> [0, 2, 5]."""
  labels = np.asarray(labels)
  if not len(labels):
    return np.zeros(0, np.int64)
  return np.flatnonzero(np.concatenate([[True], labels[1:] != labels[:-1]]))


def stand_ins(num_pairs: int, position: int) -> Iterator[int]:
  """The positions after `position` in its epoch, wrapping round to the epoch's start:
  where to look for a usable pair when the one at `position` is not. Every other pair of
  the epoch comes once, so running out of them means the epoch has no usable pair."""
  epoch, index = divmod(position, num_pairs)
  for step in range(1, num_pairs):
    yield epoch * num_pairs + (index + step) % num_pairs


def host_position(first: int, element: int, *, batch_pairs: int, host: slice) -> int:
  """The global position of a host's `element`-th pair (counted from global position
  `first`): its `host` slice of each global batch of `batch_pairs`, batch after batch."""
  per_host = host.stop - host.start
  batch, row = divmod(element, per_host)
  return first + batch * batch_pairs + host.start + row


def _rng(seed: int, *keys: int) -> np.random.Generator:
  # A seed sequence takes non-negative integers: a negative train.seed maps to one.
  return np.random.default_rng([seed % 2**64, *keys])
