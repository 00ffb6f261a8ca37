"""The launchers: launch/local_multiprocess.sh and launch/slurm_gpu.sbatch start processes that
jax.distributed joins into one job (a failing process fails the launch); launch/tpu_pod.sh
sends the right commands to every worker."""
import json
import os
import random
import socket
import subprocess
import tarfile

import pytest

import subprocesses

# A run small enough that compiling dominates it (the same in every launcher's test, so the
# compilation cache serves the second).
_TINY_RUN = ("--config.train.steps=2", "--config.data.resolution=32",
             "--config.train.batch_pairs=2")


def _local_multiprocess(workdir, *args):
  # Compiled with most optimisations off (subprocesses' default): compiling dominates this run.
  return subprocesses.run(
      ["bash", "launch/local_multiprocess.sh", "2", "configs/synthetic.py", str(workdir), *args],
      timeout=300)


def _logged_steps(workdir) -> list[int]:
  # Had jax.distributed not joined the processes, two single-process runs would each log
  # every step.
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
def test_local_multiprocess_fails_when_a_process_fails(tmp_path):
  result = _local_multiprocess(tmp_path, "--config.dpo.beta=0")
  assert result.returncode != 0
  assert "dpo.beta" in result.stderr


def _executable(path, text: str):
  path.write_text(text)
  path.chmod(0o755)
  return path


def _slurm_job_id() -> int:
  """A job id whose coordinator port (JAX derives it: id mod 4096 + 61440) is free here."""
  for _ in range(50):
    job_id = random.randrange(10**6, 10**7)
    with socket.socket() as probe:
      try:
        probe.bind(("", job_id % 4096 + 61440))
        return job_id
      except OSError:
        continue
  raise RuntimeError("no free port in 61440..65535")


def _sbatch(tmp_path, workdir, *args):
  """launch/slurm_gpu.sbatch as sbatch runs it in a 2-task allocation on this one node
  ('localhost'), with tests/fake_srun.sh as srun: each task gets srun's variables and no
  coordinator flag, so JAX's SLURM detection alone must join them."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "srun",
              f'#!/bin/sh\nexec bash {subprocesses.REPO}/tests/fake_srun.sh "$@"\n')
  allocation = dict(SLURM_JOB_ID=str(_slurm_job_id()), SLURM_JOB_NODELIST="localhost",
                    SLURM_NODELIST="localhost", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
                    SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2",
                    SLURM_SUBMIT_DIR=subprocesses.REPO)
  return subprocesses.run(
      ["bash", "launch/slurm_gpu.sbatch", "configs/synthetic.py", str(workdir), *args],
      timeout=300, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **allocation)


@pytest.mark.slow
def test_slurm_batch_script_trains_with_two_tasks(tmp_path):
  result = _sbatch(tmp_path, tmp_path / "run", *_TINY_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _logged_steps(tmp_path / "run") == [1, 2]
  assert (tmp_path / "run" / "checkpoints").is_dir()


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
