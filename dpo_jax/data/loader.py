"""Preference pairs (Pick-a-Pic, JSONL, TFDS or the latent cache) -> this host's batches, through a
resumable grain pipeline.

Every host walks the same global sequence of pairs, shuffled anew every epoch from
(train.seed, epoch) alone (`order`; Pick-a-Pic parquet within windows of
data.shuffle_window_groups row groups, so each group is read about once an epoch), and
takes its contiguous `parallel.host_slice` of each global batch of train.batch_pairs: the
global batches, and so the run, do not depend on the host count, and each host decodes only
its own slice. Each pair's crop, flip and prompt dropout come from (train.seed, epoch, pair
id), so they do not depend on batch size, worker or host count either. Batches hold
`pixels` [B, 2, R, R, 3] float32 (winner, loser), `input_ids_{i}` [B, L_i] int32 (one per
tokenizer), `original_size` and `crop_top_left` [B, 2, 2] int32, `pair_ids` and `epochs` [B]
int32, with B = train.batch_pairs / process_count. A pair that cannot be used is counted
(`skips`) and the next usable pair of its epoch takes its row; `PairBatches` keeps the
counts, and saves them with the position.
Unpaired data (data.format='unpaired', for KTO) gives one image per row instead of two
(`pixels` [B, 1, R, R, 3], ...) and each row's label, `desirable` [B] bool.
"""
import copy
import functools
import signal
from collections.abc import Iterator, Sequence

import grain.python as grain
import numpy as np
import transformers
from absl import logging

from dpo_jax import parallel
from dpo_jax.data import (files, interfaces, jsonl_pairs, latent_cache, order, pickapic, skips,
                          subset, tfds_pairs, transforms)
from dpo_jax.errors import UserError

# Raw records hold two JPEGs (~0.7 MB for Pick-a-Pic): bound what the read threads hold.
_READ_OPTIONS = grain.ReadOptions(num_threads=16, prefetch_buffer_size=128)
# Training makes host batches ahead of the loop in a thread of the main process or of each of
# data.workers processes: one thread did the most per core on a 2-core machine (BENCHMARKS.md);
# more processes decode more.
_BATCHES_AHEAD = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
# More pairs than any run reads: a grain dataset has a length.
_ENDLESS = 2**48
# Parquet row groups a Pick-a-Pic source keeps decoded, at least (more for a larger window).
_CACHE_ROW_GROUPS = 4


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
  if data_format in ("jsonl", "unpaired"):
    if model_filter:
      raise UserError("data.model_filter reads Pick-a-Pic's model_0/model_1 columns; JSONL "
                      "files have none: unset --config.data.model_filter")
    source = (jsonl_pairs.JsonlPairsSource if data_format == "jsonl"
              else jsonl_pairs.UnpairedJsonlSource)
    return source(data_config.train_files)
  if data_format == "tfds":
    return tfds_pairs.TfdsPairsSource(data_config.tfds_name, split=data_config.tfds_split,
                                      data_dir=data_config.get("tfds_data_dir"),
                                      model_filter=model_filter)
  train_files = files.split_files(data_config.train_files, data_config.get("split", "train"))
  # The cache must hold a window's groups, or the windowed order reads them again and again.
  cache = max(_CACHE_ROW_GROUPS, data_config.get("shuffle_window_groups") or 0)
  return pickapic.PickapicSource(train_files, model_filter=model_filter, cache_row_groups=cache)


def _prepare_pair(config, empty_prompt_prob: float) -> transforms.PreparePair:
  return transforms.PreparePair(seed=config.train.seed, resolution=config.data.resolution,
                                random_crop=config.data.random_crop,
                                random_flip=config.data.random_flip,
                                shared_flip=config.data.get("shared_flip", False),
                                empty_prompt_prob=empty_prompt_prob)


def make_train_iterator(config, tokenizers: Sequence[transformers.CLIPTokenizer], *,
                        process_index: int, process_count: int) -> "PairBatches":
  """An endless iterator of this host's slices of the global batches: of the latent cache
  `config.data.cache_dir` when set (see `latent_cache`), else of `config.data.train_files`.

  Args:
    config: reads data.{format, train_files, split, cache_dir, model_filter, max_train_pairs,
      shuffle_window_groups, resolution, random_crop, random_flip, shared_flip,
      empty_prompt_prob, workers, max_bad_fraction} and train.{batch_pairs, seed}.
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
    prepare = latent_cache.CachedPair(seed=config.train.seed,
                                      empty_prompt_prob=config.data.empty_prompt_prob,
                                      empty_prompt=empty_prompt)
    finish = ()
  else:
    prepare = _prepare_pair(config, config.data.empty_prompt_prob)
    # Copies: batches are made in a thread of their own, and a fast tokenizer refuses calls
    # from two threads at once ("Already borrowed").
    finish = (transforms.Tokenize(copy.deepcopy(list(tokenizers))),)
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
  global_order = order.make_order(len(source), config.train.seed,
                                  getattr(source, "group_starts", None),
                                  config.data.get("shuffle_window_groups"))
  pairs = functools.partial(_HostPairs, source, global_order, prepare, finish,
                            batch_pairs=config.train.batch_pairs, host=share)
  batches = functools.partial(_host_batches, pairs, per_host=per_host,
                              workers=config.data.workers)
  return PairBatches(batches, batch_pairs=config.train.batch_pairs,
                     data_order=_data_order(source, config.train.seed, global_order),
                     skipped_at_start=source.skipped_at_start)


def _data_order(source, seed: int, global_order) -> str:
  """What fixes the order, as a checkpoint records it. The full shuffle's is worded as before
  windows existed, so the runs saved then resume."""
  described = f"{source!r}, seed={seed}"
  if isinstance(global_order, order.WindowedOrder):
    logging.info("Data order: windows of %d of the %d row groups, shuffled within each",
                 global_order.window_groups, global_order.num_groups)
    described += f", shuffle_window_groups={global_order.window_groups}"
  return described


class _HostPairs:
  """This host's pairs, prepared: element i is the pair at the global position of its i-th
  row (`order.host_position`, from global position `first` on).

  A pair that cannot be used (`skips`) is counted at its position, and the next usable pair
  of its epoch (`order.stand_ins`) takes its row: every position gives one row
  whatever the host count, and a host reads no other host's pairs unless one of its own is
  unusable. Each row carries `skipped_{kind}`: 1 where its own pair was skipped for `kind`.
  """

  def __init__(self, source: interfaces.PairSource,
               global_order: order.GlobalOrder | order.WindowedOrder,
               prepare: grain.MapTransform, finish: Sequence[grain.MapTransform], first: int,
               *, batch_pairs: int, host: slice):
    self._source, self._order, self._prepare, self._finish = source, global_order, prepare, finish
    self._first, self._batch_pairs, self._host = first, batch_pairs, host
    self._warned = 0

  def __call__(self, element: int) -> dict:
    position = order.host_position(self._first, element, batch_pairs=self._batch_pairs,
                                   host=self._host)
    pair = self._prepared(position)
    counts = dict.fromkeys(skips.KINDS, 0)
    if "skip" in pair:
      counts[pair["skip"]] = 1
      self._warned = skips.log_skipped(pair, self._warned)
      pair = self._stand_in(position, pair)
    for transform in self._finish:
      pair = transform.map(pair)
    return {**pair, **{f"skipped_{kind}": np.int32(n) for kind, n in counts.items()}}

  def _prepared(self, position: int) -> dict:
    epoch, index = self._order[position]
    return self._prepare.map({**self._source[index], "epochs": epoch})

  def _stand_in(self, position: int, skipped: dict) -> dict:
    read = dict.fromkeys(skips.KINDS, 0)
    read[skipped["skip"]] = 1
    for other in self._order.stand_ins(position):
      pair = self._prepared(other)
      if "skip" not in pair:
        return pair
      read[pair["skip"]] += 1
    raise skips.no_usable_pair(read, skipped)


def _host_batches(pairs, first: int, *, per_host: int, workers: int):
  """This host's batches from global position `first` on. A whole batch is one element of
  the grain pipeline, so the worker processes (`workers`) each make whole batches and the
  batches do not depend on their number."""
  batches = grain.MapDataset.range(_ENDLESS).map(pairs(first)).batch(per_host)
  if not workers:
    return iter(batches.to_iter_dataset(_BATCHES_AHEAD))
  # Batches reach this process through shared memory, not pickled. A worker makes each when
  # asked (no thread ahead of it): a batch made ahead and never sent would leak its memory.
  batches.enable_shared_memory_output()
  dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=0))
  return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                  worker_init_fn=_outlive_sigterm))


def _outlive_sigterm(worker_index: int, worker_count: int) -> None:
  """A data worker ignores SIGTERM. Schedulers (SLURM, Kubernetes, a TPU VM's maintenance)
  send it to every process of the job: the trainer then finishes its step and saves at the
  same step boundary on every host (`preemption`), which needs the next batches to keep
  coming until then. The workers still end with the run: grain stops them through an event
  when the iterator closes, and kills any left after 25 s."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_prepare_iterator(config, source, tokenizers: Sequence[transformers.CLIPTokenizer], *,
                          batch_pairs: int, process_index: int, process_count: int
                          ) -> "CountedBatches":
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
  return CountedBatches(iter(loader), source.skipped_at_start)


def padded(batch: dict, size: int) -> dict:
  """A short batch repeated in its last row up to `size` pairs: one compiled shape for
  every batch (callers drop the padding rows from the results)."""
  rows = len(batch["pair_ids"])
  index = np.minimum(np.arange(size), rows - 1)
  return {name: value[index] for name, value in batch.items()}


class CountedBatches:
  """A one-pass grain iterator's batches, counting what was skipped on the way (`counts`:
  `skips` kinds and 'kept'); `skipped_at_start` is what the source left out while
  indexing."""

  def __init__(self, iterator, skipped_at_start: dict[str, int]):
    self._iterator = iterator
    self.skipped_at_start = dict(skipped_at_start)
    self.counts = skips.zero_counts()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self.counts = skips.add(self.counts, skips.pop_counts(batch))
    return batch


class PairBatches:
  """This host's slices of the global batches, from one global position on (an
  `interfaces.BatchIterator`).

  The state is that position, the same on every host, with what fixes the order (the data
  and train.seed) and this host's `counts` since the run began (`skips` kinds and 'kept',
  the rows whose own pair was used; a stand-in row counts as its position's skip). A run
  may resume on another host count, data.workers or train.batch_pairs.
  """

  def __init__(self, batches_from, *, batch_pairs: int, data_order: str,
               skipped_at_start: dict[str, int]):
    self._batches_from, self._batch_pairs, self._data_order = batches_from, batch_pairs, data_order
    self.skipped_at_start = dict(skipped_at_start)
    self.counts = skips.zero_counts()
    self._position, self._batches = 0, None  # Made on the first batch: set_state comes first.

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._batches is None:
      self._batches = self._batches_from(self._position)
    batch = next(self._batches)
    self._position += self._batch_pairs
    counts = skips.pop_counts(batch)
    counts["kept"] -= sum(counts[kind] for kind in skips.KINDS)  # Stand-ins are not kept.
    self.counts = skips.add(self.counts, counts)
    return batch

  def get_state(self) -> dict:
    return {"position": self._position, "order": self._data_order, "counts": self.counts}

  def set_state(self, state: dict) -> None:
    """Moves to `state`'s position: the next batch is the one that followed it."""
    if state.get("order") != self._data_order or not isinstance(state.get("position"), int):
      raise UserError("the checkpoint's data position belongs to another data order (other "
                      "data.train_files, data.max_train_pairs, data.shuffle_window_groups or "
                      "train.seed); resume with the settings it was saved with (a run saved "
                      "before windowed shuffles: data.shuffle_window_groups=0), or start a "
                      "new --workdir")
    self._position, self._batches = state["position"], None
    self.counts = skips.add(skips.zero_counts(), state["counts"])
