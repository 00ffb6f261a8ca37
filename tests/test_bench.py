"""The benchmark harness times the real train step and counts its FLOPs consistently."""
import json

import jax
import numpy as np
import pytest
from ml_collections import config_dict

import tiny_config
import tiny_models
from dpo_jax import bench, default_config
from subprocesses import run_module


def _tiny_config(reference_pass: str, pairs: int, unet=None) -> config_dict.ConfigDict:
  """The demo's UNet (or `unet`) at 32 px, in float32 (bf16 compiles slower on CPUs)."""
  config = tiny_config.synthetic_config()
  if unet:
    config.model.unet = config_dict.ConfigDict(dict(unet))
  config.data.resolution = 32
  config.train.batch_pairs = pairs
  config.dpo.reference_pass = reference_pass
  return config


def test_step_flops_are_eight_forwards_per_pair_and_six_on_stored_reference_errors():
  """With two programs XLA counts every pass, so its FLOPs per step must match the model
  count: 8 UNet forward-equivalents per pair (a wrong multiplier is off by ≥ 12%). The step
  on stored reference errors runs the policy alone: it costs exactly the reference's two
  forwards per pair less (a reference pass left in would cost as much as the live step)."""
  # On 2 devices: XLA costs one device's share, the harness the whole step.
  live, precomputed = (bench.bench(_tiny_config("separate", 8), steps=1, warmup=0,
                                   devices=jax.devices()[:2], reference=reference)
                       for reference in ("live", "precomputed"))
  forward = live["forward_flops_per_image"]
  assert live["model_flops_per_step"] == 8 * 8 * forward
  assert precomputed["model_flops_per_step"] == 6 * 8 * forward
  # Backward ≈ 2 forwards up to the optimiser, norms and the loss: within 10%.
  assert live["flops_per_step"] / live["model_flops_per_step"] == pytest.approx(1, abs=0.1)
  saved = live["flops_per_step"] - precomputed["flops_per_step"]
  assert saved / (2 * 8 * forward) == pytest.approx(1, abs=0.02)
  assert live["pairs_per_sec"] == pytest.approx(8 / live["step_seconds"])
  assert live["mfu"] is None and live["devices"] == 2  # CPUs have no known peak.
  assert 0 < live["final_loss"] < 10
  # Random stored errors, unrelated to the policy's: a finite but large loss.
  assert precomputed["reference"] == "precomputed" and np.isfinite(precomputed["final_loss"])
  for result in (live, precomputed):
    assert result["peak_bytes_per_device"] > result["memory"]["temp"] > 0


@pytest.mark.slow
def test_shared_pass_counted_once_by_xla():
  """The shared pass runs both param sets through one loop body, which XLA counts once: its
  count falls short of the model count by about the reference's forwards (2 of 8). Through
  SDXL's batch (pooled embeddings, time ids), on the two-level SDXL UNet."""
  result = bench.bench(_tiny_config("shared", 2, tiny_models.SMALL_SDXL_UNET), steps=1,
                       warmup=0, devices=jax.devices()[:1])
  ratio = result["flops_per_step"] / result["model_flops_per_step"]
  assert 0.65 < ratio < 0.85, ratio


@pytest.mark.slow
def test_command_prints_json_last_and_profiles(tmp_path):
  done = run_module("dpo_jax.bench", "--config", "configs/synthetic.py", "--steps", "1",
                    "--warmup", "0", "--config.train.batch_pairs=2",
                    f"--profile={tmp_path / 'trace'}")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["batch_pairs"] == 2 and result["pairs_per_sec"] > 0
  assert result["profile"] == str(tmp_path / "trace")
  assert list((tmp_path / "trace").glob("plugins/profile/*/*.xplane.pb"))


def test_pipeline_config_needs_a_unet_shape():
  config = default_config.get_config()
  config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  with pytest.raises(bench.UserError, match="--unet"):
    bench.unet_config(config, None)
  assert bench.unet_config(config, "sd15")["cross_attention_dim"] == 768
