"""In-training validation: held-out implicit accuracy, the sample grid and scorer win rates
land in metrics.jsonl (and the grid on disk) every eval.every steps."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

import tiny_config
import tiny_data
import tiny_models
from dpo_jax import config_checks, train
from dpo_jax.errors import UserError
from test_scorers import make_scorer_folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    {},
    # LoRA trains adapters: validation must see the base with them merged in.
    {"lora.enabled": True},
    # MaPO holds no reference: validation compares with the pretrained UNet.
    {"dpo.loss": "mapo"},
], ids=["dpo", "lora", "mapo"])
def test_validation_every_n_steps_writes_metrics_and_grids(tmp_path, mode):
  tiny_models.make_pipeline("sd", small=True).save_pretrained(tmp_path / "pipeline")
  tiny_data.write_warm_vs_cool(str(tmp_path / "train.parquet"), pairs=8, seed=0)
  tiny_data.write_warm_vs_cool(str(tmp_path / "heldout.parquet"), pairs=3, seed=1)
  (tmp_path / "prompts.txt").write_text("a cat\nphoto of a dog\n")
  _, _, scorer, _ = make_scorer_folder(tmp_path / "scorer")
  config = tiny_config.get_config()
  config.model.pretrained = str(tmp_path / "pipeline")
  config.data.train_files = str(tmp_path / "train.parquet")
  config.train.steps = 2
  config.optim.peak_lr = 0.0  # The policy stays the reference: every comparison a tie.
  for key, value in mode.items():
    section, name = key.split(".")
    config[section][name] = value
  config.eval.update(every=1, pairs=str(tmp_path / "heldout.parquet"), draws=2,
                     prompts=str(tmp_path / "prompts.txt"), sample_steps=2,
                     scorers=f"clip={scorer}")
  config_checks.check_config(config)
  train.train(config, str(tmp_path / "run"), jax.devices()[:1])

  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  evals = [r for r in records if "eval/implicit_acc" in r]
  assert [r["step"] for r in evals] == [1, 2]
  for record in evals:
    assert record["eval/implicit_acc"] == 0.5 and record["eval/mean_margin"] == 0.0
    assert record["eval/clip_win_rate"] == 0.5 and np.isfinite(record["eval/clip_median"])
  grid = np.asarray(Image.open(tmp_path / "run" / "eval" / "step_000002.png"))
  assert grid.shape == (2 * 32 + 4, 2 * 32 + 4, 3)
  np.testing.assert_array_equal(grid[:32], grid[36:])  # Reference above, (equal) policy below.


@pytest.mark.parametrize("overrides, words", [
    (dict(every=5), "nothing to validate on"),
    (dict(every=5, pairs="p.parquet"), "set model.pretrained"),
    (dict(every=-1), "eval.every must be >= 0"),
])
def test_validation_settings_are_checked_up_front(overrides, words):
  config = tiny_config.get_config()
  config.data.train_files = "x.parquet"
  config.eval.update(**overrides)
  with pytest.raises(UserError, match=words):
    config_checks.check_config(config)
