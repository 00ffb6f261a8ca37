"""How far apart are policy and reference at step 1, where their weights are equal?

Every pair's inside term −β/2·((L_w − L_l)_policy − (L_w − L_l)_ref) should be 0 there;
what is not 0 is numerical noise that β/2 turns into loss. This runs the train step's own
error computation (`make_pair_errors`, inside value_and_grad as in the step) on a random
UNet of a release's shape at a given latent size, in the recipe dtypes (bfloat16 compute,
bfloat16 reference), once per `dpo.reference_pass`, and prints the inside terms.

  python benchmarks/reference_agreement.py --preset sd15 --size 64    # an accelerator
  python benchmarks/reference_agreement.py --preset sd15 --size 32 --width-divisor 2  # 24 GB

The last line is one JSON object.
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import diffusion, loss as losses, precision
from dpo_jax.models import unet as unet_lib, unet_presets
from dpo_jax.models.unet import init_params
from dpo_jax.train_step import make_pair_errors


def _batch(preset: dict, pairs: int, size: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  batch = {"latents": rng.standard_normal((pairs, 2, size, size, preset["in_channels"])),
           "context": rng.standard_normal((pairs, 77, preset["cross_attention_dim"])),
           "pair_ids": np.arange(pairs)}
  return {k: jnp.asarray(v, jnp.int32 if k == "pair_ids" else jnp.float32)
          for k, v in batch.items()}


def inside_terms(name: str, pairs: int, batches: int, size: int, beta: float, seed: int,
                 remat: bool, width_divisor: int) -> dict:
  preset = dict(unet_presets.PRESETS[name])
  if width_divisor > 1:  # The release's topology (blocks, heads, attention) with fewer channels.
    preset["block_out_channels"] = [c // width_divisor for c in preset["block_out_channels"]]
  if preset.get("addition_embed_type"):
    raise SystemExit(f"--preset {name}: only SD 1.x/2.x shapes (no SDXL added conditions)")
  unet = unet_lib.build_unet(preset, dtype=jnp.bfloat16, remat=remat)
  params = init_params(unet, jax.random.key(seed))
  reference = precision.reference_params(params, "bfloat16")
  schedule = diffusion.NoiseSchedule.from_scheduler_config(diffusion.DEFAULT_SCHEDULER)
  results = {}
  for reference_pass in ("shared", "separate"):
    pair_errors = make_pair_errors(unet, schedule, seed=seed, compute_dtype=jnp.bfloat16,
                                   reference_pass=reference_pass)

    def loss_with_errors(p, batch, pair_errors=pair_errors):
      policy, ref = pair_errors(p, reference, batch)
      return losses.dpo_loss(policy, ref, beta)[0], (policy, ref)

    def step(p, batch, loss_with_errors=loss_with_errors):
      # The gradient is computed, as in the train step, but only its norm leaves the
      # program: a float32 copy of 0.86 B gradients would not fit beside the rest.
      (loss, errors), grads = jax.value_and_grad(loss_with_errors, has_aux=True)(p, batch)
      return loss, errors, optax.global_norm(grads)

    step = jax.jit(step)
    inside, losses_seen, started = [], [], time.perf_counter()
    for b in range(batches):  # One compiled program, `batches` batches through it.
      loss, (policy, ref), _ = step(params, _batch(preset, pairs, size, seed + b))
      winners, losers = np.split(np.asarray(policy) - np.asarray(ref), 2)
      inside.extend((-0.5 * beta * (winners - losers)).tolist())
      losses_seen.append(float(loss))
    results[reference_pass] = {
        "inside": inside, "max_abs_inside": float(np.abs(inside).max()),
        "mean_abs_inside": float(np.abs(inside).mean()), "losses": losses_seen,
        "seconds": round(time.perf_counter() - started, 1)}
    print(reference_pass, results[reference_pass], flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="sd15", choices=["sd15", "sd21"])
  parser.add_argument("--pairs", type=int, default=1, help="pairs per batch")
  parser.add_argument("--batches", type=int, default=4)
  # Latent side. SD1.5's own, 64, needs ~28 GB of XLA CPU temporaries for one pair, more than
  # the 24 GB machine this was measured on.
  parser.add_argument("--size", type=int, default=32)
  # Divide every block's channels (the 24 GB CPU machine cannot hold SD1.5's full-width
  # bf16 step: XLA's CPU backend computes bf16 through float32 copies).
  parser.add_argument("--width-divisor", type=int, default=1)
  parser.add_argument("--beta", type=float, default=2000.0)
  parser.add_argument("--seed", type=int, default=0)
  # Without remat, XLA's attention keeps every 4096x4096 softmax for the backward pass:
  # ~70 GB for 2 pairs at 64x64 latents.
  parser.add_argument("--no-remat", dest="remat", action="store_false")
  args = parser.parse_args()
  results = inside_terms(args.preset, args.pairs, args.batches, args.size, args.beta,
                         args.seed, args.remat, args.width_divisor)
  print(json.dumps({"preset": args.preset, "pairs": args.pairs, "batches": args.batches,
                    "latent_size": args.size, "width_divisor": args.width_divisor,
                    "beta": args.beta,
                    "remat": args.remat,
                    "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "machine": platform.processor() or platform.machine(),
                    "host_cpus": os.cpu_count(), **results}))


if __name__ == "__main__":
  main()
