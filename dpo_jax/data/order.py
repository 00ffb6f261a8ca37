"""The run's order of pairs: one global sequence, the same on every host.

Position p of the endless sequence is, in epoch p // N (N pairs), the pair at index p % N of
that epoch's shuffled order, a permutation drawn from (train.seed, epoch) alone (grain's
`IndexSampler`, unsharded). Global batch k is positions [k·B, (k+1)·B); a host reads its
contiguous `parallel.host_slice` of each, as the devices split a batch. The batches, and
the one position a checkpoint saves, so do not depend on the host count.
"""
from collections.abc import Iterator

import grain.python as grain


class GlobalOrder:
  """Position -> (epoch, source index), for `num_pairs` pairs shuffled anew every epoch."""

  def __init__(self, num_pairs: int, seed: int):
    self.num_pairs = num_pairs
    self._sampler = grain.IndexSampler(num_pairs, shard_options=grain.NoSharding(),
                                       shuffle=True, seed=seed, num_epochs=None)

  def __getitem__(self, position: int) -> tuple[int, int]:
    return position // self.num_pairs, self._sampler[position].record_key

  def stand_ins(self, position: int) -> Iterator[int]:
    """The positions after `position` in its epoch, wrapping round to the epoch's start:
    where to look for a usable pair when the one at `position` is not. Every other pair of
    the epoch comes once, so running out of them means the epoch has no usable pair."""
    epoch, index = divmod(position, self.num_pairs)
    for step in range(1, self.num_pairs):
      yield epoch * self.num_pairs + (index + step) % self.num_pairs


def host_position(first: int, element: int, *, batch_pairs: int, host: slice) -> int:
  """The global position of a host's `element`-th pair (counted from global position
  `first`): its `host` slice of each global batch of `batch_pairs`, batch after batch."""
  per_host = host.stop - host.start
  batch, row = divmod(element, per_host)
  return first + batch * batch_pairs + host.start + row
