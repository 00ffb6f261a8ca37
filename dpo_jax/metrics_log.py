"""metrics.jsonl, TensorBoard events and the console progress line; process 0 only."""
import json
import math
import os
import sys
import time

import jax


def _summary_writer_class():
  """tensorboardX's SummaryWriter (event files without TensorFlow), imported without PyTorch.

  tensorboardX imports torch whenever it is installed (the test and export extras install
  it), only to accept torch tensors, which we never log: 1.3 s and a few hundred MB in every
  run. A None in sys.modules makes that one `import torch` fail as if torch were absent; a
  torch already imported by the process is left alone.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLog:

  def __init__(self, workdir: str, total_steps: int):
    self._enabled = jax.process_index() == 0
    self._total = total_steps
    self._last_time = time.perf_counter()
    self._last_step = 0
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._enabled else None
    self._tensorboard = None
    if self._enabled:
      self._tensorboard = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def restart_clock(self) -> None:
    """The next rate counts from now (after compilation, say)."""
    self._last_time = time.perf_counter()

  def write(self, step: int, metrics: dict, *, lr: float, pairs: int) -> None:
    """`pairs`: pairs per step, for throughput since the previous write."""
    now = time.perf_counter()
    seconds_per_step = max(now - self._last_time, 1e-9) / (step - self._last_step)
    pairs_per_sec = pairs / seconds_per_step
    self._last_time, self._last_step = now, step
    if not self._enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "lr": lr,
              "pairs_per_sec": pairs_per_sec}
    self._file.write(_json_line(record))
    self._file.flush()
    for key, value in record.items():
      if key != "step" and _finite(value):  # A gap, as null in metrics.jsonl.
        self._tensorboard.add_scalar(key, value, step)
    eta = seconds_per_step * (self._total - step)
    skipped = "  skipped: loss or gradient not finite" if record.get("skipped_nonfinite") else ""
    print(f"step {step}/{self._total}  loss {record['loss']:.4f}  "
          f"implicit_acc {record.get('implicit_acc', float('nan')):.3f}  "
          f"{pairs_per_sec:.1f} pairs/s  eta {eta:.0f}s{skipped}", flush=True)

  def write_eval(self, step: int, metrics: dict, grid=None) -> None:
    """Validation metrics (`eval/...`) as their own metrics.jsonl record, and the sample grid
    (uint8 HWC) as a TensorBoard image."""
    if not self._enabled:
      return
    self._file.write(_json_line({"step": step, **metrics}))
    self._file.flush()
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, value, step)
    if grid is not None:
      self._tensorboard.add_image("eval/samples", grid, step, dataformats="HWC")
    print(f"step {step}/{self._total}  " + "  ".join(
        f"{key[5:]} {value:.3f}" for key, value in metrics.items()), flush=True)

  def print(self, text: str) -> None:
    """A line for the console, from process 0 only."""
    if self._enabled:
      print(text, flush=True)

  def close(self) -> None:
    if self._enabled:
      self._file.close()
      self._tensorboard.close()


def _finite(value) -> bool:
  return not isinstance(value, float) or math.isfinite(value)


def _json_line(record: dict) -> str:
  """`record` as one line of standard JSON: a NaN or infinite value (a skipped step's loss)
  becomes null, where json.dumps would write NaN or Infinity, which strict readers refuse."""
  return json.dumps({k: v if _finite(v) else None for k, v in record.items()}) + "\n"
