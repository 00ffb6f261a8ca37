"""In-memory preference pairs with a learnable preference, for the demo and tests.

Each pair is a function of (seed, pair id) only: the winner's latent has a positive mean in
channel 0 and the loser's a negative one (the latent analogue of "warm beats cool"), and
both share a random text context. No files, no encoders.
"""
import numpy as np


def synthetic_pairs(pair_ids: np.ndarray, *, seed: int, latent_size: int, channels: int,
                    context_length: int, context_dim: int) -> dict[str, np.ndarray]:
  """A batch of B=len(pair_ids) pairs: latents [B, 2, H, W, C] (winner, loser), context
  [B, T, D]."""
  winners, losers, contexts = [], [], []
  for pair_id in pair_ids:
    rng = np.random.default_rng([seed, int(pair_id)])
    shape = (latent_size, latent_size, channels)
    offset = np.zeros(channels, np.float32)
    offset[0] = 1.0
    winners.append(rng.standard_normal(shape, np.float32) + offset)
    losers.append(rng.standard_normal(shape, np.float32) - offset)
    contexts.append(rng.standard_normal((context_length, context_dim), np.float32))
  return {"latents": np.stack([np.stack(winners), np.stack(losers)], axis=1),
          "context": np.stack(contexts),
          "pair_ids": np.asarray(pair_ids, np.int32)}


class SyntheticIterator:
  """Consecutive batches of `synthetic_pairs`: global batch k is pair ids [k·B, (k+1)·B),
  of which a host makes its `host_slice`. Its whole state is the next pair id, the same on
  every host.

  A `interfaces.BatchIterator`; nothing is ever skipped.
  """

  def __init__(self, *, batch_pairs: int, host_slice: slice, **options):
    self._batch_pairs, self._host_slice, self._options = batch_pairs, host_slice, options
    self._next_pair = 0

  def __next__(self) -> dict[str, np.ndarray]:
    pair_ids = np.arange(self._next_pair, self._next_pair + self._batch_pairs)
    batch = synthetic_pairs(pair_ids[self._host_slice], **self._options)
    self._next_pair += self._batch_pairs  # Only once made: a failed read is read again.
    return batch

  @property
  def skipped_at_start(self) -> dict[str, int]:
    return {}

  @property
  def counts(self) -> dict[str, int]:
    """This host's pairs so far."""
    per_host = len(range(self._batch_pairs)[self._host_slice])
    return {"kept": self._next_pair // self._batch_pairs * per_host}

  def get_state(self) -> dict:
    return {"next_pair": self._next_pair}

  def set_state(self, state: dict) -> None:
    self._next_pair = state["next_pair"]
