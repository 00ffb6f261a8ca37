"""The command line end to end: a run trains and logs, and user mistakes exit 2 in one line
(the embedded demo itself: tests/test_demo.py)."""
import json
import math
import sys

import pytest

import subprocesses

SMALL = ["--config=configs/synthetic.py", "--config.train.steps=6", "--config.train.log_every=3",
         "--config.data.resolution=32", "--config.train.batch_pairs=4"]


def _main(*args, workdir=None, devices=1, **env):
  workdir_flag = [f"--workdir={workdir}"] if workdir is not None else []
  return subprocesses.run_module("dpo_jax.main", *args, *workdir_flag, devices=devices, **env)


@pytest.mark.slow
def test_synthetic_run_trains_and_logs_metrics(tmp_path):
  # No cache configured outside: the run keeps its compiled programs in WORKDIR/xla_cache.
  result = _main(*SMALL, "--config.train.profile_steps=2,3", workdir=tmp_path,
                 JAX_COMPILATION_CACHE_DIR="")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "compiled the train step in" in result.stdout
  assert "XLA's memory estimate per device" in result.stdout
  assert any((tmp_path / "xla_cache").iterdir())
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 3, 6]
  for key in ("loss", "implicit_acc", "reward_margin", "lr", "pairs_per_sec"):
    assert all(math.isfinite(r[key]) for r in records), key
  # Step 1 is evaluated before any update, with policy == reference: every pair ties, up to
  # float32 rounding between the two forward passes (×β/2 = 2500), which can break ties.
  assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
  assert records[-1]["loss"] < records[0]["loss"]
  assert json.loads((tmp_path / "config.json").read_text())["dpo"]["beta"] == 5000.0
  assert "step 6/6" in result.stdout
  batch = json.loads((tmp_path / "config.json").read_text())["train"]["batch_pairs"]
  assert [r["data_pairs_kept"] for r in records] == [batch * r["step"] for r in records]
  assert f"data: kept {6 * batch}, skipped 0 bad" in result.stdout
  assert list((tmp_path / "tensorboard").iterdir())
  # The profiler window: one trace (TensorBoard's plugin layout) of steps 2..3.
  assert f"profile of steps 2..3: {tmp_path / 'profile'}" in result.stdout
  assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))


def test_the_metrics_log_writes_tensorboard_events_without_importing_pytorch(tmp_path):
  """tensorboardX would import torch (installed here, by the test extra) in every run: over a
  second of each command's start. PyTorch still imports afterwards, for whoever needs it."""
  code = (f"import os, sys; from dpo_jax import metrics_log; "
          f"log = metrics_log.MetricsLog({str(tmp_path)!r}, total_steps=1); "
          "log.write(1, {'loss': 0.5}, lr=0.1, pairs=2); log.close(); "
          "assert 'torch' not in sys.modules, 'torch imported'; import torch; "
          f"print(os.listdir({str(tmp_path / 'tensorboard')!r}))")
  result = subprocesses.run([sys.executable, "-c", code])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "events.out.tfevents" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--config.dpo.beta=0"], "dpo.beta"),
    (["--config.optim.name=sgd"], "optim.name"),
    (["--config.data.resolution=30"], "data.resolution"),
    (["--config.dpo.betta=1"], "config.dpo.betta is not a config key"),
    (["--config.train.steps=many"], "train.steps"),
    (["--config.data.max_bad_fraction=2"], "data.max_bad_fraction must be in [0, 1]"),
    (["--config.data.cache_dir=/nowhere"], "data.cache_dir needs model.pretrained"),
    (["--config.data.format=tfds"], "data.tfds_name is not set"),
    (["--config.train.profile_steps=5"], "train.profile_steps='5': write two step numbers"),
    # 1024 px, 64 pairs: ~0.2 TB of activations by XLA's estimate; refused after compiling.
    (["--config.data.resolution=1024", "--config.train.batch_pairs=64"],
     "the train step does not fit in the device's memory"),
    (["--config.train.profile_steps=3,99"], "need 1 <= A <= B <= train.steps (6)"),
])
def test_user_mistakes_end_in_one_line_and_status_2(tmp_path, args, expected):
  result = _main(*SMALL, *args, workdir=tmp_path)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


def test_batch_that_does_not_split_over_the_devices_is_a_one_line_error(tmp_path):
  result = _main(*SMALL, "--config.train.batch_pairs=6", workdir=tmp_path, devices=4)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "train.batch_pairs=6" in lines[0] and "4 devices" in lines[0], lines


def test_pretrained_path_that_does_not_exist_is_named(tmp_path):
  missing = tmp_path / "no" / "such-pipeline"
  result = _main(*SMALL, f"--config.model.pretrained={missing}", workdir=tmp_path)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(missing) in lines[0], lines


def test_missing_config_file_is_a_one_line_error(tmp_path):
  result = _main("--config=configs/nothere.py", workdir=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config file configs/nothere.py does not exist; pass --config configs/NAME.py"]


def test_missing_workdir_is_a_one_line_error():
  result = _main()
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --workdir is required: the folder for checkpoints and metrics"]
