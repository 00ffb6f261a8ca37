"""A 1x1 convolution as nn.Conv against `layers.PointwiseConv` (a product over the channel
axis, the same params) on XLA:CPU, forward and forward+backward, at the mid-size UNet's
shapes (benchmarks/cpu_ops.py's): why the UNet runs its 1x1 convolutions as products.

  python benchmarks/pointwise_conv.py
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models.layers import PointwiseConv

# (input shape, output channels): resnet shortcuts [B, H, W, C] and the transformers'
# proj_in / proj_out on [B, HW, C] tokens.
SHAPES = (((4, 32, 32, 128), 64), ((4, 16, 16, 384), 128), ((4, 8, 8, 384), 256),
          ((4, 1024, 64), 64), ((4, 256, 128), 128))


def best_ms(function, *args, repeats: int = 20) -> float:
  jax.block_until_ready(function(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    best = min(best, time.perf_counter() - start)
  return 1e3 * best


def conv_apply(features: int, tokens: bool):
  conv = nn.Conv(features, (1, 1))
  if tokens:  # [B, T, C] as the transformer held it before: a [B, T, 1, C] image.
    return lambda params, x: conv.apply(params, x[:, :, None, :])[:, :, 0, :]
  return conv.apply


def main() -> None:
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; best of 20, ms")
  for shape, features in SHAPES:
    x = jax.random.normal(jax.random.key(0), shape)
    pointwise = PointwiseConv(features)
    params = pointwise.init(jax.random.key(1), x)  # The same param tree as nn.Conv's.
    row = []
    for apply in (conv_apply(features, len(shape) == 3), pointwise.apply):
      loss = lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2)
      row += [best_ms(jax.jit(apply), params, x),
              best_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)]
    print(f"{str(shape):>18} -> {features:<4} nn.Conv fwd {row[0]:.3f} fwd+bwd {row[1]:.3f} | "
          f"PointwiseConv fwd {row[2]:.3f} fwd+bwd {row[3]:.3f}")


if __name__ == "__main__":
  main()
