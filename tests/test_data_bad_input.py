"""Odd and bad input in Pick-a-Pic parquet: converted or skipped, and counted exactly."""
import io
import json

import grain.python as grain
import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tiny_config
import tiny_models
from dpo_jax import train
from dpo_jax.checkpoint import Checkpointer
from dpo_jax.data import loader, pickapic, skips, transforms
from dpo_jax.errors import UserError

RESOLUTION = 16
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (24, 24, 3), np.uint8)  # Every good image: the same content.


def _encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def _rgb_jpeg(pixels=PIXELS) -> bytes:
  return _encode(Image.fromarray(pixels), "JPEG")


def _odd_images() -> dict[str, bytes]:
  """Images in every mode PIL converts, and the ones no run should train on."""
  rgba = np.concatenate([PIXELS, RNG.integers(0, 256, (24, 24, 1), np.uint8)], -1)
  long_strip = np.zeros((4, 24 * transforms.MAX_ASPECT_RATIO + 8, 3), np.uint8) + 128
  truncated = _rgb_jpeg()
  return {
      "rgb": _rgb_jpeg(),
      "cmyk": _encode(Image.fromarray(PIXELS).convert("CMYK"), "JPEG"),
      "rgba": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
      "grey": _encode(Image.fromarray(PIXELS[..., 0], "L"), "JPEG"),
      "palette": _encode(Image.fromarray(PIXELS).convert("P"), "PNG"),
      "one_pixel": _rgb_jpeg(PIXELS[:1, :1]),
      "long_strip": _encode(Image.fromarray(long_strip), "PNG"),
      "empty": b"",
      "truncated": truncated[:len(truncated) // 2],
      "not_an_image": b"GIF89a but nothing after",
  }


# (jpg_0, jpg_1, label_0, label_1, caption, has_label) per row, and what becomes of it.
ROWS = (
    ("rgb", "rgb", 1.0, 0.0, "plain", True, "kept"),
    ("cmyk", "rgb", 0.0, 1.0, "cmyk", True, "kept"),
    ("rgb", "rgba", 1.0, 0.0, "rgba", True, "kept"),
    ("grey", "palette", 0.0, 1.0, "grey and palette", True, "kept"),
    ("one_pixel", "rgb", 1.0, 0.0, "tiny", True, "image"),
    ("rgb", "long_strip", 1.0, 0.0, "strip", True, "image"),
    ("empty", "rgb", 0.0, 1.0, "empty file", True, "image"),
    ("rgb", "truncated", 1.0, 0.0, "truncated", True, "image"),
    ("not_an_image", "rgb", 1.0, 0.0, "garbage", True, "image"),
    ("rgb", "rgb", 1.0, 0.0, None, True, "caption"),
    ("rgb", "rgb", 0.5, 0.5, "tie", True, "tie"),
    ("rgb", "rgb", None, None, "null label", True, "label"),
    ("rgb", "rgb", 1.0, 1.0, "both won", True, "label"),
    ("rgb", "rgb", 1.0, 0.0, "never judged", False, "unlabeled"),
    ("rgb", "cmyk", 1.0, 0.0, "cmyk loses", True, "kept"),
)
# Rows the source indexes (pair ids in row order): what the transforms decide about.
INDEXED = [row for row in ROWS if row[-1] not in ("tie", "label", "unlabeled")]


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory):
  images = _odd_images()
  columns = {name: [] for name in ("caption", "jpg_0", "jpg_1", "label_0", "label_1",
                                   "has_label")}
  for jpg_0, jpg_1, label_0, label_1, caption, has_label, _ in ROWS:
    for name, value in (("caption", caption), ("jpg_0", images[jpg_0]),
                        ("jpg_1", images[jpg_1]), ("label_0", label_0), ("label_1", label_1),
                        ("has_label", has_label)):
      columns[name].append(value)
  path = tmp_path_factory.mktemp("odd") / "train-00000.parquet"
  pq.write_table(pa.table(columns), path, row_group_size=4)
  return str(path), images


def _config(files: str, **data) -> ml_collections.ConfigDict:
  data = dict(train_files=files, resolution=RESOLUTION, random_crop=False, random_flip=False,
              empty_prompt_prob=0.0, workers=0, max_bad_fraction=1.0) | data
  return ml_collections.ConfigDict({"data": data, "train": {"batch_pairs": 1, "seed": 0}})


def test_indexing_counts_ties_unlabeled_and_bad_labels(odd_file):
  source = pickapic.PickapicSource(odd_file[0])
  assert len(source) == len(INDEXED)
  assert source.skipped_at_start == {"label": 2, "unlabeled": 1, "tie": 1, "filtered": 0}


def _epoch_orders(epochs: int) -> list[int]:
  """The indexed rows in the order a run reads them, epoch after epoch (grain's shuffle)."""
  sampler = grain.IndexSampler(len(INDEXED), shard_options=grain.NoSharding(), shuffle=True,
                               seed=0, num_epochs=None)
  return [sampler[position].record_key for position in range(epochs * len(INDEXED))]


def _expected(batches_read: int) -> tuple[dict[str, int], list[int]]:
  """What `PairBatches.counts` must hold after `batches_read` single-pair batches (each
  position's own pair by its fate), and the pairs the rows hold: a position's own pair, or
  where that is unusable, the next usable pair of its epoch's order."""
  fates = [row[-1] for row in INDEXED]
  rows = _epoch_orders(batches_read // len(INDEXED) + 1)
  counts, pairs = skips.zero_counts(), []
  for position in range(batches_read):
    counts[fates[rows[position]]] += 1
    epoch_start = position - position % len(INDEXED)
    epoch = rows[epoch_start:epoch_start + len(INDEXED)]
    after = [epoch[(position - epoch_start + step) % len(epoch)] for step in range(len(epoch))]
    pairs.append(next(pair for pair in after if fates[pair] == "kept"))
  return counts, pairs


def test_every_record_is_kept_or_skipped_and_counted_exactly(odd_file):
  tokenizers = [tiny_models.make_clip_tokenizer(model_max_length=8)]
  batches = loader.make_train_iterator(_config(odd_file[0]), tokenizers, process_index=0,
                                       process_count=1)
  seen = []
  for read in range(1, 2 * len(INDEXED) + 1):  # Two epochs, so the order is shuffled anew.
    seen.append(int(next(batches)["pair_ids"][0]))
    assert batches.counts == _expected(read)[0], read
  assert seen == _expected(len(seen))[1]
  assert set(seen[:len(INDEXED)]) == {i for i, row in enumerate(INDEXED) if row[-1] == "kept"}
  assert _epoch_orders(2)[:len(INDEXED)] != _epoch_orders(2)[len(INDEXED):]
  # The bad rows of one epoch, by kind, as the summary says them.
  epoch = skips.zero_counts() | {"kept": 5, "image": 5, "caption": 1}
  assert skips.describe(epoch) == "kept 5, skipped 6 bad (caption 1, image 5)"
  assert batches.counts == skips.add(epoch, epoch)
  assert skips.describe(batches.skipped_at_start) == (
      "skipped 2 bad (label 2), left out 1 tie, 1 unlabeled")
  state = batches.get_state()
  assert state["counts"] == batches.counts  # Saved with the position, for a resumed run.


def _reference(data: bytes) -> np.ndarray:
  """The official code's view of an image: PIL RGB, shorter side to R (square here), [-1, 1]."""
  image = Image.open(io.BytesIO(data)).convert("RGB").resize((RESOLUTION, RESOLUTION),
                                                             Image.BILINEAR)
  return np.asarray(image, np.float32) / 127.5 - 1


@pytest.mark.parametrize("mode", ["cmyk", "rgba", "grey", "palette"])
def test_non_rgb_images_are_converted_as_the_official_code(odd_file, mode):
  images = odd_file[1]
  record = {"caption": "x", "winner": images[mode], "loser": images["rgb"], "pair_ids": 0,
            "epochs": 0}
  out = transforms.prepare_pair(record, seed=0, resolution=RESOLUTION, random_crop=False,
                                random_flip=False, empty_prompt_prob=0.0)
  np.testing.assert_allclose(out["pixels"][0], _reference(images[mode]), atol=1e-6)
  if mode == "grey":
    np.testing.assert_array_equal(out["pixels"][0][..., 0], out["pixels"][0][..., 2])
  if mode == "rgba":  # Alpha is dropped, the colour kept: the PNG is lossless.
    rgb = Image.fromarray(PIXELS).resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    np.testing.assert_allclose(out["pixels"][0], np.asarray(rgb, np.float32) / 127.5 - 1,
                               atol=1e-6)


@pytest.mark.parametrize("name, reason", [
    ("one_pixel", "1x1 is too small for resolution 16"),
    ("long_strip", "200x4 is more elongated than 8:1"), ("empty", "undecodable image"),
    ("truncated", "undecodable image"), ("not_an_image", "undecodable image")])
def test_unusable_images_are_skipped_with_the_reason(odd_file, name, reason):
  record = {"caption": "x", "winner": odd_file[1]["rgb"], "loser": odd_file[1][name],
            "pair_ids": 7, "epochs": 2}
  out = transforms.prepare_pair(record, seed=0, resolution=RESOLUTION, random_crop=False,
                                random_flip=False, empty_prompt_prob=0.0)
  assert out["skip"] == "image" and out["error"].startswith(reason)
  assert (out["pair_ids"], out["epochs"]) == (7, 2)


def test_shared_flip_flips_winner_and_loser_together():
  asymmetric = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
  asymmetric[:, :4] = 255  # A white band on the left: a flip moves it right.
  data = _rgb_jpeg(asymmetric)
  flips = {True: [], False: []}
  for shared in (True, False):
    for pair_id in range(40):
      record = {"caption": "x", "winner": data, "loser": data, "pair_ids": pair_id, "epochs": 0}
      pixels = transforms.prepare_pair(record, seed=0, resolution=RESOLUTION, random_crop=False,
                                       random_flip=True, empty_prompt_prob=0.0,
                                       shared_flip=shared)["pixels"]
      flips[shared].append([p[:, :4].mean() < p[:, -4:].mean() for p in pixels])
  shared, independent = np.array(flips[True]), np.array(flips[False])
  assert np.all(shared[:, 0] == shared[:, 1]) and 10 < shared[:, 0].sum() < 30
  assert np.any(independent[:, 0] != independent[:, 1])
  # The winner's flip is the same draw either way: the option only ties the loser to it.
  np.testing.assert_array_equal(shared[:, 0], independent[:, 0])


def test_too_many_bad_pairs_is_one_line_once_enough_were_read():
  counts = skips.zero_counts() | {"kept": 900, "image": 60, "file": 40, "tie": 500}
  assert skips.bad_fraction(counts) == 0.1
  assert skips.too_many_bad(counts, 0.1, "step 3") is None
  assert skips.too_many_bad(counts, 0.05, "step 3", min_pairs=1001) is None
  message = skips.too_many_bad(counts, 0.05, "step 3")
  assert message.startswith("step 3: 100 of 1000 pairs were bad input (kept 900, skipped 100 "
                            "bad (file 40, image 60), left out 500 tie)")
  assert "--config.data.max_bad_fraction" in message and "\n" not in message


def test_a_dataset_of_mostly_bad_labels_is_refused_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(skips, "MIN_PAIRS_JUDGED", 10)
  labels = [1.0] * 4 + [None] * 8
  table = pa.table({"caption": ["c"] * 12, "jpg_0": [_rgb_jpeg()] * 12,
                    "jpg_1": [_rgb_jpeg()] * 12, "label_0": labels,
                    "label_1": [None if x is None else 1 - x for x in labels]})
  pq.write_table(table, tmp_path / "bad.parquet")
  tokenizers = [tiny_models.make_clip_tokenizer(model_max_length=8)]
  with pytest.raises(UserError, match=r"data.train_files: 8 of 12 pairs were bad input"):
    loader.make_train_iterator(_config(str(tmp_path / "bad.parquet"), max_bad_fraction=0.5),
                               tokenizers, process_index=0, process_count=1)


def test_validation_prompts_are_read_unique_in_order(tmp_path):
  captions = ["a cat", "a dog", None, "a cat", "  ", "a tree"]
  table = pa.table({"caption": captions, "jpg_0": [b""] * 6})
  pq.write_table(table, tmp_path / "validation_unique-00000.parquet")
  assert pickapic.read_captions(str(tmp_path / "validation_unique-*.parquet")) == [
      "a cat", "a dog", "a tree"]
  (tmp_path / "no_caption.parquet").write_bytes(b"")
  with pytest.raises(UserError, match="not a readable parquet"):
    pickapic.read_captions(str(tmp_path / "no_caption.parquet"))


@pytest.mark.slow
def test_a_run_past_max_bad_fraction_stops_saved_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setattr(skips, "MIN_PAIRS_JUDGED", 0)
  tiny_models.make_pipeline("sd", small=True).save_pretrained(tmp_path / "pipeline")
  (tmp_path / "images").mkdir()
  lines = []
  for i in range(8):  # Pairs 2..7 name images that were never written: 3 in 4 are bad.
    for side in ("chosen", "rejected"):
      if i < 2:
        Image.fromarray(PIXELS).save(tmp_path / "images" / f"{i}-{side}.png")
    lines.append(json.dumps({"prompt": f"pair {i}", "chosen": f"images/{i}-chosen.png",
                             "rejected": f"images/{i}-rejected.png"}))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
  config = tiny_config.get_config()
  config.model.pretrained = str(tmp_path / "pipeline")
  config.data.update(dict(format="jsonl", train_files=str(tmp_path / "pairs.jsonl"),
                          max_bad_fraction=0.5))
  config.train.update(dict(steps=3, batch_pairs=2, log_every=1, ckpt_every=100))
  workdir = str(tmp_path / "run")

  with pytest.raises(UserError) as error:
    train.train(config, workdir, jax.devices()[:1])
  message = str(error.value)
  step = int(message.split(":")[0].removeprefix("step "))
  assert "pairs were bad input" in message and f"Step {step} is saved" in message
  assert "\n" not in message
  checkpointer = Checkpointer(workdir, every=100)
  assert checkpointer.all_steps() == [step]
  checkpointer.close()
  last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
  # Each of the 2 × step positions is counted once: its pair kept, or skipped for its file
  # (its row then went to the next usable pair).
  assert last["step"] == step and last["data_pairs_kept"] + last["data_skipped_file"] == 2 * step
  assert last["data_skipped_file"] > last["data_pairs_kept"] and last["data_bad_fraction"] > 0.5

  # Raised past the data's real share, the same command resumes from the saved step, and
  # the counts carry on from the saved ones.
  config.data.max_bad_fraction = 1.0
  train.train(config, workdir, jax.devices()[:1])
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert records[-1]["step"] == 3
  assert records[-1]["data_pairs_kept"] + records[-1]["data_skipped_file"] == 6
  assert records[-1]["data_skipped_file"] >= last["data_skipped_file"]
