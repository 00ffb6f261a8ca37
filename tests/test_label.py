"""AI feedback: pairs relabelled by a scorer, in a dataset the trainer reads, resumably."""
import os

import ml_collections
import numpy as np
import pyarrow.parquet as pq

import subprocesses
import tiny_data
from dpo_jax import label, scorers
from dpo_jax.data import loader, transforms
from test_scorers import make_scorer_folder


def test_relabelled_pairs_follow_the_scorer_and_train_as_they_are(tmp_path):
  tiny_data.write_warm_vs_cool(str(tmp_path / "pairs.parquet"), pairs=6, seed=0)
  _, _, folder, _ = make_scorer_folder(tmp_path / "scorer")
  scorer = scorers.load_scorer(str(folder), "clip")
  source = loader.make_source(ml_collections.ConfigDict(
      {"format": "pickapic", "train_files": str(tmp_path / "pairs.parquet")}))
  out = str(tmp_path / "relabelled")
  counts = label.label_pairs(scorer, source, out, batch=4, part_pairs=4)
  assert counts == {"written": 6, "skipped": 0, "parts_done_before": 0}
  table = pq.read_table(os.path.join(out, "part-00000.parquet")).to_pylist()
  table += pq.read_table(os.path.join(out, "part-00001.parquet")).to_pylist()
  for row, pair_id in zip(table, range(6), strict=True):
    original = source[pair_id]
    assert row["source_pair_id"] == pair_id and row["caption"] == original["caption"]
    images = [np.asarray(transforms.decode_image(row[k])) for k in ("jpg_0", "jpg_1")]
    expected = scorer(images, [row["caption"]] * 2)
    np.testing.assert_allclose([row["score_0"], row["score_1"]], expected, rtol=0, atol=1e-5)
    assert row["label_0"] == float(row["score_0"] > row["score_1"])
  # The scorer disagrees with the human labels somewhere, or relabelling would be a no-op.
  assert any(row["label_0"] == 0.0 for row in table)

  # The trainer's reader sees the scorer's winner first.
  relabelled = loader.make_source(ml_collections.ConfigDict(
      {"format": "pickapic", "train_files": os.path.join(out, "*.parquet")}))
  for pair_id, row in enumerate(table):
    winner = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
    assert relabelled[pair_id]["winner"] == winner

  # Resumable: a finished part is not redone.
  os.remove(os.path.join(out, "part-00001.parquet"))
  again = label.label_pairs(scorer, source, out, batch=4, part_pairs=4)
  assert again == {"written": 2, "skipped": 0, "parts_done_before": 1}


def test_command_requires_its_flags(tmp_path):
  done = subprocesses.run_module("dpo_jax.label", f"--output={tmp_path}", timeout=120)
  assert done.returncode == 2 and "are all required" in done.stderr
