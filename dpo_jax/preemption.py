"""SIGTERM as a request to stop at a step boundary that every host agrees on.

Schedulers (SLURM, Kubernetes, spot and preemptible VMs) send SIGTERM some seconds before
they kill a job. With `jax.distributed` initialised, JAX's preemption sync manager catches
SIGTERM itself (on any host, CPU/gloo included), tells the other hosts, and names the first
step that every host can still reach: `multihost_utils.reached_preemption_sync_point`. A
single process has no such manager; a handler of our own sets a flag. SIGINT (Ctrl-C) is
left alone: a person at the keyboard wants the run to stop now.
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Notice:
  """`reached(step)`: whether the run stops after `step`, the same answer on every host.

  A context manager: the single-process handler is installed on entry and the previous one
  put back on exit, so a SIGTERM outside the loop keeps its default effect (nothing trained
  since the newest checkpoint would be lost).
  """

  def __init__(self):
    self._received = False
    self._previous = None

  def __enter__(self) -> "Notice":
    # The multi-host manager's own C++ handler must stay: a Python handler would replace it.
    if not jax.distributed.is_initialized() and (
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *_) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, *_) -> None:
    self._received = True

  @property
  def received_here(self) -> bool:
    """Whether this process's own handler caught a SIGTERM (single-process runs)."""
    return self._received

  def reached(self, step: int) -> bool:
    """Call it after every step, on every host (the sync manager's contract)."""
    if not jax.distributed.is_initialized():
      return self._received
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM keeps its default.
      return False
