"""Sampling throughput: images/s of `sampler.denoise` (DDIM with classifier-free guidance, one
compiled lax.scan over the steps) on a random UNet, compile time apart.

  python benchmarks/sampling_throughput.py --unet demo --resolution 64 --batch 8
  python benchmarks/sampling_throughput.py --unet sd15 --width-divisor 2 --resolution 256

The VAE decode and the text encoders run once per image, outside the loop, and are not
timed: the UNet's 2 × steps calls dominate. The last line is one JSON object.
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import bench, diffusion, sampler
from dpo_jax.models import unet as unet_lib, unet_presets

DEMO_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unet", default="demo", choices=["demo", "sd15", "sd21"])
  parser.add_argument("--width-divisor", type=int, default=1)
  parser.add_argument("--resolution", type=int, default=64, help="pixels (latents: /8)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = dict(DEMO_UNET if args.unet == "demo" else unet_presets.PRESETS[args.unet])
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
