"""Sampling throughput: images/s of `sampler.denoise` (DDIM with classifier-free guidance, one
compiled lax.scan over the steps) on a random UNet, compile time apart.

  python benchmarks/sampling_throughput.py --unet synthetic --resolution 64 --batch 8
  python benchmarks/sampling_throughput.py --unet sd15 --width-divisor 2 --resolution 256

The VAE decode and the text encoders run once per image, outside the loop, and are not
timed: the UNet's 2 × steps calls dominate. The last line is one JSON object.
"""
import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import bench, diffusion, sampler
from dpo_jax.models import unet as unet_lib, unet_presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_unet() -> dict:
  """configs/synthetic.py's UNet, read by path as config_flags reads it."""
  spec = importlib.util.spec_from_file_location(
      "synthetic", os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.SYNTHETIC_UNET)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unet", default="synthetic", choices=["synthetic", "sd15", "sd21"])
  parser.add_argument("--width-divisor", type=int, default=1)
  parser.add_argument("--resolution", type=int, default=64, help="pixels (latents: /8)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = synthetic_unet() if args.unet == "synthetic" else dict(unet_presets.PRESETS[args.unet])
  if args.width_divisor > 1:
    config["block_out_channels"] = [c // args.width_divisor for c in config["block_out_channels"]]
  unet = unet_lib.build_unet(config, dtype=jnp.dtype(args.dtype))
  params = bench.host_random_params(unet, 0)
  schedule = diffusion.NoiseSchedule.from_scheduler_config(diffusion.DEFAULT_SCHEDULER)
  settings = sampler.DDIMSettings(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
  timesteps = jnp.asarray(sampler.ddim_timesteps(1000, args.steps, settings))
  size, width = args.resolution // 8, unet.config.cross_attention_dim[0]
  rng = np.random.default_rng(0)
  context = jnp.asarray(rng.standard_normal((args.batch, 77, width), np.float32))
  conditioning = sampler.Conditioning(context, {}, jnp.zeros_like(context), {})

  @jax.jit
  def run(params, seeds, conditioning):
    latents = sampler.initial_noise(seeds, (size, size, unet.config.in_channels))
    return sampler.denoise(unet, params, schedule, settings, latents, conditioning, timesteps,
                           total_steps=args.steps, guidance_scale=args.guidance)

  seeds = jnp.arange(args.batch)
  started = time.perf_counter()
  compiled = run.lower(params, seeds, conditioning).compile()
  compile_seconds = time.perf_counter() - started
  jax.block_until_ready(compiled(params, seeds, conditioning))
  started = time.perf_counter()
  for _ in range(args.repeats):
    jax.block_until_ready(compiled(params, seeds, conditioning))
  seconds = (time.perf_counter() - started) / args.repeats
  print(json.dumps({
      "unet": args.unet, "width_divisor": args.width_divisor, "resolution": args.resolution,
      "batch": args.batch, "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
      "images_per_sec": args.batch / seconds, "seconds_per_batch": seconds,
      "compile_seconds": compile_seconds, "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind, "devices": 1,
      "machine": platform.processor() or platform.machine(), "host_cpus": os.cpu_count()}))


if __name__ == "__main__":
  main()
