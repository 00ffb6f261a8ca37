"""launch/local_multiprocess.sh: two processes joined by jax.distributed train one job, and a
failing process fails the whole launch."""
import json

import pytest

import subprocesses


def _local_multiprocess(workdir, *args):
  # Compiled with most optimisations off (subprocesses' default): compiling dominates this run.
  return subprocesses.run(
      ["bash", "launch/local_multiprocess.sh", "2", "configs/synthetic.py", str(workdir), *args],
      timeout=300)


@pytest.mark.slow
def test_local_multiprocess_trains_with_two_processes(tmp_path):
  result = _local_multiprocess(tmp_path, "--config.train.steps=2", "--config.data.resolution=32",
                               "--config.train.batch_pairs=2")
  assert result.returncode == 0, result.stderr[-3000:]
  # Had jax.distributed not joined them, two single-process runs would each log both steps.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.slow
def test_local_multiprocess_fails_when_a_process_fails(tmp_path):
  result = _local_multiprocess(tmp_path, "--config.dpo.beta=0")
  assert result.returncode != 0
  assert "dpo.beta" in result.stderr
