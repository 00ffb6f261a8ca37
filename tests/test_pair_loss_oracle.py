"""The train step's pair loss end to end against the official Diffusion-DPO loss in PyTorch:
pixels through diffusers' VAE (posterior sample × scaling factor) and the pipeline's text
encoders, one (t, ε) shared by each pair's winner and loser, SDXL's constant time ids, the
policy and the reference as diffusers UNets on the same weights and draws."""
import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from dpo_jax import default_config, encode, train
from dpo_jax.models import weights
from dpo_jax.train_step import make_pair_loss, pair_keys, pair_noise
from test_loss import _official_dpo_loss

PAIRS, RESOLUTION, SEED, BETA = 3, 32, 11, 400.0
CAPTIONS = ["a photo of a cat", "", "photo"]


def _policy(params):
  """A policy that differs from the reference everywhere, by a fixed pattern."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(5)
  return jax.tree_util.tree_unflatten(
      treedef, [p + 0.02 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves])


def _draws(batch, latent_shape, num_train_timesteps):
  """(t, ε, the VAE posterior's unit normal z) as the step draws them: from one key per pair
  folded from (seed, epoch, pair id); z from the pair key folded with 1, split per image."""
  keys = pair_keys(SEED, batch["epochs"], batch["pair_ids"])
  timesteps, noise, _ = pair_noise(keys, latent_shape, num_train_timesteps)
  z = jnp.stack([jnp.stack([jax.random.normal(k, latent_shape)
                            for k in jax.random.split(jax.random.fold_in(key, 1))])
                 for key in keys])
  return np.asarray(timesteps), np.asarray(noise), np.asarray(z)


def _official(torch_pipe, kind, policy_params, batch, draws):
  """train.py's DPO branch on winners-then-losers, fed our draws."""
  timesteps, noise, z = draws
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x))
  nchw = lambda x: to_torch(x).permute(0, 3, 1, 2)
  pixels = batch["pixels"]  # [B, 2, R, R, 3]: winners first, as feed_pixel_values.
  feed = np.concatenate([pixels[:, 0], pixels[:, 1]])
  z_feed = np.concatenate([z[:, 0], z[:, 1]])
  reference = torch_pipe.unet
  policy = tiny_models.make_unet(dict(reference.config))
  policy.load_state_dict({k: to_torch(v) for k, v in
                          weights.params_to_state_dict(policy_params).items()})
  with torch.no_grad():
    posterior = torch_pipe.vae.encode(nchw(feed)).latent_dist
    latents = (posterior.mean + posterior.std * nchw(z_feed)) * torch_pipe.vae.config.scaling_factor
    noise_t = nchw(noise).repeat(2, 1, 1, 1)
    t = to_torch(timesteps).long().repeat(2)
    scheduler = diffusers.DDPMScheduler.from_config(torch_pipe.scheduler.config)
    noisy = scheduler.add_noise(latents, noise_t, t)
    embeds = torch_pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
    context = embeds[0].repeat(2, 1, 1)
    added = None
    if kind == "sdxl":
      time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 2 * PAIRS,
                              dtype=torch.float32)
      added = {"text_embeds": embeds[2].repeat(2, 1), "time_ids": time_ids}
  wrap = lambda unet: (lambda *args: unet(*args, added_cond_kwargs=added))
  loss, accuracy, margin, _ = _official_dpo_loss(wrap(policy), wrap(reference), noisy, t,
                                                 context, noise_t, BETA)
  return float(loss), float(accuracy), float(margin)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pair_loss_equals_the_official_loss_on_the_same_weights_and_draws(kind, tmp_path):
  torch_pipe = tiny_models.make_pipeline(kind)
  torch_pipe.save_pretrained(tmp_path / "pipeline")
  config = default_config.get_config()
  config.model.pretrained = str(tmp_path / "pipeline")
  models = train.load_models(config)
  rng = np.random.default_rng(0)
  ids = encode.tokenize_prompts(models.tokenizers, CAPTIONS)
  batch = {"pixels": rng.uniform(-1, 1, (PAIRS, 2, RESOLUTION, RESOLUTION, 3)).astype(np.float32),
           "pair_ids": np.array([4, 0, 9], np.int32), "epochs": np.array([0, 2, 1], np.int32),
           "original_size": np.full((PAIRS, 2, 2), 50, np.int32),
           "crop_top_left": np.full((PAIRS, 2, 2), 3, np.int32),
           **{f"input_ids_{i}": x for i, x in enumerate(ids)}}
  policy = _policy(models.initial_params)
  encoded = jax.jit(functools.partial(encode.encoded_batch, models.encoders))(
      models.frozen_params, batch)
  pair_loss = jax.jit(make_pair_loss(models.unet, models.schedule, beta=BETA, loss_name="dpo",
                                     seed=SEED, encoders=models.encoders))
  loss, metrics = pair_loss(policy, models.initial_params, encoded)

  latent_shape = tuple(encoded["latent_mean"].shape[2:])
  draws = _draws(batch, latent_shape, models.schedule.num_train_timesteps)
  expected_loss, expected_accuracy, expected_margin = _official(torch_pipe, kind, policy, batch,
                                                                draws)
  assert abs(expected_loss - np.log(2)) > 0.01  # The policy moved: the loss says something.
  np.testing.assert_allclose(float(loss), expected_loss, rtol=2e-4)
  np.testing.assert_allclose(float(metrics["reward_margin"]), expected_margin, rtol=2e-3,
                             atol=1e-6)
  assert float(metrics["implicit_acc"]) == expected_accuracy
