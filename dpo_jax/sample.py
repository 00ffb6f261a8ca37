"""`python -m dpo_jax.sample (--workdir DIR [--step N] | --pretrained P) --prompts FILE
--output DIR`: images from a tuned run's policy (or any pipeline) with DDIM and
classifier-free guidance, or SDEdit from `--images` at `--strength`.

Image i uses seed `--seed` + i, so the same command on two models (a run and its
`--pretrained` base) draws paired images: same prompt, same starting noise. Writes
OUT/00000.png, ... and OUT/images.jsonl ({"index", "prompt", "seed", "file"} per image).
"""
import json
import os

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _zero_uncond(pipe) -> bool:
  """SDXL pipelines' `force_zeros_for_empty_prompt` (model_index.json; default True)."""
  if pipe.kind != "sdxl":
    return False
  with open(os.path.join(pipe.folder, "model_index.json")) as f:
    return bool(json.load(f).get("force_zeros_for_empty_prompt", True))


def default_resolution(pipe) -> int:
  """The UNet's own sample_size in pixels (its unet/config.json)."""
  from dpo_jax.models import model_files
  size = model_files.read_config(os.path.join(pipe.folder, "unet")).get("sample_size", 64)
  return int(size) * pipe.vae.config.downscale_factor


def make_generator(pipe, unet_params, *, steps: int = 50, guidance_scale: float = 7.5,
                   resolution: int | None = None, batch: int = 8, strength: float | None = None):
  """`generate(prompts, seeds, images=None, unet_params=...) -> uint8 [N, H, W, 3]`:
  text-to-image, or SDEdit
  from `images` (float32 [N, H, W, 3] in [-1, 1]) when `strength` is set. One compiled
  program for every batch (the last is padded); the batch is split over this host's
  devices."""
  import jax
  import jax.numpy as jnp

  from dpo_jax import encode, parallel, sampler

  encoders, frozen = encode.pipeline_encoders(pipe)
  resolution = resolution or default_resolution(pipe)
  factor = pipe.vae.config.downscale_factor
  # The VAE divides by `factor`, the UNet halves the latents once per level but the last.
  multiple = factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  if resolution % multiple:
    raise UserError(f"--resolution {resolution} must be a multiple of {multiple} for this "
                    "pipeline")
  latent_shape = (resolution // factor, resolution // factor, pipe.unet.config.in_channels)
  settings = sampler.DDIMSettings.from_scheduler_config(pipe.scheduler_config)
  timesteps = sampler.ddim_timesteps(pipe.noise_schedule.num_train_timesteps, steps, settings)
  if strength is not None:
    timesteps = sampler.sdedit_timesteps(timesteps, strength)
  devices = jax.local_devices()
  batch = -(-batch // len(devices)) * len(devices)
  sharding = parallel.batch_sharding(parallel.make_mesh(-1, 1, devices))
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  zero_uncond = _zero_uncond(pipe)

  def run(unet_params, frozen, seeds, ids, uncond_ids, pixels):
    conditioning = sampler.prompt_conditioning(
        encoders, frozen["text_encoders"], ids, uncond_ids, resolution=(resolution, resolution),
        zero_uncond=zero_uncond)
    noise = sampler.initial_noise(seeds, latent_shape)
    latents = noise
    if strength is not None:  # SDEdit: the image's posterior sample, noised to the start.
      mean, logvar = encode.encode_images(encoders.vae, frozen["vae"], pixels)
      keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(seeds)
      clean = jax.vmap(encode.latents_from_moments, in_axes=(0, 0, 0, None))(
          mean, logvar, keys, encoders.vae.config)
      latents = sampler.sdedit_start(pipe.noise_schedule, clean, noise, timesteps[0])
    latents = sampler.denoise(pipe.unet, unet_params, pipe.noise_schedule, settings, latents,
                              conditioning, jnp.asarray(timesteps), total_steps=steps,
                              guidance_scale=guidance_scale)
    images = sampler.decode_images(encoders.vae, frozen["vae"], latents)
    return jnp.round(images * 255).astype(jnp.uint8)  # As the pipelines' numpy_to_pil.

  compiled = jax.jit(run, in_shardings=(replicated, replicated, sharding, sharding, sharding,
                                        sharding), out_shardings=sharding)
  unet_params, frozen = jax.device_put((unet_params, frozen), replicated)
  uncond_ids = encode.tokenize_prompts(pipe.tokenizers, [""] * batch)

  def generate(prompts, seeds, images=None, unet_params=unet_params):
    """`unet_params` (default: the generator's) may be any params of the same UNet, e.g.
    a reference and a tuned policy through one compiled program."""
    if (images is None) != (strength is None):
      raise UserError("SDEdit needs both --images and --strength; text-to-image neither")
    out = []
    for start in range(0, len(prompts), batch):
      rows = np.minimum(np.arange(start, start + batch), len(prompts) - 1)  # Pad the last.
      ids = encode.tokenize_prompts(pipe.tokenizers, [prompts[i] for i in rows])
      pixels = (np.zeros((batch, resolution, resolution, 3), np.float32) if images is None
                else np.asarray(images, np.float32)[rows])
      result = compiled(unet_params, frozen, np.asarray(seeds, np.int32)[rows], ids,
                        uncond_ids, pixels)
      out.append(np.asarray(result)[:min(batch, len(prompts) - start)])
    return np.concatenate(out)

  return generate


def read_images(folder: str, count: int, resolution: int) -> np.ndarray:
  """The first `count` images of `folder` in name order, resized to `resolution` (squashed,
  as diffusers' image processor), as float32 in [-1, 1]."""
  from PIL import Image
  if not os.path.isdir(folder):
    raise UserError(f"--images {folder} is not a folder of images")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIXES))
  if len(names) < count:
    raise UserError(f"--images {folder} holds {len(names)} images for {count} prompts; "
                    "give one image per prompt (paired in name order)")
  out = []
  for name in names[:count]:
    try:
      with Image.open(os.path.join(folder, name)) as image:
        image = image.convert("RGB").resize((resolution, resolution), Image.LANCZOS)
    except OSError as error:
      raise UserError(f"{os.path.join(folder, name)} is not a readable image ({error})") from None
    out.append(np.asarray(image, np.float32) / 127.5 - 1)
  return np.stack(out)


def write_images(images: np.ndarray, prompts, seeds, output: str) -> None:
  from PIL import Image
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "images.jsonl"), "w") as index:
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
      name = f"{i:05d}.png"
      Image.fromarray(image).save(os.path.join(output, name))
      index.write(json.dumps({"index": i, "prompt": prompt, "seed": int(seed), "file": name})
                  + "\n")


def load_model(workdir: str | None, pretrained: str | None, step: int | None,
               dtype: str = "float32"):
  """(pipeline, UNet params, what): a run's policy at `step`, or a pipeline's own UNet."""
  import jax.numpy as jnp

  from dpo_jax import runs
  from dpo_jax.models import pipeline as pipeline_lib
  if bool(workdir) == bool(pretrained):
    raise UserError("pass exactly one of --workdir (a training run) and --pretrained (a "
                    "diffusers pipeline)")
  if pretrained:
    pipe = pipeline_lib.load_pipeline(pretrained, dtype=jnp.dtype(dtype))
    return pipe, pipe.unet_params, pretrained
  run = runs.load_run(workdir, step)
  pipe = runs.run_pipeline(run.config, dtype=jnp.dtype(dtype))
  return pipe, run.params, f"{workdir} step {run.step}"


def run() -> None:
  workdir = flags.DEFINE_string("workdir", None, "A training run: sample its tuned policy.")
  pretrained = flags.DEFINE_string("pretrained", None, "A diffusers pipeline folder or hub id.")
  step = flags.DEFINE_integer("step", None, "The run's checkpoint step (default: newest).")
  prompts_file = flags.DEFINE_string("prompts", None, "Prompts: .txt, .jsonl, .json, .tsv, "
                                     ".parquet (dpo_jax/data/prompts.py).")
  output = flags.DEFINE_string("output", None, "Folder for the PNGs and images.jsonl.")
  steps = flags.DEFINE_integer("steps", 50, "DDIM steps.")
  guidance = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: none).")
  seed = flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
  batch = flags.DEFINE_integer("batch", 8, "Images per compiled batch (over all devices).")
  resolution = flags.DEFINE_integer("resolution", None, "Pixels (default: the UNet's own).")
  limit = flags.DEFINE_integer("limit", None, "Only the first N prompts.")
  images = flags.DEFINE_string("images", None, "SDEdit: a folder of starting images, one per "
                               "prompt in name order.")
  strength = flags.DEFINE_float("strength", None, "SDEdit strength in (0, 1].")
  dtype = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; run with --help for the options")
    if not prompts_file.value or not output.value:
      raise UserError("--prompts and --output are both required")
    from dpo_jax.data import prompts as prompts_lib
    prompts = prompts_lib.read_prompts(prompts_file.value)[:limit.value]
    pipe, params, what = load_model(workdir.value, pretrained.value, step.value, dtype.value)
    generate = make_generator(pipe, params, steps=steps.value, guidance_scale=guidance.value,
                              resolution=resolution.value, batch=batch.value,
                              strength=strength.value)
    size = resolution.value or default_resolution(pipe)
    starts = read_images(images.value, len(prompts), size) if images.value else None
    seeds = [seed.value + i for i in range(len(prompts))]
    write_images(generate(prompts, seeds, starts), prompts, seeds, output.value)
    print(f"{len(prompts)} images of {what} in {output.value}")

  cli.run(command)


if __name__ == "__main__":
  run()
