"""JSONL pairs -> grain batches: paths, malformed lines, missing images, winner order, resume."""
import io
import json
import logging
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

import subprocesses
import tiny_models
from dpo_jax import demo
from dpo_jax.data import jsonl_pairs, loader
from dpo_jax.errors import UserError

RESOLUTION = 16
TOKENS = 16
PROMPTS = ("a red cat", "a green dog", "blue sky", "missing image", "yellow tree")
# Solid colours name the images: pair i's chosen is CHOSEN[i], its rejected REJECTED[i].
CHOSEN = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (255, 255, 0))
REJECTED = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (9, 9, 9), (0, 255, 255))
MISSING_PAIR = 3  # Its chosen image is never written.


def _write_image(path, colour, size):
  # PNG is lossless, so the pixels are exact; JPEG of a solid colour is within a level or two.
  Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  """Two JSONL files (relative and absolute paths, PNG and JPEG, one malformed line)."""
  folder = tmp_path_factory.mktemp("pairs")
  (folder / "images").mkdir()
  lines = []
  for i, prompt in enumerate(PROMPTS):
    chosen, rejected = f"images/{i}-chosen.png", f"images/{i}-rejected.jpg"
    if i != MISSING_PAIR:
      _write_image(folder / chosen, CHOSEN[i], (24, 20))
    _write_image(folder / rejected, REJECTED[i], (20, 30))
    if i % 2:  # Absolute paths are taken as they are.
      chosen, rejected = str(folder / chosen), str(folder / rejected)
    lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
  lines.insert(2, '{"prompt": "no images"}')  # Missing keys: skipped at load.
  lines.insert(4, "not json at all")
  (folder / "a.jsonl").write_text("\n".join(lines[:4]) + "\n")
  (folder / "b.jsonl").write_text("\n".join(lines[4:]) + "\n\n")  # Blank lines are ignored.
  return str(folder / "*.jsonl")


@pytest.fixture(scope="module")
def tokenizers():
  return [tiny_models.make_clip_tokenizer(model_max_length=TOKENS)]


def _config(files, seed=0, **data):
  data = dict(format="jsonl", train_files=files, resolution=RESOLUTION, random_crop=False,
              random_flip=True, empty_prompt_prob=0.0, workers=0) | data
  return ml_collections.ConfigDict({"data": data, "train": {"batch_pairs": 2, "seed": seed}})


def _iterator(config, tokenizers):
  return loader.make_train_iterator(config, tokenizers, process_index=0, process_count=1)


def test_source_skips_malformed_lines_and_resolves_paths(pairs_file, tmp_path):
  source = jsonl_pairs.JsonlPairsSource(pairs_file)
  assert (len(source), source.num_lines, source.num_malformed) == (5, 7, 2)
  record = pickle.loads(pickle.dumps(source))[1]  # grain workers get the source pickled.
  assert record["caption"] == "a green dog" and "error" not in record
  assert Image.open(io.BytesIO(record["winner"])).getpixel((0, 0)) == CHOSEN[1]
  assert "cannot read" in source[MISSING_PAIR]["error"]
  assert "0-chosen.png" not in repr(source)  # Names the data, not where it lives.
  (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n[]\n')
  with pytest.raises(UserError) as error:
    jsonl_pairs.JsonlPairsSource(str(tmp_path / "bad.jsonl"))
  assert "none of the 2 line(s)" in str(error.value) and "\n" not in str(error.value)


def test_malformed_lines_are_named_by_file_and_line(pairs_file, caplog):
  with caplog.at_level(logging.WARNING):  # absl logs through the standard logging module.
    jsonl_pairs.JsonlPairsSource(pairs_file)
  messages = [record.getMessage() for record in caplog.records]
  assert any("a.jsonl:3:" in m and "chosen, rejected" in m for m in messages), messages
  assert any("b.jsonl:1:" in m and "not JSON" in m for m in messages), messages


def test_batches_put_the_chosen_image_first(pairs_file, tokenizers):
  iterator = _iterator(_config(pairs_file), tokenizers)
  batches = [next(iterator) for _ in range(6)]
  seen = set()
  for batch in batches:
    assert batch["pixels"].shape == (2, 2, RESOLUTION, RESOLUTION, 3)
    assert batch["input_ids_0"].shape == (2, TOKENS)
    for pixels, pair, ids in zip(batch["pixels"], batch["pair_ids"], batch["input_ids_0"]):
      seen.add(int(pair))
      # Solid colours survive resize, crop and flip: only the order can be wrong.
      for image, colour, atol in ((pixels[0], CHOSEN[pair], 1e-5),
                                  (pixels[1], REJECTED[pair], 0.05)):
        np.testing.assert_allclose(image, np.broadcast_to(np.float32(colour) / 127.5 - 1,
                                                          image.shape), atol=atol)
      np.testing.assert_array_equal(ids, tokenizers[0](
          PROMPTS[pair], padding="max_length", max_length=TOKENS)["input_ids"])
  assert seen == set(range(5)) - {MISSING_PAIR}  # The missing image skips, not crashes.


def test_restored_iterator_continues_the_sequence(pairs_file, tokenizers):
  config = _config(pairs_file, random_crop=True, empty_prompt_prob=0.5)
  iterator = _iterator(config, tokenizers)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  restored = _iterator(config, tokenizers)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    for name in want:
      np.testing.assert_array_equal(want[name], got[name], err_msg=name)


@pytest.mark.parametrize("files, needle", [("nothing-*.jsonl", "nothing-*.jsonl"),
                                           ("absent.jsonl", "absent.jsonl is not a file")])
def test_bad_files_are_one_line_user_errors(tmp_path, tokenizers, files, needle):
  with pytest.raises(UserError) as error:
    _iterator(_config(str(tmp_path / files)), tokenizers)
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_model_filter_is_refused_for_jsonl(pairs_file, tokenizers):
  with pytest.raises(UserError, match="model_filter"):
    _iterator(_config(pairs_file, model_filter="dreamlike"), tokenizers)


def test_data_with_no_usable_pair_ends_with_one_line(tmp_path, tokenizers):
  """Every image path missing: an epoch without a kept pair stops the iterator with a
  UserError naming the counts and the first bad pair (before, it spun forever)."""
  lines = [json.dumps({"prompt": "p", "chosen": f"gone/{i}a.png", "rejected": f"gone/{i}b.png"})
           for i in range(4)]
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  iterator = _iterator(_config(str(tmp_path / "pairs.jsonl")), tokenizers)
  with pytest.raises(UserError) as raised:
    next(iterator)
  message = str(raised.value)
  assert ("no usable pair in a whole pass over the data (4 pairs read: skipped 4 bad "
          "(file 4))") in message
  assert "the first: pair " in message and "cannot read" in message and "gone/" in message
  assert "\n" not in message


def test_a_pass_with_one_usable_pair_keeps_going(tmp_path, tokenizers):
  """One readable pair among unreadable ones: batches come, epoch after epoch (the limit is
  an epoch without a kept pair, not bad pairs in a row, which cross epochs)."""
  Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "ok.png")
  lines = [json.dumps({"prompt": "p", "chosen": f"gone/{i}a.png", "rejected": f"gone/{i}b.png"})
           for i in range(3)]
  lines.append(json.dumps({"prompt": "p", "chosen": "ok.png", "rejected": "ok.png"}))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  iterator = _iterator(_config(str(tmp_path / "pairs.jsonl"), max_bad_fraction=1.0), tokenizers)
  for _ in range(6):
    assert set(next(iterator)["pair_ids"]) == {3}


@pytest.mark.slow
def test_a_run_on_data_with_no_usable_pair_exits_2_in_one_line(tmp_path):
  """Through the command, with a grain worker process reading: exit 2, one line, seconds."""
  lines = [json.dumps({"prompt": "p", "chosen": f"gone/{i}a.png", "rejected": f"gone/{i}b.png"})
           for i in range(4)]
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  result = subprocesses.run_module(
      "dpo_jax.main", "--config=tests/tiny_config.py", f"--workdir={tmp_path / 'run'}",
      f"--config.model.pretrained={demo.BASE_MODEL}", "--config.data.format=jsonl",
      f"--config.data.train_files={tmp_path / 'pairs.jsonl'}", "--config.data.workers=1",
      timeout=120)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no usable pair in a whole pass" in errors[0], result.stderr[-2000:]


# --- Unpaired likes and dislikes (data.format='unpaired', Diffusion-KTO) ---

# Row i shows LIKED_COLOURS[i]; true/1 liked, false/0 disliked (both spellings accepted).
UNPAIRED = (("a red cat", (255, 0, 0), True), ("a green dog", (0, 255, 0), 0),
            ("blue sky", (0, 0, 255), 1), ("yellow tree", (255, 255, 0), False))


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
  folder = tmp_path_factory.mktemp("unpaired")
  lines = []
  for i, (prompt, colour, label) in enumerate(UNPAIRED):
    _write_image(folder / f"{i}.png", colour, (24, 20))
    lines.append(json.dumps({"prompt": prompt, "image": f"{i}.png", "label": label}))
  # Refused at load, each with its reason: a label that is neither, a pair's line.
  lines.insert(1, json.dumps({"prompt": "p", "image": "0.png", "label": "up"}))
  lines.insert(3, json.dumps({"prompt": "p", "chosen": "0.png", "rejected": "1.png"}))
  (folder / "likes.jsonl").write_text("\n".join(lines) + "\n")
  return str(folder / "likes.jsonl")


def test_unpaired_source_reads_one_image_and_its_label_per_line(unpaired_file, caplog):
  with caplog.at_level(logging.WARNING):
    source = jsonl_pairs.UnpairedJsonlSource(unpaired_file)
  assert (len(source), source.num_malformed) == (4, 2)
  messages = " ".join(record.getMessage() for record in caplog.records)
  assert "label must be true/1 (liked) or false/0 (disliked), got 'up'" in messages
  assert "image missing or not a string" in messages
  for i, (prompt, colour, label) in enumerate(UNPAIRED):
    record = pickle.loads(pickle.dumps(source))[i]
    assert set(record) == {"caption", "image", "desirable", "pair_ids"}
    assert (record["caption"], record["desirable"]) == (prompt, bool(label))
    assert Image.open(io.BytesIO(record["image"])).getpixel((0, 0)) == colour


def test_unpaired_batches_hold_one_image_a_row_and_its_label(unpaired_file, tokenizers):
  iterator = _iterator(_config(unpaired_file, format="unpaired"), tokenizers)
  seen = set()
  for _ in range(4):
    batch = next(iterator)
    assert batch["pixels"].shape == (2, 1, RESOLUTION, RESOLUTION, 3)
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (2, 1, 2)
    assert batch["desirable"].dtype == np.bool_ and batch["desirable"].shape == (2,)
    for pixels, row, liked in zip(batch["pixels"], batch["pair_ids"], batch["desirable"]):
      seen.add(int(row))
      _, colour, label = UNPAIRED[row]
      assert bool(liked) == bool(label)
      np.testing.assert_allclose(pixels[0], np.broadcast_to(np.float32(colour) / 127.5 - 1,
                                                            pixels[0].shape), atol=1e-5)
  assert seen == set(range(len(UNPAIRED)))


def test_unpaired_data_is_refused_for_pair_losses_and_the_latent_cache():
  from dpo_jax import config_checks, default_config
  config = default_config.get_config()
  config.data.format, config.data.train_files = "unpaired", "likes.jsonl"
  config.optim.peak_lr = 1e-6
  with pytest.raises(UserError, match="only dpo.loss='kto' trains on") as error:
    config_checks.check_config(config)
  assert "\n" not in str(error.value)
  config.dpo.loss = "kto"
  config_checks.check_config(config)
  assert config_checks.images_per_example(config) == 1
  config.data.cache_dir = "cache"
  with pytest.raises(UserError, match="unset data.cache_dir"):
    config_checks.check_config(config)
  config.data.cache_dir, config.dpo.reference = None, "precomputed"
  config.dpo.reference_errors = "errors"
  with pytest.raises(UserError, match="leave dpo.reference at 'live'"):
    config_checks.check_config(config)



def test_data_workers_outlive_sigterm_and_a_killed_one_fails_the_next_batch_at_once(
    pairs_file, tokenizers):
  """A scheduler's SIGTERM reaches every process of a job: the data workers (data.workers)
  ignore it and batches keep coming, so that the trainer saves at its step boundary, on
  every host at the same one. A worker killed outright fails the next batch with a
  RuntimeError at once, rather than leaving it waiting forever (`train._next_batch` then
  saves the last step trained)."""
  import multiprocessing
  import os
  import signal
  import time

  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read flags, as under absl's app.run.
  iterator = _iterator(_config(pairs_file, workers=1), tokenizers)
  next(iterator)
  workers = multiprocessing.active_children()
  assert workers
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(1)
  assert all(worker.is_alive() for worker in workers)
  for _ in range(4):
    assert len(next(iterator)["pair_ids"]) > 0
  for worker in workers:
    os.kill(worker.pid, signal.SIGKILL)
  time.sleep(1)
  started = time.monotonic()
  with pytest.raises(RuntimeError, match="terminated unexpectedly"):
    for _ in range(4):
      next(iterator)
  assert time.monotonic() - started < 30
