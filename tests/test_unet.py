"""The Flax UNet against diffusers' PyTorch UNet2DConditionModel (the oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from dpo_jax.models import unet as unet_lib

VARIANTS = {
    "sd15": tiny_models.SD15_UNET,
    "sd21": tiny_models.SD21_UNET,
    "sdxl": tiny_models.SDXL_UNET,
}


def _inputs(config, batch=2, size=16, tokens=7, seed=0):
  rng = np.random.default_rng(seed)
  inputs = dict(
      sample=rng.standard_normal((batch, config["in_channels"], size, size), np.float32),
      timesteps=np.array([3, 917][:batch], np.int64),
      context=rng.standard_normal((batch, tokens, config["cross_attention_dim"]), np.float32))
  if config.get("addition_embed_type") == "text_time":
    inputs["text_embeds"] = rng.standard_normal((batch, tiny_models.SDXL_TEXT_EMBED_DIM),
                                                np.float32)
    inputs["time_ids"] = np.tile(np.array([[size * 8, size * 8, 3, 5, size * 8, size * 8]],
                                          np.float32), (batch, 1))
  return inputs


def _torch_forward(model, inputs):
  added = None
  if "text_embeds" in inputs:
    added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
             "time_ids": torch.from_numpy(inputs["time_ids"])}
  with torch.no_grad():
    out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample
  return out.numpy()


def _jax_forward(model, params, inputs):
  extra = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
  sample = jnp.asarray(inputs["sample"]).transpose(0, 2, 3, 1)
  out = jax.jit(model.apply)({"params": params}, sample, jnp.asarray(inputs["timesteps"]),
                             jnp.asarray(inputs["context"]), **extra)
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved_unet(request, tmp_path_factory):
  config = VARIANTS[request.param]
  torch_model = tiny_models.make_unet(config)
  folder = tmp_path_factory.mktemp(request.param) / "unet"
  torch_model.save_pretrained(folder)
  return config, torch_model, str(folder)


@pytest.mark.parametrize("size", [16, 10])  # 10: odd side at the lowest level (5 -> 3 -> 5).
def test_float32_forward_matches_diffusers(saved_unet, size):
  config, torch_model, folder = saved_unet
  model, params = unet_lib.load_unet(folder)
  inputs = _inputs(config, size=size)
  expected = _torch_forward(torch_model, inputs)
  actual = _jax_forward(model, params, inputs)
  assert actual.shape == expected.shape
  assert np.abs(expected).max() > 0.1  # The comparison is not between two near-zero tensors.
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close(saved_unet):
  """bf16 compute (params float32) is within 5% of the output scale of the float32 oracle:
  bf16 keeps 8 mantissa bits, and ~40 layers compound its rounding."""
  config, torch_model, folder = saved_unet
  model, params = unet_lib.load_unet(folder, dtype=jnp.bfloat16)
  inputs = _inputs(config)
  expected = _torch_forward(torch_model, inputs)
  actual = _jax_forward(model, params, inputs)
  scale = np.abs(expected).max()
  assert np.abs(actual - expected).max() <= 0.05 * scale
  assert np.abs(actual - expected).mean() <= 0.01 * scale


@pytest.mark.slow
def test_remat_changes_nothing_but_memory(tmp_path):
  config = tiny_models.SMALL_SD21_UNET  # The cheapest to differentiate three times.
  tiny_models.make_unet(config).save_pretrained(tmp_path)
  model, params = unet_lib.load_unet(str(tmp_path))
  remat_model, _ = unet_lib.load_unet(str(tmp_path), remat=True)
  dots_model, _ = unet_lib.load_unet(str(tmp_path), remat=True, remat_policy="dots")
  inputs = _inputs(config, batch=1, size=8)
  sample = jnp.asarray(inputs["sample"]).transpose(0, 2, 3, 1)
  extra = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}

  def loss(m, p):
    out = m.apply({"params": p}, sample, jnp.asarray(inputs["timesteps"]),
                  jnp.asarray(inputs["context"]), **extra)
    return jnp.mean(out**2)

  # Jitted: op-by-op dispatch of three UNet gradients took a minute on a 2-core CPU.
  grads = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  for other in (remat_model, dots_model):
    other_grads = jax.jit(jax.grad(lambda p, other=other: loss(other, p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(other_grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_cudnn_only_where_its_kernel_takes_the_lengths(monkeypatch):
  """With 'cudnn' requested, image self-attention over a multiple of 64 tokens gets cuDNN's
  kernel; the text cross-attention (7 tokens) and the mid block's 4x4 = 16 tokens get XLA's
  (cuDNN refused SD's 77 text tokens on an H200)."""
  seen = []

  def record(q, k, v, implementation=None, **kwargs):
    seen.append((q.shape[1], k.shape[1], implementation))
    return jnp.zeros(q.shape, q.dtype)

  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  config = tiny_models.SD15_UNET
  model = unet_lib.build_unet(config, attention_implementation="cudnn")
  inputs = _inputs(config, size=16)
  sample = jnp.transpose(inputs["sample"], (0, 2, 3, 1))  # 16x16 latents: 256, 64 tokens.
  jax.eval_shape(lambda: model.init(jax.random.key(0), sample, inputs["timesteps"],
                                    inputs["context"]))
  assert {(q, k, impl) for q, k, impl in seen} == {
      (256, 256, "cudnn"), (64, 64, "cudnn"), (16, 16, None),
      (256, 7, None), (64, 7, None), (16, 7, None)}
