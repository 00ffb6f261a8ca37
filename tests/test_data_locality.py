"""Pick-a-Pic parquet in the windowed order (data.shuffle_window_groups): every epoch a
permutation of the pairs, the same on any host count and after a resume, and each row group
read about once an epoch, where the full shuffle reads one for nearly every pair."""
import functools
import pickle

import grain.python as grain
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_data
import tiny_models
from test_multihost import _assert_same, _global_batches  # One global batch = the hosts' slices.
from dpo_jax import config_checks, default_config, parallel
from dpo_jax.data import loader, order, subset
from dpo_jax.errors import UserError

SEED = 5
# Group sizes with singletons, a large group and a last window shorter than the others.
LAYOUTS = (((5, 1, 7, 3, 3, 9, 2), 2), ((4,) * 10, 3), ((1,) * 6 + (20,), 4))


def _starts(sizes) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _epoch(the_order, epoch: int) -> list[int]:
  """The source indices of `epoch`, in order (checking each position's epoch)."""
  n = the_order.num_pairs
  pairs = [the_order[epoch * n + i] for i in range(n)]
  assert {e for e, _ in pairs} == {epoch}
  return [index for _, index in pairs]


def _lru_reads(groups, capacity: int) -> int:
  """Reads of a cache of `capacity` groups (the source's: least recently used out) that is
  asked for `groups` in turn."""
  cached, reads = [], 0
  for group in groups:
    if group in cached:
      cached.remove(group)
    else:
      reads += 1
      cached = cached[-(capacity - 1):] if capacity > 1 else []
    cached.append(group)
  return reads


@pytest.mark.parametrize("sizes, window", LAYOUTS)
def test_every_epoch_is_a_permutation_read_one_window_of_groups_at_a_time(sizes, window):
  num_pairs = sum(sizes)
  windowed = order.make_order(num_pairs, SEED, _starts(sizes), window)
  assert isinstance(windowed, order.WindowedOrder)
  group_of = np.repeat(np.arange(len(sizes)), sizes)
  epochs = [_epoch(windowed, epoch) for epoch in range(3)]
  for pairs in epochs:
    assert sorted(pairs) == list(range(num_pairs))
    # A cache of one window's groups reads each group once: the order is local.
    assert _lru_reads(group_of[pairs], window) == len(sizes)
  assert epochs[0] != epochs[1] != epochs[2]  # Reshuffled every epoch.


@pytest.mark.parametrize("sizes, window", LAYOUTS)
def test_a_position_gives_its_pair_whoever_asks_in_whatever_order(sizes, window):
  """A pure function of (seed, position): a fresh order, a pickled one (a grain worker's, a
  resumed run's) and one asked in random order (other hosts, stand-ins) agree."""
  num_pairs, starts = sum(sizes), _starts(sizes)
  positions = np.arange(3 * num_pairs)
  walked = [order.WindowedOrder(starts, num_pairs, SEED, window)[p] for p in positions]
  jumping = pickle.loads(pickle.dumps(order.WindowedOrder(starts, num_pairs, SEED, window)))
  shuffled = np.random.default_rng(0).permutation(positions)
  assert dict(zip(shuffled, (jumping[int(p)] for p in shuffled))) == dict(zip(positions, walked))
  other_seed = order.WindowedOrder(starts, num_pairs, SEED + 1, window)
  assert [other_seed[p] for p in positions] != walked


def test_without_a_window_the_order_is_grains_full_shuffle_as_before():
  """Other sources, data.shuffle_window_groups=0 or None, and data whose groups fit in one
  window keep the full shuffle, position for position."""
  sizes = (4,) * 5
  sampler = grain.IndexSampler(sum(sizes), shard_options=grain.NoSharding(), shuffle=True,
                               seed=SEED, num_epochs=None)
  before = [(p // sum(sizes), sampler[p].record_key) for p in range(3 * sum(sizes))]
  for starts, window in ((None, 4), (_starts(sizes), 0), (_starts(sizes), None),
                         (_starts(sizes), len(sizes))):
    full = order.make_order(sum(sizes), SEED, starts, window)
    assert [full[p] for p in range(3 * sum(sizes))] == before


def _write_pairs(path: str, groups: int, rows: int) -> None:
  """`groups` row groups of `rows` decisive pairs; the image bytes are never decoded here."""
  n = groups * rows
  label_0 = [float(i % 2) for i in range(n)]
  table = pa.table({"caption": [f"pair {i}" for i in range(n)],
                    "jpg_0": [b"winner?" * 8] * n, "jpg_1": [b"loser?" * 8] * n,
                    "label_0": label_0, "label_1": [1 - label for label in label_0]})
  pq.write_table(table, path, row_group_size=rows)


class _AsRead:
  """A prepare step that leaves the record as the source gave it."""

  def map(self, record: dict) -> dict:
    return record


def _host_reads(data: ml_collections.ConfigDict, *, hosts: int, batch_pairs: int,
                epochs: int, max_pairs: int | None = None) -> list[list[int]]:
  """Row groups each host reads from its files in each epoch, through the loader's own
  source (its cache sized by `loader.make_source`), order and host slices."""
  reads = []
  for host in range(hosts):
    source = loader.make_source(data)
    counted = source
    if max_pairs:
      source = subset.RandomSubset(source, max_pairs, SEED)
    the_order = order.make_order(len(source), SEED, source.group_starts,
                                 data.shuffle_window_groups)
    share = parallel.host_slice(batch_pairs, host, hosts)
    pairs = loader._HostPairs(source, the_order, _AsRead(), (), 0, batch_pairs=batch_pairs,
                              host=share)
    per_epoch, element = [], 0
    for epoch in range(epochs):
      before = counted.row_group_reads
      while order.host_position(0, element, batch_pairs=batch_pairs, host=share) < (
          (epoch + 1) * len(source)):
        pairs(element)
        element += 1
      per_epoch.append(counted.row_group_reads - before)
    reads.append(per_epoch)
  return reads


def test_windows_read_each_row_group_once_an_epoch_on_any_host(tmp_path):
  groups, rows, window, batch = 24, 6, 6, 8
  path = str(tmp_path / "train.parquet")
  _write_pairs(path, groups, rows)
  data = ml_collections.ConfigDict({"train_files": path, "shuffle_window_groups": window})
  # One host reads every group once in the first epoch; the second may find a few still
  # cached. More hosts each read their slice of every window: at most each group once.
  assert _host_reads(data, hosts=1, batch_pairs=batch, epochs=2)[0][0] == groups
  for hosts in (1, 2, 4):
    for per_epoch in _host_reads(data, hosts=hosts, batch_pairs=batch, epochs=2):
      assert max(per_epoch) <= groups, (hosts, per_epoch)

  # The full shuffle with the same cache (window 0: the default 4 groups) misses it for
  # about 1 - cache/groups of the pairs, several reads per group.
  data.shuffle_window_groups = 0
  full = _host_reads(data, hosts=1, batch_pairs=batch, epochs=2)[0]
  cache = loader._CACHE_ROW_GROUPS
  assert min(full) > 0.5 * groups * rows * (1 - cache / groups) > 2 * groups, full

  # A seeded subset (data.max_train_pairs) keeps a group's pairs together too.
  data.shuffle_window_groups = window
  kept = _host_reads(data, hosts=1, batch_pairs=batch, epochs=2, max_pairs=groups * rows // 3)
  assert max(kept[0]) <= groups


BATCH, GROUP_ROWS, WINDOW = 4, 4, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
  """Real JPEG pairs in the published schema, in 10 row groups of 4 rows."""
  path = tmp_path_factory.mktemp("locality") / "train.parquet"
  tiny_data.write_warm_vs_cool(str(path), pairs=40, seed=0, size=8)
  pq.write_table(pq.read_table(path), path, row_group_size=GROUP_ROWS)
  return str(path)


def _config(files: str, window: int | None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"train_files": files, "resolution": 16, "random_crop": True,
               "random_flip": True, "empty_prompt_prob": 0.5, "workers": 0,
               "shuffle_window_groups": window},
      "train": {"batch_pairs": BATCH, "seed": SEED}})


@functools.cache
def _tokenizers() -> tuple:
  return (tiny_models.make_clip_tokenizer(model_max_length=8),)


def _iterators(config, hosts: int) -> list:
  tokenizers = _tokenizers()
  return [loader.make_train_iterator(config, tokenizers, process_index=host,
                                     process_count=hosts) for host in range(hosts)]


def test_training_batches_follow_the_windows_on_any_host_count_and_resume(shards):
  config = _config(shards, WINDOW)
  pairs = 40
  epochs = 2
  one_host = _global_batches(_iterators(config, 1), epochs * pairs // BATCH)
  ids = np.concatenate([batch["pair_ids"] for batch in one_host])
  np.testing.assert_array_equal(np.concatenate([b["epochs"] for b in one_host]),
                                np.arange(len(ids)) // pairs)
  # The loader walks the windowed order of the source's row groups, epoch after epoch.
  starts = np.arange(0, pairs, GROUP_ROWS)
  expected = order.WindowedOrder(starts, pairs, SEED, WINDOW)
  np.testing.assert_array_equal(ids, [expected[p][1] for p in range(len(ids))])
  for hosts in (2, 4):
    _assert_same(one_host, _global_batches(_iterators(config, hosts), len(one_host)),
                 f"{hosts} hosts")

  # A position saved by 2 hosts after 3 batches resumes on 4 and on 1 where 1 host went on.
  two = _iterators(config, 2)
  _global_batches(two, 3)
  state = two[0].get_state()
  assert "shuffle_window_groups=3" in state["order"]
  for hosts in (4, 1):
    resumed = _iterators(config, hosts)
    for iterator in resumed:
      iterator.set_state(state)
    _assert_same(one_host[3:8], _global_batches(resumed, 5), f"resumed on {hosts} hosts")
  # The full shuffle is another order: its run cannot take this position.
  with pytest.raises(UserError, match="data.shuffle_window_groups=0"):
    _iterators(_config(shards, 0), 1)[0].set_state(state)


@pytest.mark.parametrize("window", [-1, 2.5, True])
def test_a_bad_window_is_a_one_line_error(window):
  config = default_config.get_config()
  config.data.train_files = "train-*.parquet"
  with config.unlocked():
    del config.data.shuffle_window_groups
    config.data.shuffle_window_groups = window
  with pytest.raises(UserError) as error:
    config_checks.check_config(config)
  assert "data.shuffle_window_groups" in str(error.value) and "\n" not in str(error.value)
  for fine in (0, None, 8):
    with config.unlocked():
      del config.data.shuffle_window_groups
      config.data.shuffle_window_groups = fine
    config_checks.check_config(config)
