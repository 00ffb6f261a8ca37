"""The latent cache: prepare once, then train from it exactly as from the raw images."""
import functools
import itertools
import json
import os
import shutil

import grain.python as grain
import jax
import numpy as np
import pytest
import safetensors.numpy

import subprocesses
import tiny_config
import tiny_data
import tiny_models
from dpo_jax import encode as encode_lib, parallel, prepare as prepare_lib, train
from dpo_jax.data import caption_merge, latent_cache, loader
from dpo_jax.errors import UserError
from dpo_jax.train_step import make_pair_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "tiny_config.py")
PAIRS = 12
# Pair i's caption is CAPTIONS[i]: each of 3 prompts judged 4 times, as Pick-a-Pic judges a
# prompt many times, so the caption tables hold fewer entries than there are pairs. The two
# hosts' shares (pairs 0-5, 6-11) meet the prompts in different orders, so an entry read
# from the wrong host's table is seen.
PROMPTS = ("a red cat", "photo of a dog", "blue tree")
CAPTIONS = tuple(PROMPTS[i] for i in (0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 2, 1))
# Bounds on ArrayRecord's framing around records under 64 KiB (group_size:1, uncompressed):
# per record, a riegeli chunk header (40 B), its sizes and at most one 24 B block header;
# per file, the data padded to a 64 KiB block and the index footer in a block of its own.
FRAMING_PER_RECORD, FRAMING_PER_FILE = 128, 2 * 65536


def _write_files(kind: str, folder):
  tiny_models.make_pipeline(kind, small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=PAIRS, seed=0, size=44,
                               captions=CAPTIONS)
  return folder


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def kind_and_files(request, tmp_path_factory):
  return request.param, _write_files(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
  return _write_files("sd", tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_cache(sd_files, tmp_path_factory):
  """The sd data's cache, written by two hosts, each its contiguous share (float16)."""
  output = str(tmp_path_factory.mktemp("sd_cache") / "cache")
  for host in (1, 0):
    prepare_lib.prepare(_config(sd_files), output, batch_pairs=4, process_index=host,
                        process_count=2)
  return output


def _config(folder, **data):
  config = tiny_config.get_config()
  config.model.pretrained = str(folder / "pipeline")
  config.data.train_files = str(folder / "train.parquet")
  # Random crops and flips, dropout and real SDXL time ids: all must survive the cache.
  config.data.update(dict(random_crop=True, random_flip=True, empty_prompt_prob=0.5,
                          sdxl_time_ids="actual") | data)
  config.train.batch_pairs = 4
  # The recipes' dtypes: the UNet in bfloat16; the encoders in model.vae_dtype and
  # model.text_encoder_dtype (float32) both in the step and in prepare.
  config.model.compute_dtype = config.model.reference_dtype = "bfloat16"
  return config


@pytest.mark.slow  # Compiles the train step twice per kind (a minute each here).
def test_training_from_the_cache_gives_the_raw_loss_for_the_same_noise(kind_and_files, tmp_path):
  kind, folder = kind_and_files
  config = _config(folder)
  counts = prepare_lib.prepare(config, str(tmp_path / "cache"), batch_pairs=5, dtype="float32")
  assert counts["kept"] == PAIRS
  cached = config.copy_and_resolve_references()
  cached.data.cache_dir = str(tmp_path / "cache")

  models = train.load_models(config)
  raw_batches = train.make_data_iterator(config, models)
  cache_batches = train.make_data_iterator(cached, models)
  pair_loss = jax.jit(make_pair_loss(models.unet, models.schedule, beta=config.dpo.beta,
                                     loss_name="dpo", seed=config.train.seed,
                                     encoders=models.encoders,
                                     compute_dtype=config.model.compute_dtype))
  # One pair per device, as prepare laid its batches out over the 8 devices: the encoders'
  # matmuls then take the same shapes, and give the same float32 numbers, in both.
  mesh = parallel.make_mesh(-1, 1, jax.devices()[:config.train.batch_pairs])
  encode = jax.jit(functools.partial(encode_lib.encoded_batch, models.encoders),
                   in_shardings=(None, parallel.batch_sharding(mesh)))
  # A policy that differs from the reference, so the loss is not ln 2 whatever the inputs
  # (by more than bfloat16's rounding, which would map it back onto the reference).
  policy = jax.tree_util.tree_map(lambda p: p * 1.02, models.initial_params)
  dropped = 0
  for _ in range(PAIRS // config.train.batch_pairs):  # Epoch 0: the cache's crops and flips.
    raw, cache = next(raw_batches), next(cache_batches)
    np.testing.assert_array_equal(raw["pair_ids"], cache["pair_ids"])
    np.testing.assert_array_equal(raw["epochs"], cache["epochs"])
    assert "pixels" not in cache and "input_ids_0" not in cache
    encoded = jax.device_put(encode(models.frozen_params, raw), jax.devices()[0])
    raw_loss, raw_metrics = pair_loss(policy, models.initial_params, encoded)
    cache_loss, cache_metrics = pair_loss(policy, models.initial_params, cache)
    # In the recipe's dtypes: the encoders in float32 in prepare and in the step
    # (model.vae_dtype, model.text_encoder_dtype), with the same per-device batch, give the
    # same numbers; the step is one program whichever source its batch came from; so the
    # bfloat16 UNet computes the same errors, and β/2 = 2500 has nothing to amplify. (A
    # 1e-6 float32 difference in the encodings would flip bfloat16 roundings and move the
    # loss by ~0.1 at this tiny size.)
    for name in ("policy_error_winner", "policy_error_loser", "reference_error_winner",
                 "reference_error_loser"):
      np.testing.assert_array_equal(cache_metrics[name], raw_metrics[name], err_msg=name)
    assert abs(float(raw_loss) - np.log(2)) > 0.01
    np.testing.assert_array_equal(cache_loss, raw_loss)
    empty = latent_cache.LatentCacheSource(cached.data.cache_dir).empty_prompt["context"]
    dropped += sum(np.array_equal(c, empty) for c in cache["context"])
  assert 0 < dropped < PAIRS  # Prompt dropout reached the cache batches too.


def test_hosts_write_contiguous_shares_in_pair_order(sd_files, sd_cache, tmp_path):
  config = _config(sd_files)
  output = sd_cache
  source = latent_cache.LatentCacheSource(output)
  assert [int(source[i]["pair_ids"]) for i in range(len(source))] == list(range(PAIRS))
  record = source[0]
  assert record["latent_mean"].dtype == np.float16 and record["latent_mean"].shape[0] == 2
  assert record["context"].dtype == np.float16 and latent_cache.CAPTION_INDEX not in record
  with open(latent_cache.summary_path(output, 1, 2)) as f:
    assert json.load(f)["pairs"] == PAIRS // 2

  # A restored iterator continues as one never stopped, also from a cache that moved.
  config.data.cache_dir = output
  batches = loader.make_train_iterator(config, (), process_index=0, process_count=1)
  for _ in range(2):
    next(batches)
  state = batches.get_state()
  expected = [next(batches) for _ in range(3)]
  shutil.copytree(output, tmp_path / "moved")
  config.data.cache_dir = str(tmp_path / "moved")
  restored = loader.make_train_iterator(config, (), process_index=0, process_count=1)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(3)]):
    assert want.keys() == got.keys()
    for name in want:
      np.testing.assert_array_equal(want[name], got[name], err_msg=name)
  # A share that never finished is named, not read as a smaller dataset.
  moved = str(tmp_path / "moved")
  os.remove(latent_cache.summary_path(moved, 0, 2))
  with pytest.raises(UserError, match=r"is incomplete \(pairs-00000-of-00002"):
    latent_cache.LatentCacheSource(moved)
  with pytest.raises(UserError, match="already holds a latent cache"):
    prepare_lib.prepare(config, moved, process_index=0, process_count=2)


def _record_bytes(arrays: dict[str, np.ndarray]) -> int:
  """A record's size as the cache stores it: safetensors of arrays of these names, shapes and
  dtypes (their bytes, plus a JSON header that depends on nothing else)."""
  return len(safetensors.numpy.save({k: np.zeros(np.shape(v), np.asarray(v).dtype)
                                     for k, v in arrays.items()}))


def test_pairs_of_one_caption_share_one_entry_of_their_hosts_table(sd_cache):
  metadata = latent_cache.read_metadata(sd_cache)
  source = latent_cache.LatentCacheSource(sd_cache)
  pairs = [source[i] for i in range(len(source))]
  caption = lambda pair: CAPTIONS[int(pair["pair_ids"])]
  # Each host stores each caption of its own share once; the tables are not shared.
  shares = np.split(np.arange(PAIRS), np.cumsum(metadata["shard_pairs"])[:-1])
  entries = [len({CAPTIONS[i] for i in share}) for share in shares]
  assert metadata["shard_captions"] == entries and sum(entries) < PAIRS
  # The join: pairs read the same context exactly when they share a caption, across hosts too.
  for a, b in itertools.combinations(pairs, 2):
    assert np.array_equal(a["context"], b["context"]) == (caption(a) == caption(b))

  # Stored: pairs without their context, and one context per entry, as the formula from the
  # shapes gives to the byte.
  own, text = latent_cache.split_pair(pairs[0])
  pair_bytes = _record_bytes({**own, latent_cache.CAPTION_INDEX: np.int32(0)})
  caption_bytes = _record_bytes(text)
  expected = PAIRS * pair_bytes + sum(entries) * caption_bytes
  files = metadata["shards"] + metadata["caption_tables"]
  records = grain.ArrayRecordDataSource(files)
  stored = sum(len(records[i]) for i in range(len(records)))
  assert stored == expected
  # On disk, those records in ArrayRecord's framing.
  measured = sum(os.path.getsize(f) for f in files)
  framing = FRAMING_PER_RECORD * len(records) + FRAMING_PER_FILE * len(files)
  assert stored < measured <= stored + framing
  # Smaller than format 1's layout (a context in every pair record) by the expected factor:
  # of the pairs' contexts, entries / pairs remain. (Format 1's one safetensors header a pair
  # differs from the two here by tens of bytes: hence the tolerance.)
  per_pair_layout = PAIRS * _record_bytes(pairs[0])
  factor = (pair_bytes + caption_bytes) / (pair_bytes + caption_bytes * sum(entries) / PAIRS)
  assert per_pair_layout / stored == pytest.approx(factor, rel=0.01)


def test_a_cache_of_an_older_format_is_refused_in_one_line(sd_cache, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(sd_cache, old)
  with open(old / latent_cache.METADATA) as f:
    metadata = json.load(f)
  with open(old / latent_cache.METADATA, "w") as f:
    json.dump({**metadata, "format_version": 1}, f)
  with pytest.raises(UserError) as error:
    latent_cache.LatentCacheSource(str(old))
  message = str(error.value)
  assert "\n" not in message
  assert message == latent_cache.format_error(str(old), 1)
  assert "format 1, this dpo_jax reads formats 2 and 3" in message
  assert message.endswith(f"python -m dpo_jax.prepare --output {old} --overwrite")


def _all_pairs(folder) -> list[dict]:
  source = latent_cache.LatentCacheSource(str(folder))
  return [source[i] for i in range(len(source))]


def _assert_same_pairs(expected: list[dict], actual: list[dict]) -> None:
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for name in want:
      assert want[name].dtype == got[name].dtype, name
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_merged_caption_table_stores_each_caption_once_and_every_pair_reads_the_same(
    sd_cache, tmp_path):
  folder = tmp_path / "cache"
  shutil.copytree(sd_cache, folder)
  before = _all_pairs(folder)
  old_repr = repr(latent_cache.LatentCacheSource(str(folder)))

  report = caption_merge.merge_caption_tables(str(folder))
  # Host 0's share (pairs 0-5) meets the prompts in the order 0, 1, 2 and host 1's (6-11) in
  # the order 2, 1, 0: their 3 + 3 entries map to the merged table's 3 as below.
  assert (report["host_entries"], report["merged_entries"]) == (6, len(PROMPTS))
  np.testing.assert_array_equal(np.load(folder / latent_cache.CAPTION_ENTRIES),
                                [0, 1, 2, 2, 1, 0])
  assert report["removed_tables"] == 2 and not report["already_merged"]
  assert sorted(os.listdir(folder)) == [
      "cache.json", "caption_entries.npy", "captions-merged.array_record",
      "empty_prompt.safetensors", "pairs-00000-of-00002.array_record",
      "pairs-00000-of-00002.json", "pairs-00001-of-00002.array_record",
      "pairs-00001-of-00002.json"]
  assert latent_cache.read_metadata(str(folder))["format_version"] == 3
  _assert_same_pairs(before, _all_pairs(folder))
  # One entry per distinct caption, as a one-host cache would hold: the merged table's
  # records are the entries' bytes, nothing more.
  merged = grain.ArrayRecordDataSource([str(folder / latent_cache.MERGED_CAPTIONS)])
  assert len(merged) == len(PROMPTS)
  assert {len(merged[i]) for i in range(len(merged))} == {
      _record_bytes(latent_cache.split_pair(before[0])[1])}
  assert report["bytes_after"] < report["bytes_before"]
  # The same source as far as a saved data position is concerned: a run resumes across it.
  assert repr(latent_cache.LatentCacheSource(str(folder))) == old_repr
  again = caption_merge.merge_caption_tables(str(folder))
  assert again["already_merged"] and again["removed_tables"] == 0


def test_an_interrupted_merge_leaves_a_cache_that_reads_the_same_and_a_rerun_finishes(
    sd_cache, tmp_path, monkeypatch):
  expected = _all_pairs(sd_cache)
  write_durably = caption_merge._write_durably

  def killed_at_the_switch(path, write):
    if path.endswith(latent_cache.METADATA):
      raise KeyboardInterrupt
    write_durably(path, write)

  def killed_after_the_switch(folder, count):
    raise KeyboardInterrupt

  for interruption, fixed_up in ((("_write_durably", killed_at_the_switch), False),
                                 (("_remove_host_tables", killed_after_the_switch), True)):
    folder = tmp_path / interruption[0]
    shutil.copytree(sd_cache, folder)
    with monkeypatch.context() as patch:
      patch.setattr(caption_merge, *interruption)
      with pytest.raises(KeyboardInterrupt):
        caption_merge.merge_caption_tables(str(folder))
    # Before the switch: format 2 and the hosts' tables; after it: format 3 with the hosts'
    # tables still there. Either reads every pair as before.
    assert latent_cache.read_metadata(str(folder))["format_version"] == (3 if fixed_up else 2)
    assert os.path.exists(latent_cache.captions_path(str(folder), 0, 2))
    _assert_same_pairs(expected, _all_pairs(folder))
    report = caption_merge.merge_caption_tables(str(folder))
    assert report["already_merged"] == fixed_up and report["removed_tables"] == 2
    assert not os.path.exists(latent_cache.captions_path(str(folder), 0, 2))
    _assert_same_pairs(expected, _all_pairs(folder))


def test_a_prepare_over_a_merged_cache_drops_the_merged_table(sd_cache, tmp_path):
  """prepare --overwrite writes the metadata of a new format 2 cache, whose hosts' tables
  replace the old: the old merge must not linger beside them."""
  folder = tmp_path / "cache"
  shutil.copytree(sd_cache, folder)
  caption_merge.merge_caption_tables(str(folder))
  with open(folder / latent_cache.METADATA) as f:
    metadata = {k: v for k, v in json.load(f).items() if k != "format_version"}
  empty = safetensors.numpy.load_file(str(folder / latent_cache.EMPTY_PROMPT))
  latent_cache.write_metadata(str(folder), metadata, empty)
  assert not (folder / latent_cache.MERGED_CAPTIONS).exists()
  assert not (folder / latent_cache.CAPTION_ENTRIES).exists()


_run = subprocesses.run_module


@pytest.mark.slow
def test_cli_prepare_then_train_from_the_cache(sd_files, tmp_path):
  folder = sd_files
  pipeline = f"--config.model.pretrained={folder / 'pipeline'}"
  cache = tmp_path / "cache"
  result = _run("dpo_jax.prepare", f"--config={TINY_CONFIG}", f"--output={cache}", pipeline,
                f"--config.data.train_files={folder / 'train.parquet'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {PAIRS} pairs" in result.stdout

  result = _run("dpo_jax.main", f"--config={TINY_CONFIG}", f"--workdir={tmp_path / 'run'}",
                pipeline, f"--config.data.cache_dir={cache}", "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["loss"])
  assert records[-1]["data_pairs_kept"] == 4

  wrong = _run("dpo_jax.main", f"--config={TINY_CONFIG}", f"--workdir={tmp_path / 'wrong'}",
               pipeline, f"--config.data.cache_dir={cache}", "--config.data.resolution=64")
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines()[-1].startswith(
      f"error: data.cache_dir={cache} holds 32px pairs, data.resolution is 64")


@pytest.mark.slow
def test_two_processes_prepare_one_cache_each_its_share_then_one_table_for_all(sd_files, tmp_path):
  result = subprocesses.run(
      ["bash", "launch/local_multiprocess.sh", "2", TINY_CONFIG, str(tmp_path / "cache"),
       f"--config.model.pretrained={sd_files / 'pipeline'}",
       f"--config.data.train_files={sd_files / 'train.parquet'}"],
      timeout=300, MODULE="dpo_jax.prepare")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "cache")) == [
      "cache.json", "captions-00000-of-00002.array_record",
      "captions-00001-of-00002.array_record", "empty_prompt.safetensors",
      "pairs-00000-of-00002.array_record", "pairs-00000-of-00002.json",
      "pairs-00001-of-00002.array_record", "pairs-00001-of-00002.json"]
  assert result.stdout.count(
      f"python -m dpo_jax.tools.merge_captions --cache_dir {tmp_path / 'cache'}") == 1
  before = _all_pairs(tmp_path / "cache")
  assert [int(pair["pair_ids"]) for pair in before] == list(range(PAIRS))

  # Then one table for the whole cache, through the command a user runs.
  result = _run("dpo_jax.tools.merge_captions", f"--cache_dir={tmp_path / 'cache'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "6 caption entries in the hosts' tables" in result.stdout
  assert "merged into 3" in result.stdout
  assert not (tmp_path / "cache" / "captions-00000-of-00002.array_record").exists()
  _assert_same_pairs(before, _all_pairs(tmp_path / "cache"))
  missing = _run("dpo_jax.tools.merge_captions", f"--cache_dir={tmp_path / 'nothing'}")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f"error: data.cache_dir={tmp_path / 'nothing'} holds no cache.json; write a cache there "
      "first with python -m dpo_jax.prepare --output DIR"]
