"""`data.format = 'sampled'`: pairs drawn from the model itself with known seeds, judged by a
scorer into Pick-a-Pic parquet the trainer reads, once per workdir; configs that cannot draw
them are refused naming the key. The model is replaced by a generator whose images are known:
each seed puts the shape at a known distance from the centre, so the winner of every pair is
known before the judge sees it."""
import glob
import importlib.util
import json
import math
import os
import types

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

from dpo_jax import config_checks, default_config, sample, sampled_pairs
from dpo_jax.data import loader, transforms
from dpo_jax.demo import judge as judge_lib, shapes
from dpo_jax.errors import UserError

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "demo.py")
# Seed s draws its shape OFFSETS[s % 8] px right of the canvas centre. An even base seed pairs
# the indices (0, 1), (2, 3), (4, 5), (6, 7): first nearer, second nearer, an exact tie (the
# same image twice), second nearer.
OFFSETS = (0, 5, 3, 1, 2, 2, 6, -4)
HALF_DIAGONAL = math.hypot(16, 16)
PROMPTS = ["a large red circle", "a small blue square", "a large green triangle"]


class FakeGenerator:
  """`sample.make_generator`'s `generate(prompts, seeds) -> uint8 [N, 32, 32, 3]`, in numpy:
  the prompt's shape at (16 + OFFSETS[seed % 8], 16). Records every call."""

  def __init__(self):
    self.calls = []

  def __call__(self, prompts, seeds, **kwargs):
    seeds = [int(s) for s in seeds]
    assert len(prompts) == len(seeds) and not kwargs
    self.calls.append((list(prompts), seeds))
    return np.stack([shapes.draw(p, (16 + OFFSETS[s % 8], 16)) for p, s in zip(prompts, seeds)])


def _expected_label(seed_0: int, seed_1: int) -> float:
  """By hand: the image whose shape is fewer whole pixels from the centre wins (a whole-pixel
  shift moves the judge's centroid by exactly that); the same offset is the same image."""
  d0, d1 = abs(OFFSETS[seed_0 % 8]), abs(OFFSETS[seed_1 % 8])
  return 0.5 if d0 == d1 else float(d0 < d1)


def _rows(folder: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(folder, "part-*.parquet")))
  assert paths, folder
  return [row for path in paths for row in pq.read_table(path).to_pylist()]


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(transforms.decode_image(data))


def test_draw_pairs_labels_every_pair_by_the_judge(tmp_path):
  """Each pair's two seeds are seed + 2i and seed + 2i + 1; the stored images are the
  generator's (PNG, lossless), their scores the judge's, label_0 = 1 exactly when score_0 >
  score_1 and ½ on a tie; captions are the prompts repeated pairs_per_prompt times; done.json
  records the draw; the trainer's reader keeps the decisive pairs with the right winner."""
  generate, judge = FakeGenerator(), judge_lib.CentredJudge()
  out = str(tmp_path / "pairs")
  seed, per_prompt = 100, 4
  counts = sampled_pairs.draw_pairs(generate, PROMPTS, judge, out, pairs_per_prompt=per_prompt,
                                    seed=seed)
  pairs = len(PROMPTS) * per_prompt
  assert counts == {"written": pairs, "skipped": 0, "parts_done_before": 0}
  assert sorted(os.listdir(out)) == ["done.json", "part-00000.parquet"]
  with open(os.path.join(out, "done.json")) as f:
    assert json.load(f) == {**counts, "prompts": 3, "pairs_per_prompt": per_prompt,
                            "seed": seed}

  repeated = PROMPTS * per_prompt
  first_seeds = [seed + 2 * i for i in range(pairs)]
  assert generate.calls == [(repeated, first_seeds), (repeated, [s + 1 for s in first_seeds])]
  first = generate(repeated, first_seeds)
  second = generate(repeated, [s + 1 for s in first_seeds])

  rows = _rows(out)
  assert [row["caption"] for row in rows] == repeated
  assert [row["source_pair_id"] for row in rows] == list(range(pairs))
  labels = []
  for i, row in enumerate(rows):
    images = [_decode(row["jpg_0"]), _decode(row["jpg_1"])]
    np.testing.assert_array_equal(images[0], first[i])
    np.testing.assert_array_equal(images[1], second[i])
    rescored = judge(images)
    assert [row["score_0"], row["score_1"]] == rescored.tolist()
    label = _expected_label(seed + 2 * i, seed + 2 * i + 1)
    assert row["label_0"] == label and row["label_1"] == 1 - label, (i, row)
    assert (row["label_0"] == 1.0) == (row["score_0"] > row["score_1"])
    assert (row["label_0"] == 0.5) == (row["score_0"] == row["score_1"])
    if "triangle" not in row["caption"]:  # Centred circles and squares: 1 - offset / (16√2).
      offset = abs(OFFSETS[(seed + 2 * i) % 8])
      assert row["score_0"] == pytest.approx(1 - offset / HALF_DIAGONAL, abs=1e-6)
    labels.append(label)
  assert set(labels) == {0.0, 0.5, 1.0}  # Every case occurs.

  source = loader.make_source(ml_collections.ConfigDict(
      {"format": "pickapic", "train_files": os.path.join(out, "*.parquet")}))
  decisive = [row for row in rows if row["label_0"] != 0.5]
  assert len(source) == len(decisive) == pairs - labels.count(0.5)
  for pair_id, row in enumerate(decisive):
    record = source[pair_id]
    assert record["caption"] == row["caption"]
    assert record["winner"] == (row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"])


def _demo_config(tmp_path, *, heldout: bool = True) -> ml_collections.ConfigDict:
  """configs/demo.py (imported by path, as config_flags does) on small prompt files."""
  spec = importlib.util.spec_from_file_location("demo_config", DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  (tmp_path / "train.txt").write_text("a large red circle\na small blue square\n")
  (tmp_path / "heldout.txt").write_text("a small yellow triangle\n")
  config.data.sampled.prompts = str(tmp_path / "train.txt")
  config.data.sampled.pairs_per_prompt = 2
  config.data.sampled.heldout_prompts = str(tmp_path / "heldout.txt") if heldout else None
  config.data.sampled.heldout_pairs_per_prompt = 3
  config.train.seed = 100
  return config


def _patch_generator(monkeypatch) -> tuple[FakeGenerator, list]:
  generate, made = FakeGenerator(), []

  def make_generator(pipe, unet_params, **options):
    made.append((pipe, unet_params, options))
    return generate

  monkeypatch.setattr(sample, "make_generator", make_generator)
  return generate, made


def test_prepare_draws_once_and_points_the_run_at_the_pairs(tmp_path, monkeypatch):
  """The returned config reads WORKDIR/pairs as Pick-a-Pic and validates on
  WORKDIR/pairs_heldout; the sampler gets data.sampled's settings and the pipeline's own UNet;
  the held-out pairs' seeds (seed + 10 000 000 + ...) are none of the training pairs'; a
  second call finds done.json and draws nothing."""
  config = _demo_config(tmp_path)
  workdir = str(tmp_path / "run")
  pipe = types.SimpleNamespace(unet_params="the pipeline's UNet params")
  generate, made = _patch_generator(monkeypatch)
  lines = []
  prepared = sampled_pairs.prepare(config, pipe, workdir, log=lines.append)

  assert config.data.format == "sampled" and config.eval.pairs is None  # Not changed in place.
  assert prepared.data.format == "pickapic"
  assert prepared.data.train_files == os.path.join(workdir, "pairs", "*.parquet")
  assert prepared.eval.pairs == os.path.join(workdir, "pairs_heldout", "*.parquet")
  assert len(made) == 1
  assert made[0] == (pipe, pipe.unet_params, {"steps": 20, "guidance_scale": 3.0,
                                              "resolution": 32, "batch": 64})
  assert len(lines) == 3 and lines[0].startswith("drawing preference pairs")
  assert "pairs: 4 pairs of 2 prompts" in lines[1]
  assert "pairs_heldout: 3 pairs of 1 prompts" in lines[2] and "centred" in lines[2]

  # Training pairs, then held-out ones; each drawn as (first images, second images).
  (train_a, train_b, held_a, held_b) = [seeds for _, seeds in generate.calls]
  assert train_a == [100, 102, 104, 106] and train_b == [101, 103, 105, 107]
  assert held_a == [10_000_100, 10_000_102, 10_000_104]
  assert held_b == [10_000_101, 10_000_103, 10_000_105]
  assert not set(train_a + train_b) & set(held_a + held_b)
  train_rows = _rows(os.path.join(workdir, "pairs"))
  held_rows = _rows(os.path.join(workdir, "pairs_heldout"))
  assert [r["caption"] for r in train_rows] == ["a large red circle", "a small blue square"] * 2
  assert [r["caption"] for r in held_rows] == ["a small yellow triangle"] * 3
  for rows, seeds in ((train_rows, train_a), (held_rows, held_a)):
    assert [r["label_0"] for r in rows] == [_expected_label(s, s + 1) for s in seeds]

  # The trainer reads the training pairs through the returned config.
  source = loader.make_source(ml_collections.ConfigDict(
      {"format": prepared.data.format, "train_files": prepared.data.train_files}))
  assert len(source) == sum(r["label_0"] != 0.5 for r in train_rows)

  # A resumed run: done.json is found, nothing is loaded or drawn, the same config comes back.
  def no_generator(*args, **kwargs):
    raise AssertionError("pairs drawn again")
  monkeypatch.setattr(sample, "make_generator", no_generator)
  again = sampled_pairs.prepare(config, pipe, workdir, log=lines.append)
  assert again.to_dict() == prepared.to_dict() and len(lines) == 3


def test_prepare_draws_only_the_pairs_not_yet_done(tmp_path, monkeypatch):
  """An interrupted draw (held-out pairs without done.json) redraws only those."""
  config = _demo_config(tmp_path)
  workdir = str(tmp_path / "run")
  pipe = types.SimpleNamespace(unet_params=None)
  _patch_generator(monkeypatch)
  sampled_pairs.prepare(config, pipe, workdir, log=lambda line: None)
  os.remove(os.path.join(workdir, "pairs_heldout", sampled_pairs.DONE))
  generate, made = _patch_generator(monkeypatch)
  lines = []
  sampled_pairs.prepare(config, pipe, workdir, log=lines.append)
  assert len(made) == 1 and len(lines) == 2 and lines[1].startswith("pairs_heldout:")
  assert [seeds for _, seeds in generate.calls] == [[10_000_100, 10_000_102, 10_000_104],
                                                    [10_000_101, 10_000_103, 10_000_105]]
  assert os.path.exists(os.path.join(workdir, "pairs_heldout", sampled_pairs.DONE))


def test_prepare_keeps_a_given_eval_pairs_and_its_own_seed(tmp_path, monkeypatch):
  """eval.pairs already set stays; without heldout_prompts no held-out pairs are drawn and
  eval.pairs stays unset; data.sampled.seed, when set, replaces train.seed."""
  config = _demo_config(tmp_path)
  config.eval.pairs = "/data/my_heldout/*.parquet"
  config.data.sampled.seed = 7
  generate, _ = _patch_generator(monkeypatch)
  prepared = sampled_pairs.prepare(config, types.SimpleNamespace(unet_params=None),
                                   str(tmp_path / "given"), log=lambda line: None)
  assert prepared.eval.pairs == "/data/my_heldout/*.parquet"
  assert generate.calls[0][1] == [7, 9, 11, 13]
  assert generate.calls[2][1] == [10_000_007, 10_000_009, 10_000_011]

  config = _demo_config(tmp_path, heldout=False)
  generate, _ = _patch_generator(monkeypatch)
  workdir = str(tmp_path / "no_heldout")
  prepared = sampled_pairs.prepare(config, types.SimpleNamespace(unet_params=None), workdir,
                                   log=lambda line: None)
  assert prepared.eval.pairs is None and len(generate.calls) == 2
  assert sorted(os.listdir(workdir)) == ["pairs"]


def _sampled_config() -> ml_collections.ConfigDict:
  config = default_config.get_config()
  config.model.pretrained = "/models/base"
  config.data.resolution = 32
  config.data.format = "sampled"
  config.data.sampled.prompts = "/prompts/train.txt"
  config.data.sampled.judge = "centred"
  return config


def test_config_checks_accept_a_complete_sampled_config(tmp_path):
  """The baseline of the refusals below passes, as does the shipped configs/demo.py."""
  config_checks.check_config(_sampled_config())
  config_checks.check_config(_demo_config(tmp_path))


@pytest.mark.parametrize("key, value", [("data.sampled.prompts", None),
                                        ("data.sampled.judge", None),
                                        ("data.sampled.judge", ""),
                                        ("model.pretrained", None),
                                        ("data.sampled.pairs_per_prompt", 0),
                                        ("data.sampled.pairs_per_prompt", -3)])
def test_config_checks_refuse_an_unusable_sampled_config(key, value):
  config = _sampled_config()
  *sections, leaf = key.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[leaf] = value
  with pytest.raises(UserError) as error:
    config_checks.check_config(config)
  message = str(error.value)
  assert key in message and "\n" not in message, message
