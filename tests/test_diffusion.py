"""dpo_jax.diffusion against diffusers' DDPMScheduler (PyTorch) as the oracle."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dpo_jax import diffusion
from dpo_jax.errors import UserError

SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CONFIGS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": SD15,
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear_zero_snr": {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    "scaled_linear_zero_snr": {**SD15, "rescale_betas_zero_snr": True,
                               "prediction_type": "v_prediction"},
    "cosine_zero_snr": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    "trained_betas": {"num_train_timesteps": 50,
                      "trained_betas": np.linspace(1e-3, 0.2, 50).tolist()},
    "short": {**SD15, "num_train_timesteps": 100},
}


def _both(config):
  return diffusion.NoiseSchedule.from_scheduler_config(config), DDPMScheduler(**config)


def _inputs(num_timesteps, shape=(6, 4, 8, 8), seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal(shape, dtype=np.float32)
  noise = rng.standard_normal(shape, dtype=np.float32)
  t = rng.integers(0, num_timesteps, shape[0])
  t[:2] = 0, num_timesteps - 1
  return x0, noise, t


@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers(name):
  ours, theirs = _both(CONFIGS[name])
  expected = theirs.alphas_cumprod.numpy()
  assert ours.alphas_cumprod.dtype == np.float32
  assert ours.alphas_cumprod.shape == expected.shape == (ours.num_train_timesteps,)
  np.testing.assert_allclose(ours.alphas_cumprod, expected, rtol=0, atol=1e-6)


def test_zero_snr_terminal_alpha_is_exactly_zero_like_ddpm():
  ours, theirs = _both(CONFIGS["scaled_linear_zero_snr"])
  assert theirs.alphas_cumprod[-1].item() == 0.0 == ours.alphas_cumprod[-1]
  assert float(diffusion.snr(ours, jnp.array([999]))[0]) == 0.0


@pytest.mark.parametrize("name", ["scaled_linear", "scaled_linear_zero_snr", "trained_betas"])
def test_add_noise_and_velocity_match_diffusers(name):
  ours, theirs = _both(CONFIGS[name])
  x0, noise, t = _inputs(ours.num_train_timesteps)
  torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(diffusion.add_noise(ours, x0, noise, t),
                             theirs.add_noise(*torch_args).numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(diffusion.velocity(ours, x0, noise, t),
                             theirs.get_velocity(*torch_args).numpy(), rtol=0, atol=1e-6)


def test_add_noise_any_layout_and_dtype():
  schedule = diffusion.NoiseSchedule.from_scheduler_config(SD15)
  x0, noise, t = _inputs(1000, shape=(3, 5))
  x_t = diffusion.add_noise(schedule, jnp.asarray(x0, jnp.bfloat16), noise, t)
  assert x_t.dtype == jnp.bfloat16 and x_t.shape == (3, 5)
  a = schedule.alphas_cumprod[t][:, None]
  expected = np.sqrt(a) * x0.astype(jnp.bfloat16).astype(np.float32) + np.sqrt(1 - a) * noise
  np.testing.assert_allclose(np.asarray(x_t, np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target(prediction_type):
  ours, theirs = _both({**SD15, "prediction_type": prediction_type})
  x0, noise, t = _inputs(1000)
  target = diffusion.training_target(ours, x0, noise, t)
  expected = noise if prediction_type == "epsilon" else theirs.get_velocity(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(target, expected, rtol=0, atol=1e-6)


def test_snr_by_hand():
  # Linear betas 0.1, 0.2, 0.3: ᾱ = 0.9, 0.72, 0.504.
  schedule = diffusion.NoiseSchedule.from_scheduler_config(
      {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.3, "num_train_timesteps": 3})
  np.testing.assert_allclose(diffusion.snr(schedule, jnp.array([0, 1, 2])),
                             [0.9 / 0.1, 0.72 / 0.28, 0.504 / 0.496], rtol=1e-5)


@pytest.mark.parametrize("config, words", [
    ({"prediction_type": "sample"}, ("prediction_type", "'sample'", "epsilon, v_prediction")),
    ({"beta_schedule": "sigmoid"}, ("beta_schedule", "'sigmoid'", "squaredcos_cap_v2")),
    ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, ("trained_betas", "2", "3")),
])
def test_bad_config_is_a_one_line_user_error(config, words):
  with pytest.raises(UserError) as error:
    diffusion.NoiseSchedule.from_scheduler_config(config)
  message = str(error.value)
  assert "\n" not in message and all(word in message for word in words), message
