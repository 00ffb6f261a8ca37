"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (the oracle), its folder
I/O, and the latent helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL

import tiny_models
from dpo_jax.errors import UserError
from dpo_jax.models import vae

SD_VAE = tiny_models.SD_VAE
# The other options: no quant convs and shifted latents (as the SD3/Flux VAE), no mid-block
# attention, three levels so an odd side appears inside the encoder.
PLAIN_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    scaling_factor=0.3611, shift_factor=0.1159)
VARIANTS = {"sd": SD_VAE, "plain": PLAIN_VAE}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved_vae(request, tmp_path_factory):
  torch.manual_seed(0)
  torch_model = tiny_models.perturb_(AutoencoderKL(**VARIANTS[request.param])).eval()
  folder = tmp_path_factory.mktemp(request.param) / "vae"
  torch_model.save_pretrained(folder)
  return torch_model, str(folder)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


def _torch_encode(model, images):
  with torch.no_grad():
    posterior = model.encode(_nchw(images)).latent_dist
  return _nhwc(posterior.mean), _nhwc(posterior.logvar)


def _torch_decode(model, latents):
  with torch.no_grad():
    return _nhwc(model.decode(_nchw(latents)).sample)


def _jax(model, params, method, x):
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
  return jax.tree_util.tree_map(np.asarray, run(params, jnp.asarray(x)))


def _images(size, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _latents(size, batch=2, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 4), np.float32)


@pytest.mark.parametrize("size", [32, 18])  # 18: odd sides after the first downsampling.
def test_float32_encode_matches_diffusers(saved_vae, size):
  torch_model, folder = saved_vae
  model, params = vae.load_vae(folder)
  expected_mean, expected_logvar = _torch_encode(torch_model, _images(size))
  mean, logvar = _jax(model, params, "encode", _images(size))
  assert mean.shape == expected_mean.shape and logvar.shape == expected_logvar.shape
  assert np.abs(expected_mean).max() > 0.1 and np.abs(expected_logvar).max() > 0.1
  np.testing.assert_allclose(mean, expected_mean, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, expected_logvar, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [8, 9])
def test_float32_decode_matches_diffusers(saved_vae, size):
  torch_model, folder = saved_vae
  model, params = vae.load_vae(folder)
  expected = _torch_decode(torch_model, _latents(size))
  actual = _jax(model, params, "decode", _latents(size))
  assert actual.shape == expected.shape
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close(saved_vae):
  """bf16 compute (params float32) is within 5% of the output scale of the float32 oracle, 1% on
  average: bf16 keeps 8 mantissa bits, and ~20 layers compound its rounding (seen: 3.4%, 0.5%)."""
  torch_model, folder = saved_vae
  model, params = vae.load_vae(folder, dtype=jnp.bfloat16)
  expected_mean, _ = _torch_encode(torch_model, _images(32))
  expected_images = _torch_decode(torch_model, _latents(8))
  mean, _ = _jax(model, params, "encode", _images(32))
  images = _jax(model, params, "decode", _latents(8))
  assert mean.dtype == images.dtype == np.float32
  for actual, expected in ((mean, expected_mean), (images, expected_images)):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 0.05 * scale
    assert np.abs(actual - expected).mean() <= 0.01 * scale


@pytest.mark.parametrize("shift, bound", [(100.0, 20.0), (-100.0, -30.0)])
def test_logvar_is_clipped_like_diffusers(saved_vae, shift, bound):
  _, folder = saved_vae
  model, params = vae.load_vae(folder)
  last = params["quant_conv"] if model.config.use_quant_conv else params["encoder"]["conv_out"]
  latent = model.config.latent_channels
  last["bias"] = last["bias"] + np.r_[np.zeros(latent), np.full(latent, shift)].astype(np.float32)
  _, logvar = _jax(model, params, "encode", _images(16))
  np.testing.assert_array_equal(logvar, bound)


def test_sample_latents_follows_the_formula():
  shape = (2, 32, 32, 4)
  mean = jnp.linspace(-3, 3, np.prod(shape)).reshape(shape)
  logvar = jnp.broadcast_to(jnp.array([-4.0, -1.0, 0.0, 2.0]), shape)
  rng = jax.random.key(7)
  sample = jax.jit(vae.sample_latents)(mean, logvar, rng)
  np.testing.assert_allclose(
      sample, mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, shape), rtol=1e-6, atol=1e-6)
  z = np.asarray((sample - mean) / jnp.exp(0.5 * logvar)).reshape(-1, 4)
  np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.05)  # 2048 draws: 4.5 sigma.
  np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.05)
  assert not np.allclose(sample, vae.sample_latents(mean, logvar, jax.random.key(8)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_latents_scale_and_shift_from_the_config(variant):
  config = vae.VAEConfig.from_diffusers(VARIANTS[variant])
  shift = VARIANTS[variant].get("shift_factor")
  assert config.shift_factor == shift
  latents = jnp.asarray(_latents(4))
  scaled = vae.to_model_latents(latents, config)
  np.testing.assert_allclose(scaled, (latents - (shift or 0.0)) * config.scaling_factor,
                             rtol=1e-6)
  np.testing.assert_allclose(vae.from_model_latents(scaled, config), latents, atol=1e-6)


def test_load_save_then_diffusers_load_is_bit_identical(saved_vae, tmp_path):
  torch_model, folder = saved_vae
  model, params = vae.load_vae(folder)
  vae.save_vae(model, params, str(tmp_path))
  reloaded = AutoencoderKL.from_pretrained(tmp_path)
  tiny_models.assert_same_tensors(torch_model, reloaded)
  tiny_models.assert_same_config(torch_model.config, reloaded.config)


_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def test_legacy_attention_names_load(tmp_path):
  """Old hub VAEs name the mid-block attention query/key/value/proj_attn, some with 1x1-conv
  weights; they load into the same params as the current names."""
  torch.manual_seed(0)
  torch_model = tiny_models.perturb_(AutoencoderKL(**SD_VAE))
  torch_model.save_pretrained(tmp_path / "current")
  legacy = {}
  for key, value in torch_model.state_dict().items():
    value = value.numpy()
    for current, old in _LEGACY.items():
      if f".attentions.0.{current}." in key:
        key = key.replace(f".{current}.", f".{old}.")
        value = value[:, :, None, None] if key.endswith("query.weight") else value
    legacy[key] = value
  assert sum(".proj_attn." in key or ".query." in key for key in legacy) == 8
  old = tmp_path / "legacy"
  old.mkdir()
  (old / "config.json").write_text((tmp_path / "current" / "config.json").read_text())
  safetensors.numpy.save_file(legacy, old / "diffusion_pytorch_model.safetensors")
  _, expected = vae.load_vae(str(tmp_path / "current"))
  _, actual = vae.load_vae(str(old))
  jax.tree_util.tree_map(np.testing.assert_array_equal, actual, expected)


@pytest.mark.parametrize("key, value", [
    ("act_fn", "gelu"),
    ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
    ("up_block_types", ("UpDecoderBlock2D",)),
    ("latents_mean", (0.1, 0.2, 0.3, 0.4)),
    ("layers_per_block", (1, 2)),
    ("_class_name", "AutoencoderTiny"),
    ("some_future_option", 3),
])
def test_unsupported_config_value_names_the_key(key, value):
  with pytest.raises(UserError) as error:
    vae.build_vae(dict(SD_VAE, **{key: value}))
  message = str(error.value)
  assert "\n" not in message and key in message
