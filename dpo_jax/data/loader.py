"""Preference pairs (Pick-a-Pic or JSONL) -> this host's batches, through a resumable grain loader.

Each host reads a disjoint 1/process_count of the pairs (grain's ShardOptions) in an order
shuffled anew every epoch, forever; each pair's crop, flip and prompt dropout come from
(train.seed, epoch, pair id), so they do not depend on batch size, worker or host count.
Batches hold `pixels` [B, 2, R, R, 3] float32 (winner, loser), `input_ids_{i}` [B, L_i] int32
(one per tokenizer), `original_size` and `crop_top_left` [B, 2, 2] int32, `pair_ids` and
`epochs` [B] int32, with B = train.batch_pairs / process_count (see `parallel.host_slice`).
"""
import json
from collections.abc import Iterator, Sequence

import grain.python as grain
import transformers

from dpo_jax.data import jsonl_pairs, pickapic, transforms
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


def make_source(data_config) -> pickapic.PickapicSource | jsonl_pairs.JsonlPairsSource:
  """The random-access source `data.format` names; both give the same records."""
  model_filter = data_config.get("model_filter")
  if data_config.get("format", "pickapic") == "jsonl":
    if model_filter:
      raise UserError("data.model_filter reads Pick-a-Pic's model_0/model_1 columns; JSONL "
                      "pairs have none: unset --config.data.model_filter")
    return jsonl_pairs.JsonlPairsSource(data_config.train_files)
  return pickapic.PickapicSource(data_config.train_files, model_filter=model_filter)


def make_train_iterator(config, tokenizers: Sequence[transformers.CLIPTokenizer], *,
                        process_index: int, process_count: int) -> grain.PyGrainDatasetIterator:
  """An endless iterator of this host's batches of `config.data.train_files`.

  Args:
    config: reads data.{format, train_files, model_filter, resolution, random_crop, random_flip,
      empty_prompt_prob, workers} and train.{batch_pairs, seed}.
    tokenizers: the pipeline's tokenizers in model_index order (SDXL: two).
    process_index: this host, `jax.process_index()`.
    process_count: the number of hosts, `jax.process_count()`.
  """
  source = make_source(config.data)
  per_host, rest = divmod(config.train.batch_pairs, process_count)
  if rest or not per_host:
    raise UserError(f"train.batch_pairs={config.train.batch_pairs} does not split evenly over "
                    f"{process_count} hosts; set --config.train.batch_pairs to a multiple of "
                    f"{process_count}")
  per_shard = len(source) // process_count
  if not per_shard:
    raise UserError(f"data.train_files holds {len(source)} pairs, fewer than the "
                    f"{process_count} hosts; give more data or run on fewer hosts")
  # Every host drops the same last len % process_count pairs, so the hosts' epochs align.
  shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                             drop_remainder=True)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=True,
                               seed=config.train.seed, num_epochs=None)
  operations = [
      _AddEpoch(per_shard * process_count),
      transforms.PreparePair(seed=config.train.seed, resolution=config.data.resolution,
                             random_crop=config.data.random_crop,
                             random_flip=config.data.random_flip,
                             empty_prompt_prob=config.data.empty_prompt_prob),
      transforms.DropFailed(),
      transforms.Tokenize(tokenizers),
      grain.Batch(batch_size=per_host, drop_remainder=True),
  ]
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=config.data.workers, shard_options=shard,
                            read_options=_READ_OPTIONS)
  return iter(loader)


def iterator_state(iterator: grain.PyGrainDatasetIterator) -> dict:
  """The iterator's position as JSON-ready data (for an orbax `JsonSave` item).

  It pins the files, train.seed, data.workers and the host count: a resume must keep them.
  """
  return json.loads(iterator.get_state())


def restore_iterator(iterator: grain.PyGrainDatasetIterator, state: dict) -> None:
  """Moves a fresh iterator to where `iterator_state` was taken: the next batch follows it."""
  try:
    iterator.set_state(json.dumps(state).encode())
  except ValueError:
    raise UserError("the checkpoint's data position belongs to another pipeline (other "
                    "data.train_files, train.seed, data.workers or host count); resume with "
                    "the settings it was saved with, or start a new --workdir") from None
