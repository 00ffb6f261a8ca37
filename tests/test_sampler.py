"""DDIM sampling with classifier-free guidance and SDEdit against diffusers' pipelines with
`DDIMScheduler` (the oracles), from the same initial latents and noise."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from dpo_jax import encode, sampler
from dpo_jax.errors import UserError
from dpo_jax.models import pipeline as pipeline_lib

PROMPTS = ["a photo of a cat", "photo"]
SEEDS = [3, 11]
STEPS, GUIDANCE = 6, 7.5
# Float32 on both sides; what differs is the order of float32 sums (XLA's convolutions and
# matmuls against PyTorch's), compounded over the steps through guidance ×7.5: the final
# latents (unit scale) agree to ~1e-3 (2e-3 allowed); the images, in [0, 1] after the VAE,
# to 1e-3, a quarter of one 8-bit level.
LATENT_ATOL, ATOL = 2e-3, 1e-3


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipelines(request, tmp_path_factory):
  """(diffusers pipeline with DDIMScheduler, our Pipeline of the same folder). The folder
  holds the DDIM config with clip_sample=False, as the releases' scheduler configs say (the
  diffusers SD pipelines also force it at construction)."""
  torch_pipe = tiny_models.make_pipeline(request.param)
  torch_pipe.scheduler = diffusers.DDIMScheduler.from_config(torch_pipe.scheduler.config,
                                                             clip_sample=False)
  folder = str(tmp_path_factory.mktemp(request.param) / "pipeline")
  torch_pipe.save_pretrained(folder, safe_serialization=True)
  return torch_pipe, pipeline_lib.load_pipeline(folder)


def _sizes(pipe):
  latent = pipe.unet_params["conv_in"]["kernel"].shape  # (3, 3, C, F)
  size = 16  # The tiny UNet's sample_size.
  return size, size * pipe.vae.config.downscale_factor, latent[2]


def _ours(pipe, prompts, latents, timesteps, total_steps, resolution):
  encoders, frozen = encode.pipeline_encoders(pipe)
  ids = encode.tokenize_prompts(pipe.tokenizers, prompts)
  uncond = encode.tokenize_prompts(pipe.tokenizers, [""] * len(prompts))
  settings = sampler.DDIMSettings.from_scheduler_config(pipe.scheduler_config)

  @jax.jit
  def run(unet_params, frozen, latents, ids, uncond):
    conditioning = sampler.prompt_conditioning(
        encoders, frozen["text_encoders"], ids, uncond, resolution=(resolution, resolution),
        zero_uncond=pipe.kind == "sdxl")
    out = sampler.denoise(pipe.unet, unet_params, pipe.noise_schedule, settings, latents,
                          conditioning, jnp.asarray(timesteps), total_steps=total_steps,
                          guidance_scale=GUIDANCE)
    return out, sampler.decode_images(encoders.vae, frozen["vae"], out)

  return run(pipe.unet_params, frozen, latents, ids, uncond)


def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def test_text_to_image_equals_diffusers_ddim_with_guidance(pipelines):
  torch_pipe, pipe = pipelines
  size, resolution, channels = _sizes(pipe)
  latents = sampler.initial_noise(jnp.asarray(SEEDS), (size, size, channels))
  settings = sampler.DDIMSettings.from_scheduler_config(pipe.scheduler_config)
  timesteps = sampler.ddim_timesteps(pipe.noise_schedule.num_train_timesteps, STEPS, settings)
  torch_pipe.scheduler.set_timesteps(STEPS)
  np.testing.assert_array_equal(timesteps, torch_pipe.scheduler.timesteps.numpy())

  our_latents, our_images = _ours(pipe, PROMPTS, latents, timesteps, STEPS, resolution)
  with torch.no_grad():
    run = lambda output_type: torch_pipe(
        PROMPTS, height=resolution, width=resolution, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, latents=_nchw(latents), output_type=output_type).images
    their_latents, their_images = run("latent"), run("np")
  np.testing.assert_allclose(our_latents, their_latents.permute(0, 2, 3, 1).numpy(),
                             rtol=0, atol=LATENT_ATOL)
  np.testing.assert_allclose(our_images, their_images, rtol=0, atol=ATOL)
  # Guidance and the prompt matter at this tolerance: the images are not near-constant.
  assert np.abs(np.asarray(our_images[0]) - np.asarray(our_images[1])).max() > 50 * ATOL


# SDEdit's oracle is StableDiffusionImg2ImgPipeline (SD 1.x/2.x): SDXL's img2img pipeline
# adds aesthetic-score conditioning for its refiner, which the sampler does not model.
@pytest.mark.parametrize("pipelines", ["sd"], indirect=True)
def test_sdedit_equals_diffusers_img2img(pipelines, monkeypatch):
  torch_pipe, pipe = pipelines
  size, resolution, channels = _sizes(pipe)
  strength = 0.5
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, resolution, resolution, 3)).astype(np.float32)
  encoders, frozen = encode.pipeline_encoders(pipe)
  mean, logvar = encode.encode_images(encoders.vae, frozen["vae"], jnp.asarray(images))
  keys = jax.vmap(jax.random.key)(jnp.asarray(SEEDS))
  posterior = jax.vmap(lambda m, lv, k: m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape))(
      mean, logvar, keys)
  noise = sampler.initial_noise(jnp.asarray(SEEDS) + 1000, (size, size, channels))

  settings = sampler.DDIMSettings.from_scheduler_config(pipe.scheduler_config)
  all_steps = sampler.ddim_timesteps(pipe.noise_schedule.num_train_timesteps, STEPS, settings)
  tail = sampler.sdedit_timesteps(all_steps, strength)
  assert len(tail) == 3
  start = sampler.sdedit_start(pipe.noise_schedule,
                               posterior * pipe.vae.config.scaling_factor, noise, tail[0])
  _, ours = _ours(pipe, PROMPTS, start, tail, STEPS, resolution)

  # diffusers draws the posterior sample and the noise with torch's generator: hand it ours.
  module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
  monkeypatch.setattr(module, "retrieve_latents", lambda *a, **k: _nchw(posterior))
  monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: _nchw(noise))
  img2img = diffusers.StableDiffusionImg2ImgPipeline(**torch_pipe.components)
  with torch.no_grad():
    theirs = img2img(PROMPTS, image=_nchw(images), strength=strength, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, output_type="np").images
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("spacing, offset, expected", [
    ("leading", 1, [801, 601, 401, 201, 1]),
    ("trailing", 0, [999, 799, 599, 399, 199]),
    ("linspace", 0, [999, 749, 500, 250, 0]),
])
def test_timesteps_follow_diffusers(spacing, offset, expected):
  settings = sampler.DDIMSettings(timestep_spacing=spacing, steps_offset=offset)
  ours = sampler.ddim_timesteps(1000, 5, settings)
  scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
  scheduler.set_timesteps(5)
  assert ours.tolist() == scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_settings_from_another_scheduler_are_ddim_from_config(kind):
  """A pipeline's PNDM or Euler config read as `DDIMScheduler.from_config` reads it: its own
  keys kept, DDIM's defaults for the rest."""
  config = dict(tiny_models.make_pipeline(kind).scheduler.config)
  ddim = diffusers.DDIMScheduler.from_config(config).config
  ours = sampler.DDIMSettings.from_scheduler_config(config)
  assert ours == sampler.DDIMSettings(**{k: ddim[k] for k in (
      "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
      "clip_sample_range")})


def test_an_image_depends_on_its_seed_not_its_batch():
  alone = sampler.initial_noise(jnp.asarray([7]), (4, 4, 4))
  together = sampler.initial_noise(jnp.asarray([1, 7, 9]), (4, 4, 4))
  np.testing.assert_array_equal(alone[0], together[1])


def test_bad_settings_are_one_line_errors():
  with pytest.raises(UserError, match="strength"):
    sampler.sdedit_timesteps(np.arange(10), 0.0)
  with pytest.raises(UserError, match="thresholding"):
    sampler.DDIMSettings.from_scheduler_config({"thresholding": True})
  with pytest.raises(UserError, match="steps"):
    sampler.ddim_timesteps(1000, 0, sampler.DDIMSettings())
