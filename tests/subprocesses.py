"""Commands in a subprocess on N plain CPU devices, as on a user's machine (conftest gives the
test process itself 8 fake devices).

Their JAX compiles with most XLA optimisations off (`jax_disable_most_optimizations`) and
XLA:CPU's older fusion emitter (`compile_flags`): the command-line runs are tiny, so
compiling dominates them and optimising the code does not pay.
`optimize=True` compiles as a user's run would, for a subprocess whose numbers must match an
optimised run's."""
import os
import random
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
_PROBED = "DPO_JAX_TESTS_COMPILE_FLAGS"  # The probe's answer, for this process's children.


def compile_flags() -> str:
  """XLA_FLAGS that make XLA:CPU compile the tests' programs faster: its older fusion code
  generator, which compiled a tiny UNet's train step about 20% faster than the default MLIR
  fusion emitters. Like `JAX_DISABLE_MOST_OPTIMIZATIONS` it changes code generation only.
  An XLA that no longer knows the flag would abort on it, so a child process tries it once
  (a second) and the answer is kept in the environment for the test workers and commands."""
  if _PROBED not in os.environ:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _FAST_COMPILE_FLAG})
    os.environ[_PROBED] = _FAST_COMPILE_FLAG if probe.returncode == 0 else ""
  return os.environ[_PROBED]


def cpu_env(devices: int = 1, *, optimize: bool = False, **extra: str) -> dict[str, str]:
  """This environment with JAX on `devices` CPU devices, offline, compiling with most
  optimisations off unless `optimize`, and `extra` on top."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHON=sys.executable, PYTHONPATH=REPO)
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []
  if not optimize:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    flags.append(compile_flags())
  env["XLA_FLAGS"] = " ".join(flag for flag in flags if flag)
  return {**env, **extra}


def run(command: list[str], *, devices: int = 1, optimize: bool = False, timeout: int = 600,
        **env: str) -> subprocess.CompletedProcess:
  """`command` run from the repository root; its output captured as text."""
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                        env=cpu_env(devices, optimize=optimize, **env))


def run_module(module: str, *args: str, **options) -> subprocess.CompletedProcess:
  """`python -m module args...` with this interpreter (see `run` for the options)."""
  return run([sys.executable, "-m", module, *args], **options)


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


def slurm_allocation(folder, tasks: int = 2) -> dict[str, str]:
  """The environment in which launch/slurm_gpu.sbatch runs as sbatch runs it, in a `tasks`-task
  allocation on this one node ('localhost'), with tests/fake_srun.sh as srun (in `folder`/bin):
  each task gets srun's variables and no coordinator flag, so JAX's SLURM detection alone
  must join them."""
  bin_dir = os.path.join(folder, "bin")
  os.makedirs(bin_dir, exist_ok=True)
  srun = os.path.join(bin_dir, "srun")
  with open(srun, "w") as f:
    f.write(f'#!/bin/sh\nexec bash {REPO}/tests/fake_srun.sh "$@"\n')
  os.chmod(srun, 0o755)
  return dict(SLURM_JOB_ID=str(_slurm_job_id()), SLURM_JOB_NODELIST="localhost",
              SLURM_NODELIST="localhost", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
              SLURM_NTASKS=str(tasks), SLURM_NTASKS_PER_NODE=str(tasks),
              SLURM_TASKS_PER_NODE=str(tasks), SLURM_SUBMIT_DIR=REPO,
              PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
              JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
