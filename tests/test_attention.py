"""layers.dot_product_attention (query blocks, FlashAttention's backward pass) against
PyTorch's scaled_dot_product_attention and its autograd (the oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpo_jax.models import layers


def _inputs(queries, keys, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, queries, heads, head_dim), np.float32)
  k, v = (rng.standard_normal((2, keys, heads, head_dim), np.float32) for _ in range(2))
  return q, k, v, rng.standard_normal(q.shape, np.float32)


def _torch(q, k, v, cotangent):
  """Output and (dq, dk, dv) of the cotangent, [B, T, N, H] as ours."""
  q, k, v = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).double().requires_grad_()
             for x in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
  out.backward(torch.from_numpy(cotangent.transpose(0, 2, 1, 3).copy()).double())
  as_ours = lambda x: x.detach().numpy().transpose(0, 2, 1, 3)
  return as_ours(out), tuple(as_ours(x.grad) for x in (q, k, v))


@jax.jit  # Traced once per shape: the tests that share a shape share a block budget.
def _output_and_grads(q, k, v, cotangent):
  out, vjp = jax.vjp(layers.dot_product_attention, q, k, v)
  return out, vjp(cotangent)


def _ours(q, k, v, cotangent, dtype=jnp.float32):
  out, grads = _output_and_grads(*(jnp.asarray(x, dtype) for x in (q, k, v, cotangent)))
  return np.asarray(out, np.float32), tuple(np.asarray(g, np.float32) for g in grads)


def _blocks_of_16(monkeypatch, keys):
  """Logits of 16 queries fill the budget (batch 2, 2 heads, float32)."""
  monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", 4 * 2 * 2 * 16 * keys)


@pytest.mark.parametrize("queries, keys", [(64, 64), (64, 7), (24, 24), (21, 21)])
def test_matches_torch_in_blocks_and_whole(monkeypatch, queries, keys):
  """64 queries run as 4 blocks of 16 (self and cross-attention), 24 as 2 blocks of 12; 21
  (odd) runs whole, over the budget."""
  _blocks_of_16(monkeypatch, keys)
  q, k, v, cotangent = _inputs(queries, keys)
  expected_out, expected_grads = _torch(q, k, v, cotangent)
  out, grads = _ours(q, k, v, cotangent)
  np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
  for grad, expected in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_stays_close(monkeypatch):
  _blocks_of_16(monkeypatch, 64)
  q, k, v, cotangent = _inputs(64, 64)
  expected_out, expected_grads = _torch(q, k, v, cotangent)
  out, grads = _ours(q, k, v, cotangent, jnp.bfloat16)
  for actual, expected in zip((out, *grads), (expected_out, *expected_grads)):
    assert np.abs(actual - expected).max() <= 0.02 * np.abs(expected).max()


def test_unset_means_ours_on_the_cpu_and_xlas_on_accelerators():
  assert layers.attention_implementation(None, 4096, 77, backend="cpu") == "blocked"
  for backend in ("gpu", "tpu"):
    assert layers.attention_implementation(None, 4096, 4096, backend=backend) is None
  # Asked for, each is what it says; cuDNN only where its kernel takes both lengths.
  assert layers.attention_implementation("xla", 4096, 4096, backend="cpu") == "xla"
  assert layers.attention_implementation("blocked", 64, 77, backend="gpu") == "blocked"
  assert layers.attention_implementation("cudnn", 4096, 4096, backend="gpu") == "cudnn"
  assert layers.attention_implementation("cudnn", 4096, 77, backend="gpu") is None


def test_a_unet_with_xlas_attention_equals_one_with_ours(monkeypatch):
  """The accelerators' path (XLA's attention) against the CPU's (ours) through a whole
  UNet, forward and parameter gradients: the diffusers oracle tests run ours on the CPU."""
  import tiny_models
  from dpo_jax.models import unet as unet_lib

  # Two levels: the first attends over the 8x8 latents, 64 image tokens in 4 blocks of 16.
  config = tiny_models.SMALL_SD15_UNET
  _blocks_of_16(monkeypatch, 64)
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.standard_normal((2, 8, 8, config["in_channels"]), np.float32))
  context = jnp.asarray(rng.standard_normal((2, 7, config["cross_attention_dim"]), np.float32))
  timesteps = jnp.array([3, 917])
  results = []
  # The two differ only in their attention kernel, which holds no params: one init serves
  # both (jitted and once: op-by-op init of a UNet took half a minute on a 2-core CPU).
  params = unet_lib.init_params(unet_lib.build_unet(config), jax.random.key(0))
  for implementation in ("xla", "blocked"):
    model = unet_lib.build_unet(config, attention_implementation=implementation)
    loss = lambda p, model=model: jnp.mean(
        model.apply({"params": p}, sample, timesteps, context) ** 2)
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (xla_loss, xla_grads), (our_loss, our_grads) = results
  assert float(our_loss) == pytest.approx(float(xla_loss), rel=1e-5)
  for xla_grad, our_grad in zip(jax.tree_util.tree_leaves(xla_grads),
                                jax.tree_util.tree_leaves(our_grads)):
    np.testing.assert_allclose(our_grad, xla_grad, rtol=1e-3,
                               atol=1e-5 * float(np.abs(xla_grad).max()) + 1e-8)


def test_a_pipeline_asked_for_ours_keeps_xlas_in_its_text_encoders(tmp_path):
  """'blocked' is the UNet's kernel: the CLIP text encoders (causal attention) stay XLA's."""
  import tiny_models
  from dpo_jax.models import pipeline

  tiny_models.make_pipeline("sd").save_pretrained(tmp_path / "pipe")
  pipe = pipeline.load_pipeline(str(tmp_path / "pipe"), attention_implementation="blocked")
  assert pipe.unet.attention_implementation == "blocked"
  assert all(encoder.attention_implementation == "xla" for encoder, _ in pipe.text_encoders)
