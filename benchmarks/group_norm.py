"""flax's nn.GroupNorm against `layers.GroupNorm` (spatial sums first, then each group's
channels) on XLA:CPU, forward and forward+backward: why the UNet and VAE use ours.

  python benchmarks/group_norm.py
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from pointwise_conv import best_ms  # benchmarks/, on the path of a script run from it.

from dpo_jax.models.layers import GroupNorm

SHAPES = ((4, 32, 32, 64), (4, 16, 16, 128), (4, 8, 8, 256))


def main() -> None:
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; best of 20, ms")
  for groups in (8, 32):
    for shape in SHAPES:
      x = jax.random.normal(jax.random.key(0), shape)
      theirs = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
      ours = GroupNorm(groups, 1e-5)
      params = theirs.init(jax.random.key(1), x)  # The same param tree as ours.
      row = []
      for apply in (theirs.apply, ours.apply):
        loss = lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2)
        row += [best_ms(jax.jit(apply), params, x),
                best_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)]
      difference = float(jnp.max(jnp.abs(theirs.apply(params, x) - ours.apply(params, x))))
      print(f"{groups:>2} groups {str(shape):>17}  nn.GroupNorm fwd {row[0]:.3f} fwd+bwd "
            f"{row[1]:.3f} | ours fwd {row[2]:.3f} fwd+bwd {row[3]:.3f} | max |diff| "
            f"{difference:.1e}")


if __name__ == "__main__":
  main()
