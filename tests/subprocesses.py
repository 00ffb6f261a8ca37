"""Commands in a subprocess on N plain CPU devices, as on a user's machine (conftest gives the
test process itself 8 fake devices).

Their JAX compiles with most XLA optimisations off (`jax_disable_most_optimizations`): the
command-line runs are tiny, so compiling dominates them and optimising the code does not pay.
`optimize=True` compiles as a user's run would, for a subprocess whose numbers must match an
optimised run's."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(devices: int = 1, *, optimize: bool = False, **extra: str) -> dict[str, str]:
  """This environment with JAX on `devices` CPU devices, offline, compiling with most
  optimisations off unless `optimize`, and `extra` on top."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHON=sys.executable, PYTHONPATH=REPO)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if not optimize:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return {**env, **extra}


def run(command: list[str], *, devices: int = 1, optimize: bool = False, timeout: int = 600,
        **env: str) -> subprocess.CompletedProcess:
  """`command` run from the repository root; its output captured as text."""
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                        env=cpu_env(devices, optimize=optimize, **env))


def run_module(module: str, *args: str, **options) -> subprocess.CompletedProcess:
  """`python -m module args...` with this interpreter (see `run` for the options)."""
  return run([sys.executable, "-m", module, *args], **options)
