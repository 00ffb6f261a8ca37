"""End to end on a tiny diffusers pipeline and Pick-a-Pic parquet: learning, CLI, export."""
import os

import numpy as np
import pytest
from diffusers import DiffusionPipeline, UNet2DConditionModel

import subprocesses
import tiny_config
import tiny_data
import tiny_models
from dpo_jax import evaluate, export, train
from dpo_jax.checkpoint import Checkpointer
from dpo_jax.models import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny SD1.5-shaped pipeline (the two-level UNet) and warm-beats-cool train / held-out
  parquet files."""
  folder = tmp_path_factory.mktemp("e2e")
  tiny_models.make_pipeline("sd", small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=64, seed=0)
  tiny_data.write_warm_vs_cool(str(folder / "heldout.parquet"), pairs=16, seed=1)
  return folder


def _tiny_config(files, **train_overrides):
  config = tiny_config.get_config()
  config.model.pretrained = str(files / "pipeline")
  config.data.train_files = str(files / "train.parquet")
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


_run = subprocesses.run_module


@pytest.mark.slow
def test_learns_a_preference_that_generalises_and_never_touches_the_reference(files, tmp_path):
  # 30 steps (10 reached 0.81 below, 20 already 1.0), compiled as a user's run is
  # (optimize=True): optimised code pays for its longer compile over this many steps.
  result = _run("dpo_jax.main", f"--config={TINY_CONFIG}", f"--workdir={tmp_path}",
                f"--config.model.pretrained={files / 'pipeline'}",
                f"--config.data.train_files={files / 'train.parquet'}",
                "--config.train.steps=30", "--config.train.batch_pairs=8",
                "--config.train.log_every=20", "--config.train.ckpt_every=1000",
                "--config.optim.peak_lr=2e-6", optimize=True)
  assert result.returncode == 0, result.stderr[-3000:]

  # The evaluator's Table-2 protocol on 16 held-out pairs, 8 (t, ε) draws each, at the
  # run's last checkpoint: chance (no better than the reference) gives 0.5 ± 0.125.
  result = evaluate.evaluate_run(str(tmp_path), str(files / "heldout.parquet"), draws=8)
  print(f"held-out implicit accuracy after 30 steps: {result['implicit_acc']:.3f}")
  assert (result["step"], result["pairs"], result["draws"]) == (30, 16, 8)
  assert result["implicit_acc"] >= 0.75

  checkpointer = Checkpointer(str(tmp_path), every=1000)
  policy = weights.params_to_state_dict(checkpointer.restore_params(30))
  reference = weights.params_to_state_dict(checkpointer.restore_params(30, "reference_params"))
  initial = weights.params_to_state_dict(train.load_models(_tiny_config(files)).initial_params)
  for key, value in reference.items():
    np.testing.assert_array_equal(value, initial[key], err_msg=key)
  assert not np.array_equal(policy["conv_in.weight"], initial["conv_in.weight"])

  # The export is the trained policy of the newest step, not the reference.
  assert export.export(str(tmp_path), str(tmp_path / "exported")) == 30
  exported = UNet2DConditionModel.from_pretrained(tmp_path / "exported" / "unet").state_dict()
  for key, value in policy.items():
    np.testing.assert_array_equal(exported[key].numpy(), value, err_msg=key)


@pytest.mark.slow
def test_cli_run_then_export_loads_in_diffusers_and_zero_lr_changes_nothing(files, tmp_path):
  workdir, output = tmp_path / "run", tmp_path / "exported"
  result = _run("dpo_jax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                f"--config.model.pretrained={files / 'pipeline'}",
                f"--config.data.train_files={files / 'train.parquet'}",
                "--config.train.steps=2", "--config.optim.peak_lr=0")
  assert result.returncode == 0, result.stderr[-3000:]
  result = _run("dpo_jax.export", f"--workdir={workdir}", f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "exported step 2" in result.stdout

  original = DiffusionPipeline.from_pretrained(files / "pipeline")
  exported = DiffusionPipeline.from_pretrained(output)
  assert type(exported).__name__ == "StableDiffusionPipeline"
  tiny_models.assert_same_tensors(original.unet, exported.unet, "unet")

  again = _run("dpo_jax.export", f"--workdir={workdir}", f"--output={output}")
  assert again.returncode == 2 and "--overwrite" in again.stderr
  missing = _run("dpo_jax.export", f"--workdir={workdir}", f"--output={output}", "--step=7")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith("error: no checkpoint of step 7")
  for args, words in (((f"--workdir={workdir}",), "--output are both required"),
                      ((f"--workdir={workdir}", "--bogus=1"), "bogus")):
    mistake = _run("dpo_jax.export", *args)
    lines = mistake.stderr.strip().splitlines()
    assert mistake.returncode == 2 and len(lines) == 1 and words in lines[0], mistake.stderr
