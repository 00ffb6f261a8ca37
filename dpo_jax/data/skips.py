"""Pairs left out of training, and why: counted in the grain pipeline, summed on the host.

A source or transform marks a record it cannot use with `skip` (one of `KINDS`) and, for the
log, `error`. Ties, unlabeled pairs and pairs outside data.model_filter are the data's design;
the other kinds are bad input (`BAD_KINDS`): the run goes on past them, counts them, and stops
only when their share passes data.max_bad_fraction.
"""
from collections.abc import Iterable, Iterator, Mapping

import grain.python as grain
import numpy as np
from absl import logging

from dpo_jax.errors import UserError

# Left out by the data's design: a tie, a row never judged, a model data.model_filter excludes.
DESIGN_KINDS = ("tie", "unlabeled", "filtered")
# line: a malformed JSONL line; label: a null or contradictory label; caption: a null or
# missing one; file: an image file that cannot be read; image: bytes that are no usable image.
BAD_KINDS = ("line", "label", "caption", "file", "image")
KINDS = DESIGN_KINDS + BAD_KINDS
# The share of bad pairs is judged once this many pairs were read: one bad pair in a first
# batch of eight says little about a dataset.
MIN_PAIRS_JUDGED = 1000
# Bad pairs are named in the log up to this many per process, then only counted.
_MAX_WARNINGS = 20


def zero_counts() -> dict[str, int]:
  """{'kept': 0, kind: 0 for every kind}: the shape of every count in this module."""
  return dict.fromkeys(("kept",) + KINDS, 0)


def skipped(kind: str, pair_id: int, error: str | None = None) -> dict:
  """A record that says the pair is left out, for the sources and transforms to return."""
  assert kind in KINDS, kind
  return {"skip": kind, "pair_ids": int(pair_id), **({"error": error} if error else {})}


class CountSkipped:
  """A grain operation: drops records marked `skip`, and attaches to each kept record how
  many of each kind were dropped since the previous kept one (`skipped_{kind}` int32).

  The counts then ride in the batches to the host, also from grain worker processes, where
  `pop_counts` takes them out again.
  """

  def __call__(self, records: Iterator[grain.Record]) -> Iterator[grain.Record]:
    pending, warned = dict.fromkeys(KINDS, 0), 0
    for record in records:
      kind = record.data.get("skip")
      if kind is None:
        counts = {f"skipped_{k}": np.int32(n) for k, n in pending.items()}
        yield grain.Record(record.metadata, {**record.data, **counts})
        pending = dict.fromkeys(KINDS, 0)
        continue
      pending[kind] += 1
      warned = log_skipped(record.data, warned)


def no_usable_pair(read: Mapping[str, int], first: dict) -> UserError:
  """The one line for data in which a whole pass (`read`: counts by kind) found no usable
  pair; `first` is the first unusable pair's `skipped` record."""
  return UserError(f"no usable pair in a whole pass over the data ({sum(read.values())} pairs "
                   f"read: {describe(read)}); the first: pair {first['pair_ids']}: "
                   f"{first.get('error', first['skip'])}. Fix or remove the unusable pairs")


def log_skipped(record: dict, warned: int) -> int:
  """Names a bad pair's `skipped` record in the log, the first `_MAX_WARNINGS` of a process
  (`warned` so far); returns the new number warned."""
  kind = record["skip"]
  if kind not in BAD_KINDS:
    return warned
  warned += 1
  if warned <= _MAX_WARNINGS:
    logging.warning("Skipping pair %d (%s): %s%s", record["pair_ids"], kind,
                    record.get("error", kind),
                    "; further bad pairs are only counted" if warned == _MAX_WARNINGS else "")
  return warned


def pop_counts(batch: dict) -> dict[str, int]:
  """Removes the `skipped_*` arrays from a host batch; returns its counts, kept included."""
  counts = zero_counts()
  counts["kept"] = len(batch["pair_ids"])
  for kind in KINDS:
    counts[kind] = int(np.sum(batch.pop(f"skipped_{kind}", 0)))
  return counts


def add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
  return {key: a.get(key, 0) + b.get(key, 0) for key in zero_counts()}


def bad_count(counts: Mapping[str, int]) -> int:
  return sum(counts.get(kind, 0) for kind in BAD_KINDS)


def bad_fraction(counts: Mapping[str, int]) -> float:
  """Bad pairs over bad and kept pairs (ties and filtered pairs are no one's mistake)."""
  bad = bad_count(counts)
  return bad / max(bad + counts.get("kept", 0), 1)


def describe(counts: Mapping[str, int]) -> str:
  """'kept 120, skipped 3 bad (image 2, caption 1), left out 40 tie': the counts in words."""
  bad = [f"{kind} {counts[kind]}" for kind in BAD_KINDS if counts.get(kind)]
  parts = [f"kept {counts['kept']}"] if "kept" in counts else []
  parts.append(f"skipped {bad_count(counts)} bad" + (f" ({', '.join(bad)})" if bad else ""))
  design = [f"{counts[kind]} {kind}" for kind in DESIGN_KINDS if counts.get(kind)]
  if design:
    parts.append(f"left out {', '.join(design)}")
  return ", ".join(parts)


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
  """The counts of several hosts (or stages) added up."""
  total = zero_counts()
  for count in counts:
    total = add(total, count)
  return total


def too_many_bad(counts: Mapping[str, int], max_bad_fraction: float, where: str,
                 min_pairs: int | None = None) -> str | None:
  """The one-line error when bad pairs pass `max_bad_fraction` of those judged, else None.

  Nothing is judged before `min_pairs` (default `MIN_PAIRS_JUDGED`) pairs were read.
  """
  min_pairs = MIN_PAIRS_JUDGED if min_pairs is None else min_pairs
  read = bad_count(counts) + counts.get("kept", 0)
  if read < min_pairs or bad_fraction(counts) <= max_bad_fraction:
    return None
  return (f"{where}: {bad_count(counts)} of {read} pairs were bad input ({describe(counts)}), "
          f"more than data.max_bad_fraction={max_bad_fraction}; fix the data (the log names "
          "the bad pairs) or raise --config.data.max_bad_fraction")


def to_metrics(counts: Mapping[str, int]) -> dict[str, float]:
  """Cumulative counts for metrics.jsonl: pairs kept, each kind skipped, the bad share."""
  return {"data_pairs_kept": counts.get("kept", 0),
          **{f"data_skipped_{kind}": counts.get(kind, 0) for kind in KINDS},
          "data_bad_fraction": bad_fraction(counts)}
