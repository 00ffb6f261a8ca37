"""TFDS array_record pairs -> records: winner order, lazy skips, filter, repr, pickle, errors.

The dataset is built here, TensorFlow-free: a GeneratorBasedBuilder written to array_record
serializes with tfds's own tf.train.Example protos, and reading goes through tfds.data_source.
"""
import builtins
import contextlib
import importlib
import io
import math
import pickle
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tiny_data
import tiny_models
from dpo_jax.data import loader, tfds_pairs
from dpo_jax.errors import UserError

SIZE = 24
NAME = "tiny_pairs"
# (caption, label_0, label_1, has_label, model_0, model_1) per record.
ROWS = (
    ("a cat", 1.0, 0.0, True, "sdxl", "sdxl"),
    ("a dog", 0.0, 1.0, True, "sdxl", "dreamlike"),
    ("a tie", 0.5, 0.5, True, "sdxl", "sdxl"),
    ("a nan label", math.nan, math.nan, True, "sdxl", "sdxl"),
    (b"\xff\xfe not utf-8", 0.0, 1.0, True, "sdxl", "sdxl"),
    ("no label", None, None, True, "sdxl", "sdxl"),
    ("red tree", 1.0, 0.0, True, "dreamlike", "SDXL-turbo"),
    ("both won", 1.0, 1.0, True, "sdxl", "sdxl"),
    ("unlabeled", 1.0, 0.0, False, "sdxl", "sdxl"),
)
DECISIVE = (0, 1, 4, 6)
# What each record is without a filter: None for a pair, else its `skips` kind.
SKIPS = [None, None, "tie", "label", None, "label", None, "label", "unlabeled"]


@contextlib.contextmanager
def _without_tensorflow():
  """Fails if the block imports TensorFlow, installed or not (tfds swallows failed imports).

  Spies on the two ways to import, not on finders: etils merely probes with find_spec.
  """
  attempts = []

  def spy(real):
    def importer(name, *args, **kwargs):
      if name == "tensorflow" or name.startswith("tensorflow."):
        attempts.append(name)
      return real(name, *args, **kwargs)
    return importer

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(builtins, "__import__", spy(builtins.__import__))
    patch.setattr(importlib, "import_module", spy(importlib.import_module))
    yield
  assert not attempts, f"TensorFlow imported: {attempts}"
  assert "tensorflow" not in sys.modules


def _build(data_dir: str, rows: tuple, images: list, drop: tuple[str, ...] = ()) -> None:
  """Writes `rows` as the TFDS dataset NAME, version 1.0.0, in array_record under data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  label = tfds.features.Scalar(np.float32, optional=True)  # Optional: a row may have none.
  features = {
      "caption": tfds.features.Text(),
      # The two accepted image types: tfds's Image and raw bytes.
      "jpg_0": tfds.features.Image(encoding_format="jpeg"),
      "jpg_1": tfds.features.Tensor(shape=(), dtype=np.object_),
      "label_0": label, "label_1": label, "has_label": tfds.features.Scalar(np.bool_),
      "model_0": tfds.features.Text(), "model_1": tfds.features.Text(),
  }
  features = {k: v for k, v in features.items() if k not in drop}

  # skip_registration: the reader must find the data by name and folder alone, as a user's.
  class TinyPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      # disable_shuffling keeps record i = row i.
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (caption, label_0, label_1, has_label, model_0, model_1) in enumerate(rows):
        example = {"caption": caption, "jpg_0": images[i][0], "jpg_1": images[i][1],
                   "label_0": label_0, "label_1": label_1, "has_label": has_label,
                   "model_0": model_0, "model_1": model_1}
        yield i, {k: v for k, v in example.items() if k in features}

  assert TinyPairs.name == NAME
  builder = TinyPairs(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """(data_dir, [(jpg_0, jpg_1) JPEG bytes per row]) of ROWS, built without TensorFlow."""
  rng = np.random.default_rng(0)
  images = [(tiny_data.jpeg(tiny_data.textured(rng, SIZE, True)),
             tiny_data.jpeg(tiny_data.textured(rng, SIZE, False))) for _ in ROWS]
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with _without_tensorflow():
    _build(data_dir, ROWS, images)
  return data_dir, images


def _pixels(jpeg: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_records_put_the_winner_first(dataset):
  data_dir, images = dataset
  with _without_tensorflow():
    source = tfds_pairs.TfdsPairsSource(NAME, data_dir=data_dir)
    records = [source[i] for i in range(len(source))]
  for i in DECISIVE:
    record = records[i]
    caption, label_0 = ROWS[i][:2]
    winner, loser = images[i] if label_0 == 1 else images[i][::-1]
    assert set(record) == {"caption", "winner", "loser", "pair_ids"}, i
    assert record["pair_ids"] == i and isinstance(record["pair_ids"], int)
    # Encoded bytes, untouched by tfds, so PIL sees exactly the images written.
    assert record["winner"] == winner and record["loser"] == loser, i
    np.testing.assert_array_equal(_pixels(record["winner"]), _pixels(winner))
    np.testing.assert_array_equal(_pixels(record["loser"]), _pixels(loser))
    assert _pixels(record["winner"]).shape == (SIZE, SIZE, 3)
    # Bad UTF-8 -> None, which the transforms skip.
    assert record["caption"] == (caption if isinstance(caption, str) else None), i


def test_ties_and_bad_labels_are_skipped_on_read(dataset):
  source = tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0])
  assert [source[i].get("skip") for i in range(len(source))] == SKIPS
  assert source[2] == {"skip": "tie", "pair_ids": 2}
  for i in (3, 5):  # NaN, and no value at all.
    assert source[i] == {"skip": "label", "error": "no label", "pair_ids": i}
  assert source[7] == {"skip": "label", "error": "contradictory labels (1, 1)", "pair_ids": 7}
  # has_label = False wins over the labels, as in the parquet source.
  assert source[8] == {"skip": "unlabeled", "pair_ids": 8}


def test_training_batches_and_skip_counts(dataset):
  config = ml_collections.ConfigDict({
      "data": {"format": "tfds", "tfds_name": NAME, "tfds_split": "train",
               "tfds_data_dir": dataset[0], "resolution": 16, "random_crop": False,
               "random_flip": False, "empty_prompt_prob": 0.0, "workers": 0},
      "train": {"batch_pairs": 3, "seed": 0}})
  tokenizers = [tiny_models.make_clip_tokenizer(model_max_length=8)]
  with _without_tensorflow():
    batches = loader.make_train_iterator(config, tokenizers, process_index=0, process_count=1)
    pair_ids = [int(i) for _ in range(3) for i in next(batches)["pair_ids"]]
  # One epoch of 9 records: 3 pairs kept (row 4's caption is not UTF-8), 1 tie, 1 unlabeled,
  # 4 bad; the row of a record left out goes to the next usable pair of the epoch.
  assert set(pair_ids) == {0, 1, 6}
  assert {kind: n for kind, n in batches.counts.items() if n} == {
      "kept": 3, "tie": 1, "unlabeled": 1, "label": 3, "caption": 1}


def test_model_filter_skips_rows_whose_two_models_do_not_both_match(dataset):
  source = tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0], model_filter=" SDXL ,")
  skips = [source[i].get("skip") for i in range(len(source))]
  # Case-insensitive substrings; row 1 (dreamlike) and row 6 (dreamlike + SDXL-turbo) fail.
  # Only pairs with a winner are judged: the others keep their kind.
  assert skips == [None, "filtered", "tie", "label", None, "label", "filtered", "label",
                   "unlabeled"]
  assert source[0]["winner"] == dataset[1][0][0]
  both = tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0], model_filter="sdxl,dreamlike")
  assert [both[i].get("skip") for i in DECISIVE] == [None] * len(DECISIVE)


def test_len_and_repr_name_the_data_not_its_folder(dataset):
  data_dir = dataset[0]
  source = tfds_pairs.TfdsPairsSource(NAME, data_dir=data_dir)
  assert len(source) == len(ROWS)
  assert source.skipped_at_start == {}  # Every skip is found on read.
  expected = "TfdsPairsSource(dataset=tiny_pairs/1.0.0, split='train', records=9)"
  assert repr(source) == expected
  # The same data by version and by folder: one repr, so a moved dataset resumes.
  assert repr(tfds_pairs.TfdsPairsSource(f"{NAME}:1.0.0", data_dir=data_dir)) == expected
  by_folder = tfds_pairs.TfdsPairsSource(f"{data_dir}/{NAME}/1.0.0")
  assert repr(by_folder) == expected and by_folder[1] == source[1]
  assert data_dir not in repr(by_folder)
  # The filter renumbers nothing but changes what ids yield: a resume must tell them apart.
  assert repr(tfds_pairs.TfdsPairsSource(NAME, data_dir=data_dir, model_filter="sdxl")) == (
      "TfdsPairsSource(dataset=tiny_pairs/1.0.0, split='train', records=9, models=sdxl)")
  half = tfds_pairs.TfdsPairsSource(NAME, data_dir=data_dir, split="train[:3]")
  assert len(half) == 3 and "split='train[:3]'" in repr(half)


def test_pickles_without_the_tfds_source_and_reopens(dataset):
  source = tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0], model_filter="sdxl")
  before = [source[i] for i in range(len(source))]
  state = pickle.dumps(source)
  assert b"ArrayRecord" not in state  # The reader is per process, reopened on first use.
  copy = pickle.loads(state)
  assert repr(copy) == repr(source) and len(copy) == len(source)
  with _without_tensorflow():
    assert [copy[i] for i in range(len(copy))] == before


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "no_such_pairs"}, "TFDS dataset 'no_such_pairs' not found in"),
    ({"name": NAME, "split": "test"}, "has no split 'test'"),
    ({"name": "{data_dir}"}, "holds no dataset_info.json"),
])
def test_errors_are_one_line(dataset, kwargs, message):
  kwargs = {k: v.format(data_dir=dataset[0]) for k, v in kwargs.items()}
  with pytest.raises(UserError, match=message) as error:
    tfds_pairs.TfdsPairsSource(data_dir=dataset[0], **kwargs)
  assert "\n" not in str(error.value)


def test_missing_features_and_missing_tfds_are_one_line(dataset, tmp_path, monkeypatch):
  rows, images = ROWS[:2], dataset[1][:2]
  _build(str(tmp_path), rows, images, drop=("jpg_1", "model_0"))
  with pytest.raises(UserError, match="lacks the Pick-a-Pic feature.s. jpg_1;"):
    tfds_pairs.TfdsPairsSource(NAME, data_dir=str(tmp_path))
  _build(str(tmp_path / "v2"), rows, images, drop=("model_0",))
  with pytest.raises(UserError, match="model_0 that data.model_filter reads"):
    tfds_pairs.TfdsPairsSource(NAME, data_dir=str(tmp_path / "v2"), model_filter="sdxl")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(UserError, match=r"pip install 'dpo_jax\[tfds\]'") as error:
    tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0])
  assert "\n" not in str(error.value)


def test_a_dataset_without_random_access_is_one_line(dataset, monkeypatch):
  import tensorflow_datasets as tfds
  # What tfds raises for tfrecord-stored data, which cannot be written here without TF.
  def no_random_access(self, *args, **kwargs):
    raise NotImplementedError("Random access data source for file format tfrecord")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", no_random_access)
  with pytest.raises(UserError, match="which has no random access; rebuild it with "
                                      "file_format='array_record'") as error:
    tfds_pairs.TfdsPairsSource(NAME, data_dir=dataset[0])
  assert "\n" not in str(error.value)
