"""`dpo_jax.bench --torch`: the official PyTorch Diffusion-DPO step timed beside the JAX one, on
the same UNet config and batch shapes."""
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ml_collections import config_dict

import tiny_config
import tiny_models
from dpo_jax import bench, bench_torch, loss as losses
from subprocesses import run, run_module

SYNTHETIC_UNET = tiny_config.synthetic_config().model.unet.to_dict()


def _tiny_config(pairs: int = 2, unet=None) -> config_dict.ConfigDict:
  """configs/synthetic.py's UNet (or `unet`) at 32 px (4×4 latents), float32."""
  config = tiny_config.synthetic_config()
  if unet:
    config.model.unet = config_dict.ConfigDict(dict(unet))
  config.data.resolution = 32
  config.train.batch_pairs = pairs
  return config


def _torch_bench(unet, pooled_width=None, **options):
  arguments = dict(pairs=2, latent_size=4, context_length=77,
                   context_width=unet["cross_attention_dim"], pooled_width=pooled_width,
                   beta=5000.0, lr=1e-6, weight_decay=1e-2, grad_clip=1.0, bf16=False, steps=1,
                   warmup=0, seed=0)
  return bench_torch.torch_bench(unet, **{**arguments, **options})


@pytest.mark.parametrize("unet, pooled_width", [
    (SYNTHETIC_UNET, None), (tiny_models.SDXL_UNET, tiny_models.SDXL_TEXT_EMBED_DIM)],
    ids=["sd", "sdxl"])
def test_first_step_loss_is_ln2(unet, pooled_width):
  """Policy and reference start equal, so every pair's inside term is 0 and the loss ln 2; the
  AdamW step then moves the policy off it (SD's shape: two steps). SDXL's shape needs the
  added conditions."""
  warmup = 0 if pooled_width else 1
  result = _torch_bench(unet, pooled_width, warmup=warmup)
  # Not bit-exact on every host: the policy's forward runs under autograd and the
  # reference's under no_grad, for which oneDNN may choose other kernels (an AVX-512 host
  # gave 0.69307 for SDXL's shape), and β = 5000 lifts their float32 rounding into the loss.
  # A reference that was not the policy's copy would be off by orders more.
  assert result["torch_first_loss"] == pytest.approx(math.log(2), abs=1e-3)
  if warmup:
    assert result["torch_final_loss"] != result["torch_first_loss"]
  assert result["torch_pairs_per_sec"] == pytest.approx(2 / result["torch_step_seconds"])
  assert result["torch_device"] == "cpu" and result["torch_dtype"] == "float32"
  assert result["torch_peak_bytes"] is None


def test_official_loss_by_hand():
  """Two pairs of [C, H, W] = [1, 1, 2] predictions against a target of ones, winners first.
  Per-image MSEs: policy w (2, 0), l (1, 2.5); reference w (0, 1), l (0, 0.5). Per pair,
  (mse_w − mse_l) − (ref_w − ref_l) = (1 − 0, −2.5 − 0.5) = (1, −3); with β = 1 the inside
  terms −½β·that are (−0.5, 1.5), and the loss is the mean of log(1 + e^−inside)."""
  column = lambda *images: torch.tensor(images, dtype=torch.float32).reshape(4, 1, 1, 2)
  policy = column([1, 3], [1, 1], [2, 2], [0, 3])
  reference = column([1, 1], [2, 0], [1, 1], [1, 2])
  loss = bench_torch.official_dpo_loss(policy, reference, torch.ones(4, 1, 1, 2), beta=1.0)
  expected = (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.5))) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_official_loss_equals_ours():
  """The same per-image errors through dpo_jax.loss.dpo_loss give the same loss, and only the
  policy's prediction gets a gradient."""
  rng = np.random.default_rng(0)
  policy, reference, target = (rng.standard_normal((6, 4, 4, 4), dtype=np.float32)
                               for _ in range(3))
  policy_pred = torch.tensor(policy, requires_grad=True)
  reference_pred = torch.tensor(reference, requires_grad=True)
  loss = bench_torch.official_dpo_loss(policy_pred, reference_pred, torch.tensor(target), 25.0)
  loss.backward()
  errors = lambda pred: losses.per_sample_error(jnp.asarray(pred), jnp.asarray(target))
  ours, _ = losses.dpo_loss(errors(policy), errors(reference), 25.0)
  assert 0.1 < float(ours) < 10  # Away from saturation: every pair counts.
  assert float(loss.detach()) == pytest.approx(float(ours), rel=1e-5)
  assert policy_pred.grad.abs().sum() > 0 and reference_pred.grad is None


@pytest.mark.parametrize("unet", [None, tiny_models.SDXL_UNET], ids=["sd", "sdxl"])
def test_reference_gets_encoded_batch_shapes(monkeypatch, unet):
  """bench hands PyTorch the UNet config, batch, latent and text shapes its JAX batches have."""
  config = _tiny_config(2, unet)
  config.optim.peak_lr = 3e-6
  models = bench.random_models(config, None)
  batch = bench.encoded_batch(models, 2, 32, seed=0)
  seen = {}
  monkeypatch.setattr(bench_torch, "torch_bench", lambda *a, **k: seen.update(a=a, k=k) or {})
  bench.torch_reference(config, None, models, steps=3, warmup=1)
  options = seen["k"]
  assert seen["a"] == (bench.unet_config(config, None),)
  pairs, _, size, _, channels = batch["latent_mean"].shape
  assert (options["pairs"], options["latent_size"], channels) == (2, size, 4)
  assert (options["pairs"], options["context_length"], options["context_width"]) == \
      batch["context"].shape
  assert options["pooled_width"] == (batch["pooled"].shape[1] if unet else None)
  assert (options["lr"], options["weight_decay"], options["grad_clip"]) == (3e-6, 1e-2, 1.0)
  assert (options["beta"], options["bf16"], options["steps"], options["warmup"]) == \
      (5000.0, False, 3, 1)


def test_bench_reports_torch_and_speedup():
  result = bench.bench(_tiny_config(), steps=1, warmup=0, devices=jax.devices()[:1],
                       torch=True)
  assert result["pairs_per_sec"] > 0 and result["torch_pairs_per_sec"] > 0
  assert result["speedup"] == pytest.approx(result["pairs_per_sec"]
                                            / result["torch_pairs_per_sec"])
  assert result["torch_first_loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert result["torch_device"] == "cpu" and result["torch_dtype"] == "float32"
  assert result["final_loss"] > 0  # The JAX side is all there too.


def test_missing_torch_is_one_line_user_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails.
  monkeypatch.delitem(sys.modules, "dpo_jax.bench_torch")
  with pytest.raises(bench.UserError, match=r"pip install torch==2\.13\.0") as raised:
    bench.bench(_tiny_config(), steps=1, warmup=0, torch=True)
  assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_bench_without_torch_flag_imports_no_torch():
  done = run([sys.executable, "-c", "import sys, dpo_jax.bench; "
              "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"])
  assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_command_prints_torch_json_last():
  done = run_module("dpo_jax.bench", "--config", "configs/synthetic.py", "--steps", "1",
                    "--warmup", "0", "--config.train.batch_pairs=2",
                    "--config.data.resolution=32", "--torch")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["torch_pairs_per_sec"] > 0 and result["batch_pairs"] == 2
