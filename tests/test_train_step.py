"""The jitted step's pieces: what SFT runs, and how each pair's (t, ε) is drawn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from dpo_jax import optim, parallel, train
from dpo_jax.errors import UserError
from dpo_jax.train_step import NoiseOptions, make_pair_loss, make_train_step, pair_keys, pair_noise


def _step_flops(loss_name: str, reference_pass: str, pairs: int = 4, size: int = 32) -> float:
  config = tiny_config.synthetic_config()
  # XLA's attention: the CPU's own (query blocks in a loop) would be counted once per loop
  # by XLA's cost analysis, as the shared pass is.
  config.model.attention_implementation = "xla"
  models = train.load_models(config)
  optimizer = optim.make_optimizer(config)
  state = jax.eval_shape(lambda p: train._initial_state(p, None, optimizer, config),
                         models.initial_params)
  mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
  pair_loss = make_pair_loss(models.unet, models.schedule, beta=5000.0, loss_name=loss_name,
                             seed=0, reference_pass=reference_pass)
  step = make_train_step(pair_loss, optimizer,
                         state_shardings=parallel.state_shardings(state, mesh, 2**18),
                         batch_sharding=parallel.batch_sharding(mesh))
  struct = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  batch = {"latents": struct((pairs, 2, size, size, 4)), "context": struct((pairs, 8, 32)),
           "pair_ids": struct((pairs,), jnp.int32)}
  # The lowered program's count, before XLA optimises it: what our step asks for (XLA can
  # only remove work from it), without a compile.
  return step.lower(state, batch).cost_analysis()["flops"]


def test_sft_step_runs_the_unet_on_the_winners_alone():
  """SFT: forward and backward on B winners = 3 forward-equivalents per pair. DPO: forward and
  backward on 2B images plus the reference's forward on 2B = 8. (The 'separate' reference
  pass is counted: XLA's cost analysis counts the 'shared' pass's loop body once.)"""
  ratio = _step_flops("sft", "shared") / _step_flops("dpo", "separate")
  assert ratio == pytest.approx(3 / 8, abs=0.01)


def _draw(options: NoiseOptions, pairs: int = 64, shape=(6, 5, 4)):
  keys = pair_keys(3, jnp.zeros(pairs, jnp.int32), jnp.arange(pairs))
  return [np.asarray(x) for x in pair_noise(keys, shape, 1000, options)]


def test_default_noise_is_standard_normal_at_any_timestep_and_the_input_noise_is_the_target():
  timesteps, noise, input_noise = _draw(NoiseOptions())
  assert timesteps.min() >= 0 and timesteps.max() < 1000 and len(set(timesteps)) > 50
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  np.testing.assert_array_equal(input_noise, noise)


def test_turbo_timesteps_are_drawn_from_the_given_set_only():
  timesteps, _, _ = _draw(NoiseOptions(timesteps=(249, 499, 749, 999)), pairs=256)
  assert set(timesteps) == {249, 499, 749, 999}


def test_noise_offset_shifts_each_channel_by_one_draw_and_keeps_the_target():
  """The official --noise_offset: ε += offset · N(0, 1) per (image, channel), constant over
  the pixels; the input noise is that same ε."""
  _, base, _ = _draw(NoiseOptions())
  _, noise, input_noise = _draw(NoiseOptions(offset=0.1))
  shift = noise - base
  np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)
  per_channel = shift[:, 0, 0, :]
  assert 0.07 < per_channel.std() < 0.13 and len(np.unique(per_channel.round(6))) > 200
  np.testing.assert_array_equal(input_noise, noise)


def test_input_perturbation_noises_the_input_only():
  """The official --input_perturbation: the input uses ε + p · N(0, I), the target stays ε."""
  _, base, _ = _draw(NoiseOptions())
  _, noise, input_noise = _draw(NoiseOptions(input_perturbation=0.1))
  np.testing.assert_array_equal(noise, base)
  perturbation = input_noise - noise
  assert abs(perturbation.std() - 0.1) < 0.005 and abs(perturbation.mean()) < 0.005


def test_zero_terminal_snr_and_timestep_sets_are_checked_against_the_schedule():
  config = tiny_config.synthetic_config()
  config.diffusion.zero_terminal_snr = True
  schedule = train.load_models(config).schedule
  assert schedule.alphas_cumprod[-1] == 0.0 and schedule.alphas_cumprod[0] > 0.99
  config.diffusion.timesteps = "249,499,749,999"
  assert train.noise_options(config).timesteps == (249, 499, 749, 999)
  for bad, words in (("250,1000", "goes past the schedule's 1000"),
                     ("249;499", "comma-separated integers"), ("-1,5", "negative")):
    config.diffusion.timesteps = bad
    with pytest.raises(UserError, match=words):
      train.load_models(config)
