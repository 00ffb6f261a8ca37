"""Pick-a-Pic parquet -> grain batches: pairs kept, winner order, augmentation, hosts, resume."""
import concurrent.futures
import glob
import io
import pickle
import threading
import time

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tiny_data
import tiny_models
from dpo_jax.data import loader, pickapic
from dpo_jax.errors import UserError

RESOLUTION = 16
TOKENS = 16
SIZES = ((40, 30), (30, 50))  # (width, height) of jpg_0 and jpg_1.
# (caption, label_0) per row, per shard; label_1 = 1 - label_0 (0.5/0.5 is a tie).
SHARDS = (
    (("a cat", 1.0), ("a photo", 0.0), ("a tie", 0.5), ("cat photo", 1.0),
     ("broken jpeg", 0.0), ("another tie", 0.5)),
    (("photo cat", 0.0), ("cat", 1.0), ("third tie", 0.5), (None, 0.0), ("last", 1.0)),
)
CORRUPT = (0, 4)  # (shard, row) whose jpg_1 is not a JPEG.
KEPT_ROWS = (0, 1, 3, 4, 6, 7, 9, 10)  # Global rows with a winner: pair ids 0..7.
BAD_PAIRS = {3, 6}  # The corrupt JPEG and the null caption.


def _jpeg(width: int, height: int, blue: int) -> bytes:
  """A gradient (so crops and flips show) with a blue level naming the image."""
  x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
  y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
  pixels = np.stack([x, y, np.full_like(x, blue)], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Two shards in the published schema (two rows per row group); returns (glob, rows)."""
  folder = tmp_path_factory.mktemp("pickapic")
  rows = []
  for s, shard in enumerate(SHARDS):
    columns = {name: [] for name in ("caption", "jpg_0", "jpg_1", "label_0", "label_1",
                                     "model_0", "model_1", "has_label", "are_different",
                                     "best_image_uid")}
    for r, (caption, label_0) in enumerate(shard):
      images = [_jpeg(*size, blue=10 * len(rows) + 100 * side) for side, size in
                enumerate(SIZES)]
      if (s, r) == CORRUPT:
        images[1] = b"\xff\xd8 not really a jpeg"
      rows.append({"caption": caption, "jpg_0": images[0], "jpg_1": images[1],
                   "label_0": label_0})
      for name, value in (("caption", caption), ("jpg_0", images[0]), ("jpg_1", images[1]),
                          ("label_0", label_0), ("label_1", 1 - label_0),
                          ("model_0", "sdxl"), ("model_1", "dreamlike"), ("has_label", True),
                          ("are_different", True), ("best_image_uid", f"uid-{s}-{r}")):
        columns[name].append(value)
    pq.write_table(pa.table(columns), folder / f"train-{s:05d}.parquet", row_group_size=2)
  return str(folder / "train-*.parquet"), rows


@pytest.fixture(scope="module")
def tokenizers():
  return [tiny_models.make_clip_tokenizer(model_max_length=TOKENS),
          tiny_models.make_clip_tokenizer(pad_token="!", model_max_length=TOKENS)]


def _config(files: str, batch_pairs: int = 2, seed: int = 0, **data):
  data = dict(train_files=files, resolution=RESOLUTION, random_crop=False, random_flip=False,
              empty_prompt_prob=0.0, workers=0) | data
  return ml_collections.ConfigDict({"data": data,
                                    "train": {"batch_pairs": batch_pairs, "seed": seed}})


def _batches(config, tokenizers, count, process_index=0, process_count=1):
  iterator = loader.make_train_iterator(config, tokenizers, process_index=process_index,
                                        process_count=process_count)
  return [next(iterator) for _ in range(count)]


def _by_pair(batches) -> dict:
  """{(epoch, pair id): that pair's arrays} over a list of batches."""
  pairs = {}
  for batch in batches:
    for i, (epoch, pair) in enumerate(zip(batch["epochs"], batch["pair_ids"])):
      pairs[int(epoch), int(pair)] = {name: value[i] for name, value in batch.items()}
  return pairs


def _reference_pixels(jpeg: bytes) -> np.ndarray:
  """torchvision's Resize(R) (bilinear) + CenterCrop(R) + ToTensor + Normalize(0.5, 0.5)."""
  image = Image.open(io.BytesIO(jpeg)).convert("RGB")
  width, height = image.size
  if width <= height:
    size = (RESOLUTION, int(RESOLUTION * height / width))
  else:
    size = (int(RESOLUTION * width / height), RESOLUTION)
  image = image.resize(size, Image.BILINEAR)
  left, top = round((size[0] - RESOLUTION) / 2), round((size[1] - RESOLUTION) / 2)
  pixels = np.asarray(image.crop((left, top, left + RESOLUTION, top + RESOLUTION)), np.float32)
  return (pixels / 255 - 0.5) / 0.5


def test_only_pairs_with_a_winner_are_kept(shards):
  files, _ = shards
  source = pickapic.PickapicSource(files)
  assert (len(source), source.num_rows, source.num_dropped) == (8, 11, 3)
  listed = ",".join(sorted(glob.glob(files)))
  assert repr(pickapic.PickapicSource(listed)) == repr(source)
  # grain workers get the source pickled: it must arrive without handles and still read.
  assert pickle.loads(pickle.dumps(source))[7]["caption"] == "last"


def test_winner_first_pixel_exact_and_bad_rows_skipped(shards, tokenizers):
  files, rows = shards
  pairs = _by_pair(_batches(_config(files), tokenizers, count=6))
  assert {pair for epoch, pair in pairs if epoch == 0} == set(range(8)) - BAD_PAIRS
  for (_, pair), arrays in pairs.items():
    row = rows[KEPT_ROWS[pair]]
    winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")
    assert arrays["pixels"].shape == (2, RESOLUTION, RESOLUTION, 3)
    assert arrays["pixels"].dtype == np.float32
    np.testing.assert_allclose(arrays["pixels"][0], _reference_pixels(row[winner]), atol=1e-6)
    np.testing.assert_allclose(arrays["pixels"][1], _reference_pixels(row[loser]), atol=1e-6)
    (w_width, w_height), (l_width, l_height) = SIZES[::1 if winner == "jpg_0" else -1]
    np.testing.assert_array_equal(arrays["original_size"],
                                  [[w_height, w_width], [l_height, l_width]])
  batch = _batches(_config(files), tokenizers, count=1)[0]
  assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
  assert {name: (value.shape, value.dtype) for name, value in batch.items()} == {
      "pixels": ((2, 2, RESOLUTION, RESOLUTION, 3), np.float32),
      "input_ids_0": ((2, TOKENS), np.int32), "input_ids_1": ((2, TOKENS), np.int32),
      "original_size": ((2, 2, 2), np.int32), "crop_top_left": ((2, 2, 2), np.int32),
      "pair_ids": ((2,), np.int32), "epochs": ((2,), np.int32)}


def test_prompt_dropout_rate_one_decision_per_pair(shards, tokenizers):
  files, _ = shards
  batches = _batches(_config(files, batch_pairs=6, empty_prompt_prob=0.2), tokenizers, 60)
  empty = [t("", padding="max_length", max_length=TOKENS)["input_ids"] for t in tokenizers]
  dropped = [np.all(np.concatenate([b[f"input_ids_{i}"] for b in batches]) == empty[i], axis=1)
             for i in range(2)]
  np.testing.assert_array_equal(dropped[0], dropped[1])
  assert abs(dropped[0].mean() - 0.2) < 0.07, dropped[0].mean()


def test_augmentation_depends_on_pair_not_batch_or_hosts(shards, tokenizers):
  files, _ = shards
  options = dict(random_crop=True, random_flip=True, empty_prompt_prob=0.2)
  by_two = _by_pair(_batches(_config(files, batch_pairs=2, **options), tokenizers, 12))
  by_three = _by_pair(_batches(_config(files, batch_pairs=3, **options), tokenizers, 8))
  host_0 = _by_pair(_batches(_config(files, batch_pairs=2, **options), tokenizers, 9,
                             process_index=0, process_count=2))
  for other in (by_three, host_0):
    common = by_two.keys() & other.keys()
    assert len(common) >= 6
    for key in common:
      for name in by_two[key]:
        np.testing.assert_array_equal(by_two[key][name], other[key][name], err_msg=name)
  # The augmentation is random: epochs see different crops or flips of the same pair.
  assert any(not np.array_equal(by_two[0, pair]["pixels"], by_two[1, pair]["pixels"])
             for pair in set(range(8)) - BAD_PAIRS)
  crops = np.stack([arrays["crop_top_left"] for arrays in by_two.values()])
  assert crops.min() >= 0 and crops.max() <= 26 - RESOLUTION and len(np.unique(crops)) > 2


def test_restored_iterator_continues_the_sequence(shards, tokenizers):
  files, _ = shards
  config = _config(files, random_crop=True, random_flip=True, empty_prompt_prob=0.2)
  iterator = loader.make_train_iterator(config, tokenizers, process_index=0, process_count=1)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  restored = loader.make_train_iterator(config, tokenizers, process_index=0, process_count=1)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    for name in want:
      np.testing.assert_array_equal(want[name], got[name], err_msg=name)
  other_seed = loader.make_train_iterator(_config(files, seed=1), tokenizers, process_index=0,
                                          process_count=1)
  with pytest.raises(UserError, match="train.seed"):
    other_seed.set_state(state)


@pytest.mark.parametrize("name, needle", [("missing.parquet", "missing.parquet is not a file"),
                                          ("notes.txt", "not a readable parquet"),
                                          ("nothing-*.parquet", "nothing-*.parquet")])
def test_bad_files_are_one_line_user_errors(tmp_path, name, needle):
  (tmp_path / "notes.txt").write_text("not parquet")
  with pytest.raises(UserError) as error:
    pickapic.PickapicSource(str(tmp_path / name))
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_model_filter_keeps_pairs_whose_two_models_match(tmp_path):
  # One row in four has both models from the filter (any substring, any case), as the
  # paper's Dreamlike-only subset; the others have one or none.
  models = (("dreamlike-art/dreamlike-photoreal-2.0", "Dreamlike-Diffusion-1.0"),
            ("dreamlike-photoreal", "stabilityai/sdxl"), ("sdxl", "dreamlike"), ("sdxl", "sd2"))
  path = str(tmp_path / "train.parquet")
  tiny_data.write_warm_vs_cool(path, pairs=40, seed=0, size=8, models=models)
  assert len(pickapic.PickapicSource(path)) == 40
  dreamlike = pickapic.PickapicSource(path, model_filter="dreamlike")
  assert (len(dreamlike), dreamlike.num_dropped) == (10, 30)
  assert len(pickapic.PickapicSource(path, model_filter=" DREAMLIKE, sdxl ")) == 30
  assert repr(dreamlike) != repr(pickapic.PickapicSource(path))  # A resume must not mix them.
  with pytest.raises(UserError, match="data.model_filter='midjourney' keeps no pair"):
    pickapic.PickapicSource(path, model_filter="midjourney")


def test_threads_wanting_one_row_group_share_one_read(shards, monkeypatch):
  reads, release = [], threading.Event()
  real_read = pq.ParquetFile.read_row_group

  def slow_read(self, *args, **kwargs):
    reads.append(args[0])
    release.wait(timeout=10)  # Every thread asks while the first read is still in flight.
    return real_read(self, *args, **kwargs)

  monkeypatch.setattr(pq.ParquetFile, "read_row_group", slow_read)
  source = pickapic.PickapicSource(shards[0])
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    # Pair ids 0 and 1 are rows 0 and 1: the first row group of the first shard.
    futures = [pool.submit(source.__getitem__, i % 2) for i in range(8)]
    time.sleep(0.2)
    release.set()
    captions = [future.result()["caption"] for future in futures]
  assert reads == [0]
  assert captions == ["a cat", "a photo"] * 4


def test_max_train_pairs_trains_on_a_seeded_subset_with_its_own_pair_ids(shards, tokenizers):
  """The official --max_train_samples: a random subset drawn from the seed, each pair keeping
  its id (so its noise), every epoch the same subset."""
  files, _ = shards
  full = len(pickapic.PickapicSource(files))
  subset_ids = []
  for seed in (0, 0, 1):
    config = _config(files, seed=seed, max_train_pairs=3)
    # 12 rows: four epochs of three (a pair with a corrupt image, if the subset drew it,
    # gives its row to the next pair of its epoch).
    seen = _by_pair(_batches(config, tokenizers, count=6))
    ids = {pair for _, pair in seen}
    assert len(ids) in (2, 3) and ids <= set(range(full))
    assert {epoch for epoch, _ in seen} == set(range(4))
    subset_ids.append(ids)
  assert subset_ids[0] == subset_ids[1] != subset_ids[2]


def test_a_pickapic_folder_reads_the_shards_of_data_split(tmp_path):
  """The hub snapshot's layout: data/{split}-NNNNN-of-NNNNN.parquet."""
  data = tmp_path / "pickapic_v2" / "data"
  data.mkdir(parents=True)
  for split, pairs in (("train", 5), ("validation", 3), ("validation_unique", 2)):
    tiny_data.write_warm_vs_cool(str(data / f"{split}-00000-of-00001.parquet"), pairs=pairs,
                                 seed=pairs)
  sizes = {split: len(loader.make_source(ml_collections.ConfigDict(
      {"format": "pickapic", "train_files": str(tmp_path / "pickapic_v2"), "split": split})))
      for split in ("train", "validation", "validation_unique")}
  assert sizes == {"train": 5, "validation": 3, "validation_unique": 2}
  with pytest.raises(UserError, match="test-"):
    loader.make_source(ml_collections.ConfigDict(
        {"format": "pickapic", "train_files": str(tmp_path / "pickapic_v2"), "split": "test"}))
