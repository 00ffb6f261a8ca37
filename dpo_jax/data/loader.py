"""Preference pairs (Pick-a-Pic, JSONL, TFDS or the latent cache) -> this host's batches, through a
resumable grain loader.

Each host reads a disjoint 1/process_count of the pairs (grain's ShardOptions) in an order
shuffled anew every epoch, forever; each pair's crop, flip and prompt dropout come from
(train.seed, epoch, pair id), so they do not depend on batch size, worker or host count.
Batches hold `pixels` [B, 2, R, R, 3] float32 (winner, loser), `input_ids_{i}` [B, L_i] int32
(one per tokenizer), `original_size` and `crop_top_left` [B, 2, 2] int32, `pair_ids` and
`epochs` [B] int32, with B = train.batch_pairs / process_count (see `parallel.host_slice`).
Pairs that cannot be used are skipped on the way and counted (`skips`): `PairBatches` keeps
the counts, and saves them with the iterator's position.
"""
import json
from collections.abc import Iterator, Sequence

import grain.python as grain
import numpy as np
import transformers

from dpo_jax import parallel
from dpo_jax.data import (files, interfaces, jsonl_pairs, latent_cache, pickapic, skips, subset,
                          tfds_pairs, transforms)
from dpo_jax.errors import UserError

# Raw records hold two JPEGs (~0.7 MB for Pick-a-Pic): bound what the read threads hold.
_READ_OPTIONS = grain.ReadOptions(num_threads=16, prefetch_buffer_size=128)


class _AddEpoch:
  """A grain operation that adds each record's epoch to its data.

  Only operations see a record's metadata, and the epoch comes from its position in the
  sampled sequence. grain's own per-record rng is seeded by that position, which shifts
  with the host count, so the transforms seed their own from (seed, epoch, pair id).
  """

  def __init__(self, epoch_length: int):
    self._epoch_length = epoch_length  # Sampled positions per epoch, over all hosts.

  def __call__(self, records: Iterator[grain.Record]) -> Iterator[grain.Record]:
    for record in records:
      epoch = record.metadata.index // self._epoch_length
      yield grain.Record(record.metadata, {**record.data, "epochs": epoch})


def make_source(data_config) -> interfaces.PairSource:
  """The random-access source `data.format` names; all give the same records."""
  model_filter = data_config.get("model_filter")
  data_format = data_config.get("format", "pickapic")
  if data_format == "jsonl":
    if model_filter:
      raise UserError("data.model_filter reads Pick-a-Pic's model_0/model_1 columns; JSONL "
                      "pairs have none: unset --config.data.model_filter")
    return jsonl_pairs.JsonlPairsSource(data_config.train_files)
  if data_format == "tfds":
    return tfds_pairs.TfdsPairsSource(data_config.tfds_name, split=data_config.tfds_split,
                                      data_dir=data_config.get("tfds_data_dir"),
                                      model_filter=model_filter)
  train_files = files.split_files(data_config.train_files, data_config.get("split", "train"))
  return pickapic.PickapicSource(train_files, model_filter=model_filter)


def _prepare_pair(config, empty_prompt_prob: float) -> transforms.PreparePair:
  return transforms.PreparePair(seed=config.train.seed, resolution=config.data.resolution,
                                random_crop=config.data.random_crop,
                                random_flip=config.data.random_flip,
                                shared_flip=config.data.get("shared_flip", False),
                                empty_prompt_prob=empty_prompt_prob)


def make_train_iterator(config, tokenizers: Sequence[transformers.CLIPTokenizer], *,
                        process_index: int, process_count: int) -> "PairBatches":
  """An endless iterator of this host's batches: of the latent cache `config.data.cache_dir`
  when set (see `latent_cache`), else of `config.data.train_files`.

  Args:
    config: reads data.{format, train_files, split, cache_dir, model_filter, max_train_pairs,
      resolution, random_crop, random_flip, shared_flip, empty_prompt_prob, workers,
      max_bad_fraction}
      and train.{batch_pairs, seed}.
    tokenizers: the pipeline's tokenizers in model_index order (SDXL: two).
    process_index: this host, `jax.process_index()`.
    process_count: the number of hosts, `jax.process_count()`.
  """
  cached = bool(config.data.get("cache_dir"))
  source = (latent_cache.LatentCacheSource(config.data.cache_dir) if cached
            else make_source(config.data))
  empty_prompt = source.empty_prompt if cached else None
  if config.data.get("max_train_pairs"):
    source = subset.RandomSubset(source, config.data.max_train_pairs, config.train.seed)
  if cached:
    pair_operations = [latent_cache.CachedPair(seed=config.train.seed,
                                               empty_prompt_prob=config.data.empty_prompt_prob,
                                               empty_prompt=empty_prompt)]
  else:
    pair_operations = [_prepare_pair(config, config.data.empty_prompt_prob),
                       skips.CountSkipped(pass_length=len(source) // process_count),
                       transforms.Tokenize(tokenizers)]
  indexed = {"kept": len(source), **source.skipped_at_start}
  error = skips.too_many_bad(indexed, config.data.get("max_bad_fraction", 1.0),
                             "data.train_files")
  if error:
    raise UserError(error)
  share = parallel.host_slice(config.train.batch_pairs, process_index, process_count)
  per_host = share.stop - share.start
  if per_host * process_count != config.train.batch_pairs or not per_host:
    raise UserError(f"train.batch_pairs={config.train.batch_pairs} does not split evenly over "
                    f"{process_count} hosts; set --config.train.batch_pairs to a multiple of "
                    f"{process_count}")
  per_shard = len(source) // process_count
  if not per_shard:
    raise UserError(f"the data holds {len(source)} pairs, fewer than the {process_count} "
                    "hosts; give more data or run on fewer hosts")
  # Every host drops the same last len % process_count pairs, so the hosts' epochs align.
  shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                             drop_remainder=True)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=True,
                               seed=config.train.seed, num_epochs=None)
  operations = [_AddEpoch(per_shard * process_count), *pair_operations,
                grain.Batch(batch_size=per_host, drop_remainder=True)]
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=config.data.workers, shard_options=shard,
                            read_options=_READ_OPTIONS)
  return PairBatches(iter(loader), source.skipped_at_start)


def make_prepare_iterator(config, source, tokenizers: Sequence[transformers.CLIPTokenizer], *,
                          batch_pairs: int, process_index: int, process_count: int
                          ) -> "PairBatches":
  """One pass, in order, over this host's contiguous share of `source`, as epoch 0 of
  training would prepare each pair (crop, flip) but with every caption kept: the latent
  cache applies prompt dropout per epoch at train time. The last batch may be short."""
  shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                             drop_remainder=False)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=False,
                               seed=config.train.seed, num_epochs=1)
  operations = [_AddEpoch(len(source)), _prepare_pair(config, empty_prompt_prob=0.0),
                skips.CountSkipped(), transforms.Tokenize(tokenizers),
                grain.Batch(batch_size=batch_pairs, drop_remainder=False)]
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=config.data.workers, shard_options=shard,
                            read_options=_READ_OPTIONS)
  return PairBatches(iter(loader), source.skipped_at_start)


def padded(batch: dict, size: int) -> dict:
  """A short batch repeated in its last row up to `size` pairs: one compiled shape for
  every batch (callers drop the padding rows from the results)."""
  rows = len(batch["pair_ids"])
  index = np.minimum(np.arange(size), rows - 1)
  return {name: value[index] for name, value in batch.items()}


class PairBatches:
  """This host's batches, counting what the pipeline skipped on the way (an
  `interfaces.BatchIterator`).

  `counts` are this host's streamed counts (`skips` kinds and 'kept'), since the run began:
  they are saved and restored with the position. `skipped_at_start` are what the source
  left out while indexing the files, the same on every host.
  """

  def __init__(self, iterator: grain.PyGrainDatasetIterator, skipped_at_start: dict[str, int]):
    self._iterator = iterator
    self.skipped_at_start = dict(skipped_at_start)
    self.counts = skips.zero_counts()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self.counts = skips.add(self.counts, skips.pop_counts(batch))
    return batch

  def get_state(self) -> dict:
    return {"position": _position(self._iterator), "counts": self.counts}

  def set_state(self, state: dict) -> None:
    _set_position(self._iterator, state["position"])
    self.counts = skips.add(skips.zero_counts(), state["counts"])


def _position(iterator: grain.PyGrainDatasetIterator) -> dict:
  """The iterator's position as JSON-ready data (for an orbax `JsonSave` item).

  It pins the files, train.seed, data.workers and the host count: a resume must keep them.
  """
  return json.loads(iterator.get_state())


def _set_position(iterator: grain.PyGrainDatasetIterator, state: dict) -> None:
  """Moves a fresh iterator to where `_position` was taken: the next batch follows it."""
  try:
    iterator.set_state(json.dumps(state).encode())
  except ValueError:
    raise UserError("the checkpoint's data position belongs to another pipeline (other "
                    "data.train_files, train.seed, data.workers or host count); resume with "
                    "the settings it was saved with, or start a new --workdir") from None
