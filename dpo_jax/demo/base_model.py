"""`python -m dpo_jax.demo.base_model --output dpo_jax/demo/base_model`: trains the demo's
small base model from nothing and writes it as a diffusers StableDiffusionPipeline folder.

What it builds, all at 32×32 pixels, on the captioned shapes of `shapes.py`:
- a CLIP tokenizer whose vocabulary holds the demo's words (any other text still maps, byte
  by byte), and a small random CLIP text encoder, kept frozen as SD keeps CLIP frozen;
- a small AutoencoderKL (32×32×3 pixels <-> 16×16×4 latents) trained to reconstruct;
- a small SD1.5-shaped UNet trained to denoise those latents given the caption, with one
  caption in ten dropped (classifier-free guidance needs the unconditional model).

About 35 minutes on 2 CPU cores. The repo ships its output (a few MB) so the demo starts
from a model that already draws; rerun this to rebuild it (same seed, same model up to
floating-point reordering).
"""
import json
import os
import time

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError
from dpo_jax.demo import shapes

# 32×32×3 pixels <-> 16×16×4 latents: one downsampling level, SD's VAE layout otherwise.
VAE_CONFIG = dict(
    _class_name="AutoencoderKL", sample_size=shapes.RESOLUTION, in_channels=3, out_channels=3,
    latent_channels=4, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    act_fn="silu", scaling_factor=1.0)
# 3 levels over 16×16 latents, cross-attention in the lower two and none at the top, as in
# SDXL's layout: attention over all 256 positions would cost 3× the step on a CPU.
UNET_CONFIG = dict(
    _class_name="UNet2DConditionModel", sample_size=shapes.RESOLUTION // 2, in_channels=4,
    out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64], norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=8, cross_attention_dim=32)
TEXT_CONFIG = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=32,
    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32, torch_dtype="float32")
# SD's DDPM training schedule, with DDIM as the pipeline's sampler.
SCHEDULER_CONFIG = dict(
    _class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
    "feature_extractor": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}
CAPTION_DROPOUT = 0.1
VAE_BATCH = 32


def _vocabulary(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """A CLIP BPE vocabulary: every byte alone and as a word end (so any text maps), plus
  left-to-right merges that make each of `words` one token."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  byte_tokens = list(bytes_to_unicode().values())
  tokens = byte_tokens + [b + "</w>" for b in byte_tokens]
  merges = []
  for word in sorted(set(words)):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merged = pieces[0]
    for piece in pieces[1:]:
      if (merged, piece) not in merges:
        merges.append((merged, piece))
      merged += piece
      if merged not in tokens:
        tokens.append(merged)
  tokens += ["<|startoftext|>", "<|endoftext|>"]  # EOS the largest id, as in CLIP's.
  return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(folder: str):
  import transformers
  words = {word for prompt in shapes.all_prompts() for word in prompt.split()}
  vocab, merges = _vocabulary(words)
  tokenizer = transformers.CLIPTokenizer(
      vocab=vocab, merges=merges, pad_token="<|endoftext|>",
      model_max_length=TEXT_CONFIG["max_position_embeddings"])
  tokenizer.save_pretrained(folder)
  return tokenizer


def write_text_encoder(folder: str, tokenizer, seed: int):
  """A random CLIPTextModel in transformers' layout (config.json + model.safetensors)."""
  import jax
  import jax.numpy as jnp

  from dpo_jax.models import clip, model_files, weights
  config = dict(TEXT_CONFIG, vocab_size=len(tokenizer.get_vocab()),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
  module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(config))
  ids = jnp.zeros((1, config["max_position_embeddings"]), jnp.int32)
  params = module.init(jax.random.key(seed), ids)["params"]
  model_files.write_config(config, folder)
  model_files.write_state_dict(weights.params_to_state_dict(params), folder,
                               model_files.TRANSFORMERS_WEIGHTS)


def _pixels(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1


def train_vae(steps: int, batch: int, seed: int, log):
  """(model, params) of an AutoencoderKL trained on the shapes: L1 + L2 reconstruction
  from a posterior sample, and a small KL term, as SD's VAE without its GAN."""
  import jax
  import jax.numpy as jnp
  import optax

  from dpo_jax.models import vae as vae_lib
  model = vae_lib.build_vae(VAE_CONFIG)
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  optimizer = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
  opt_state = optimizer.init(params)

  def loss_fn(params, x, key):
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    z = vae_lib.sample_latents(mean, logvar, key)
    recon = model.apply({"params": params}, z, method=model.decode)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1 - logvar)
    return jnp.mean(jnp.abs(recon - x)) + jnp.mean((recon - x) ** 2) + 1e-4 * kl

  @jax.jit
  def step(params, opt_state, x, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(steps):
    images, _ = shapes.captioned_batch(rng, batch)
    params, opt_state, loss = step(params, opt_state, _pixels(images), jax.random.key(i))
    if (i + 1) % 200 == 0:
      log(f"vae step {i + 1}/{steps}  loss {float(loss):.4f}")
  return model, params


def latent_scale(model, params, seed: int) -> float:
  """1 / the latents' standard deviation, as SD chose its VAE's scaling_factor."""
  images, _ = shapes.captioned_batch(np.random.default_rng(seed), 256)
  mean, _ = model.apply({"params": params}, _pixels(images), method=model.encode)
  return float(1 / np.std(np.asarray(mean)))


def train_unet(vae_model, vae_params, text_encoder, tokenizer, steps: int, batch: int,
               seed: int, log):
  """(model, EMA params) of the UNet trained to predict the noise (SD's objective)."""
  import jax
  import jax.numpy as jnp
  import optax

  from dpo_jax import diffusion
  from dpo_jax.models import tokenizer as tokenizer_lib
  from dpo_jax.models import unet as unet_lib
  from dpo_jax.models import vae as vae_lib
  text_module, text_params = text_encoder
  model = unet_lib.build_unet(UNET_CONFIG)
  params = unet_lib.init_params(model, jax.random.key(seed))
  schedule = diffusion.NoiseSchedule.from_scheduler_config(SCHEDULER_CONFIG)
  learning_rate = optax.warmup_cosine_decay_schedule(0, 1e-3, min(200, steps // 10), steps,
                                                     2e-5)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(learning_rate, weight_decay=1e-2))
  opt_state = optimizer.init(params)
  ema = params
  rng = np.random.default_rng(seed + 1)
  max_length = tokenizer.model_max_length

  def loss_fn(params, pixels, ids, key):
    noise_key, t_key, z_key = jax.random.split(key, 3)
    mean, logvar = vae_model.apply({"params": vae_params}, pixels, method=vae_model.encode)
    latents = vae_lib.to_model_latents(vae_lib.sample_latents(mean, logvar, z_key),
                                       vae_model.config)
    context = text_module.apply({"params": text_params}, ids).last_hidden_state
    noise = jax.random.normal(noise_key, latents.shape)
    t = jax.random.randint(t_key, (latents.shape[0],), 0, schedule.num_train_timesteps)
    noisy = diffusion.add_noise(schedule, latents, noise, t)
    predicted = model.apply({"params": params}, noisy, t, context)
    return jnp.mean((predicted - noise) ** 2)

  @jax.jit
  def step(params, opt_state, ema, pixels, ids, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, pixels, ids, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: 0.999 * e + 0.001 * p, ema, params)
    return params, opt_state, ema, loss

  start, running = time.perf_counter(), []
  for i in range(steps):
    images, captions = shapes.captioned_batch(rng, batch)
    captions = ["" if rng.random() < CAPTION_DROPOUT else c for c in captions]
    ids = tokenizer_lib.tokenize(tokenizer, captions, max_length=max_length)
    params, opt_state, ema, loss = step(params, opt_state, ema, _pixels(images), ids,
                                        jax.random.key(seed * 1_000_003 + i))
    running.append(float(loss))
    if (i + 1) % 200 == 0:
      log(f"unet step {i + 1}/{steps}  loss {np.mean(running):.4f}  "
          f"{(time.perf_counter() - start) / (i + 1):.3f} s/step")
      running = []
  return model, ema


def build(output: str, *, vae_steps: int, unet_steps: int, batch: int, seed: int,
          log=print) -> None:
  """Writes the whole pipeline folder to `output`."""
  from dpo_jax.models import clip, model_files
  from dpo_jax.models import unet as unet_lib
  from dpo_jax.models import vae as vae_lib
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)
  model_files.write_config(SCHEDULER_CONFIG, os.path.join(output, "scheduler"),
                           "scheduler_config.json")
  tokenizer = write_tokenizer(os.path.join(output, "tokenizer"))
  write_text_encoder(os.path.join(output, "text_encoder"), tokenizer, seed)
  text_encoder = clip.load_clip(os.path.join(output, "text_encoder"))

  vae_model, vae_params = train_vae(vae_steps, VAE_BATCH, seed, log)
  scale = latent_scale(vae_model, vae_params, seed)
  vae_model = vae_lib.build_vae(dict(VAE_CONFIG, scaling_factor=scale))
  vae_lib.save_vae(vae_model, vae_params, os.path.join(output, "vae"))
  log(f"vae written, scaling_factor {scale:.4f}")

  unet_model, unet_params = train_unet(vae_model, vae_params, text_encoder, tokenizer,
                                       unet_steps, batch, seed, log)
  # float16 on disk halves the repo's copy; training reads it back as float32.
  unet_lib.save_unet(unet_model, unet_params, os.path.join(output, "unet"), dtype=np.float16)
  log(f"{output}: written")


def run() -> None:
  output = flags.DEFINE_string("output", None, "The pipeline folder to write.")
  vae_steps = flags.DEFINE_integer("vae_steps", 1000, "VAE training steps.")
  unet_steps = flags.DEFINE_integer("unet_steps", 4000, "UNet training steps.")
  batch = flags.DEFINE_integer("batch", 64, "Images per UNet step.")
  seed = flags.DEFINE_integer("seed", 0, "Seed of every random draw.")

  def command(argv):
    if len(argv) > 1 or not output.value:
      raise UserError("usage: python -m dpo_jax.demo.base_model --output FOLDER")
    build(output.value, vae_steps=vae_steps.value, unet_steps=unet_steps.value,
          batch=batch.value, seed=seed.value, log=lambda text: print(text, flush=True))

  cli.run(command)


if __name__ == "__main__":
  run()
