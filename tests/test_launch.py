"""The launchers: a failing process fails launch/local_multiprocess.sh's launch;
launch/tpu_pod.sh sends the right commands to every worker. (That the local and SLURM
launchers' processes join into one job and train is tests/test_multihost.py's two-host run,
resumed through launch/slurm_gpu.sbatch.)"""
import os
import subprocess
import tarfile

import pytest

import subprocesses


def _local_multiprocess(workdir, *args):
  # Compiled with most optimisations off (subprocesses' default): compiling dominates this run.
  return subprocesses.run(
      ["bash", "launch/local_multiprocess.sh", "2", "configs/synthetic.py", str(workdir), *args],
      timeout=300)


@pytest.mark.slow
def test_local_multiprocess_fails_when_a_process_fails(tmp_path):
  result = _local_multiprocess(tmp_path, "--config.dpo.beta=0")
  assert result.returncode != 0
  assert "dpo.beta" in result.stderr


def _executable(path, text: str):
  path.write_text(text)
  path.chmod(0o755)
  return path


def _gcloud_calls(log) -> list[list[str]]:
  return [(log / f"{n}.args").read_text().split("\0")[:-1]
          for n in range(len(list(log.glob("*.args"))))]


def _tpu_pod(tmp_path, *args):
  """launch/tpu_pod.sh with tests/fake_gcloud.sh as gcloud, which records its calls."""
  bin_dir, log = tmp_path / "bin", tmp_path / "gcloud_calls"
  bin_dir.mkdir()
  log.mkdir()
  _executable(bin_dir / "gcloud",
              f'#!/bin/sh\nexec bash {subprocesses.REPO}/tests/fake_gcloud.sh "$@"\n')
  # PYTHON unset (empty), as on a user's machine: the workers' interpreter is then resolved
  # on each worker.
  result = subprocesses.run(["bash", "launch/tpu_pod.sh", *args], timeout=60,
                            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                            FAKE_GCLOUD_LOG=str(log), PYTHON="")
  assert result.returncode == 0, result.stderr[-3000:]
  return _gcloud_calls(log), log


def test_tpu_pod_setup_installs_this_checkout_on_every_worker(tmp_path):
  calls, log = _tpu_pod(tmp_path, "--setup", "my-pod", "us-east5-a")
  assert [call[:4] for call in calls] == [["compute", "tpus", "tpu-vm", "scp"],
                                          ["compute", "tpus", "tpu-vm", "ssh"]]
  assert all("--worker=all" in call and "--zone=us-east5-a" in call for call in calls)
  with tarfile.open(log / "0.scp") as archive:
    names = set(archive.getnames())
  assert {"setup.cfg", "launch/tpu_pod.sh", "dpo_jax/train.py"} <= names
  assert not any(name.startswith((".venv/", ".git/")) for name in names)
  command = calls[1][-1]
  assert command.startswith("--command=")
  script = command[len("--command="):]
  assert "pip install --quiet -e '.[tpu]'" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_tpu_pod_run_reaches_each_worker_with_its_arguments_intact(tmp_path):
  calls, _ = _tpu_pod(tmp_path, "my-pod", "us-east5-a", "configs/sdxl.py", "/mnt/runs/a b",
                      "--config.data.train_files=/mnt/data/train-*.parquet")
  [call] = calls
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-east5-a"]
  assert "--worker=all" in call
  # Run the command as a worker would, after --setup: REPO_DIR's venv python (a stub here
  # that prints its arguments) must get every argument whole, the glob unexpanded.
  worker_home = tmp_path / "worker"
  (worker_home / "dpo_jax" / ".venv" / "bin").mkdir(parents=True)
  _executable(worker_home / "dpo_jax" / ".venv" / "bin" / "python",
              '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
  command = call[-1][len("--command="):]
  done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                        env={**os.environ, "HOME": str(worker_home)}, cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == [
      "-m", "dpo_jax.main", "--config=configs/sdxl.py", "--workdir=/mnt/runs/a b",
      "--config.data.train_files=/mnt/data/train-*.parquet",
      "--config.distributed.multi_process=true"]
