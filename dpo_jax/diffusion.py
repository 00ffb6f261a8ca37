"""The DDPM training noise schedule of a diffusers `scheduler/scheduler_config.json`.

The schedule is built in numpy exactly as diffusers' `DDPMScheduler.__init__` builds it (float32
betas, float32 rescaling), so `alphas_cumprod` agrees with the PyTorch pipeline the model was
trained with. The per-step functions are jax.numpy and jit-safe; the schedule enters a jitted
function as a constant.
"""
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import UserError

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction")
# The SD 1.x/2.x (and SDXL) training schedule, for random-init runs; a pipeline brings its own.
DEFAULT_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _cumprod(x: np.ndarray) -> np.ndarray:
  # torch's CPU cumprod accumulates float32 in float64; a float32 accumulator drifts ~3e-7 away.
  return np.cumprod(x, dtype=np.float64).astype(np.float32)


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar` with the (GLIDE) cosine alpha_bar."""
  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                       max_beta) for i in range(num_timesteps)], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """diffusers' `rescale_zero_terminal_snr` (arXiv:2305.08891, Algorithm 1), in float32 like it."""
  alphas_bar_sqrt = np.sqrt(_cumprod(1 - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1 - alphas


def _betas(config: Mapping[str, Any], num_timesteps: int) -> np.ndarray:
  if config.get("trained_betas") is not None:
    return np.asarray(config["trained_betas"], dtype=np.float32)
  schedule = config.get("beta_schedule", "linear")
  start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
  if schedule == "linear":
    return np.linspace(start, end, num_timesteps).astype(np.float32)
  if schedule == "scaled_linear":
    # Squared in float32, as diffusers does (latent diffusion's schedule).
    return np.linspace(start**0.5, end**0.5, num_timesteps).astype(np.float32)**2
  if schedule == "squaredcos_cap_v2":
    return _cosine_betas(num_timesteps)
  raise UserError(f"scheduler_config.json: beta_schedule {schedule!r} is not supported; "
                  f"use one of {', '.join(_BETA_SCHEDULES)}")


@dataclasses.dataclass(frozen=True, eq=False)  # identity eq/hash: usable as a static jit argument
class NoiseSchedule:
  """The forward (noising) process a model was trained with.

  Attributes:
    alphas_cumprod: float32 [num_train_timesteps], ᾱ_t; read-only.
    prediction_type: what the model predicts, 'epsilon' or 'v_prediction'.
    num_train_timesteps: number of discrete training timesteps (t in [0, num_train_timesteps)).
  """
  alphas_cumprod: np.ndarray
  prediction_type: str
  num_train_timesteps: int

  @classmethod
  def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
    """Builds the schedule from a parsed diffusers `scheduler_config.json`.

    Raises:
      UserError: for a prediction type or beta schedule this package cannot train, or
        `trained_betas` whose length disagrees with `num_train_timesteps`.
    """
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTION_TYPES:
      raise UserError(f"scheduler_config.json: prediction_type {prediction_type!r} is not "
                      f"supported; use one of {', '.join(_PREDICTION_TYPES)}")
    num_timesteps = config.get("num_train_timesteps", 1000)
    betas = _betas(config, num_timesteps)
    if len(betas) != num_timesteps:
      raise UserError(f"scheduler_config.json: trained_betas has {len(betas)} values but "
                      f"num_train_timesteps is {num_timesteps}; make them agree")
    if config.get("rescale_betas_zero_snr", False):
      # DDPMScheduler keeps the resulting ᾱ_T = 0 exactly (Euler-type samplers clamp it to
      # 2**-24; that is their sampling concern, not training's).
      betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod(1 - betas)
    alphas_cumprod.flags.writeable = False
    return cls(alphas_cumprod, prediction_type, num_timesteps)


def _coefficients(schedule: NoiseSchedule, timesteps: jax.Array,
                  ndim: int) -> tuple[jax.Array, jax.Array]:
  """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) per sample, shaped to broadcast over an ndim-dim batch."""
  alpha_bar = jnp.asarray(schedule.alphas_cumprod)[timesteps].reshape((-1,) + (1,) * (ndim - 1))
  return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε for a batch (any layout, batch axis first).

  Computed in float32 and returned in x0's dtype; timesteps is an int array of shape [batch].
  """
  signal, sigma = _coefficients(schedule, timesteps, x0.ndim)
  x_t = signal * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
  return x_t.astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
             timesteps: jax.Array) -> jax.Array:
  """v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (diffusers' `get_velocity`), in x0's dtype."""
  signal, sigma = _coefficients(schedule, timesteps, x0.ndim)
  v = signal * noise.astype(jnp.float32) - sigma * x0.astype(jnp.float32)
  return v.astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                    timesteps: jax.Array) -> jax.Array:
  """What the model output is regressed on: ε for 'epsilon' models, v for 'v_prediction'."""
  if schedule.prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, timesteps)
  return noise.astype(x0.dtype)


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), float32, shaped like timesteps."""
  alpha_bar = jnp.asarray(schedule.alphas_cumprod)[timesteps]
  return alpha_bar / (1 - alpha_bar)
