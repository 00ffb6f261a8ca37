"""`data.max_train_pairs`: train on a seeded random subset of a source's pairs."""
import numpy as np

from dpo_jax.data import order


class RandomSubset:
  """A grain `RandomAccessDataSource` over `size` pairs of `source`, drawn without
  replacement from (seed), kept in the source's order. Records keep their own pair ids, so a
  pair's noise is the same as in a run over the whole source."""

  def __init__(self, source, size: int, seed: int):
    self._source = source
    self._size = min(size, len(source))
    chosen = np.random.default_rng(seed).permutation(len(source))[:self._size]
    self._positions = np.sort(chosen)
    self.skipped_at_start = dict(source.skipped_at_start)
    # The subset keeps the source's order, so its pairs of one row group stay consecutive.
    starts = getattr(source, "group_starts", None)
    self.group_starts = (None if starts is None else order.run_starts(
        np.searchsorted(starts, self._positions, side="right") - 1))

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, position: int):
    return self._source[int(self._positions[position])]

  def __repr__(self) -> str:
    return f"RandomSubset({self._source!r}, size={self._size})"
