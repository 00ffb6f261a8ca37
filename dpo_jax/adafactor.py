"""Adafactor's factored second moment exactly as transformers.Adafactor computes it.

The official Diffusion-DPO code trains SDXL with `transformers.Adafactor(scale_parameter=False,
relative_step=False)`, whose estimate factors every tensor of 2+ dims over the last two dims of
its PyTorch layout: rows (dim -2) and columns (dim -1). Our params are in Flax layout, so those
dims are other axes: a conv kernel's (kh, kw) are Flax axes (0, 1), a dense kernel's (out, in)
are axes (1, 0). `optax.scale_by_factored_rms` instead factors the two largest axes, and only
when both are >= 128, so it differs for conv kernels and small dense kernels. Here the axes come
from `weights.torch_permutation`, the one source of truth for the Flax <-> PyTorch layout.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpo_jax.models import weights


class FactoredRmsState(NamedTuple):
  count: jax.Array  # Steps taken so far; transformers' `step` - 1.
  v_row: optax.Updates  # Factored leaves: EMA of mean(g² + eps) over columns, keep-dims.
  v_col: optax.Updates  # Factored leaves: EMA of mean(g² + eps) over rows, keep-dims.
  v: optax.Updates  # Leaves of under 2 dims: EMA of g² + eps. Unused slots hold a 0-d zero.


def torch_row_col_axes(path, ndim: int) -> tuple[int, int]:
  """The Flax axes of the PyTorch rows (dim -2) and columns (dim -1) of the leaf at `path`."""
  perm = weights.torch_permutation(weights.path_names(path)[-1], ndim)
  return perm[-2], perm[-1]


def _keep_dims_zeros(path, param, reduced: int):
  """Zeros shaped like `param` reduced (keep-dims) over its row (0) or column (1) axis."""
  if param.ndim < 2:
    return jnp.zeros((), param.dtype)
  shape = list(param.shape)
  shape[torch_row_col_axes(path, param.ndim)[reduced]] = 1
  return jnp.zeros(shape, param.dtype)


def scale_by_factored_rms(decay_rate: float = 0.8,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
  """g / sqrt(v̂) with transformers.Adafactor's v̂ (decay_rate=-0.8, eps=(1e-30, 1e-3) there).

  With β_t = 1 - t^-0.8 (t from 1): v_row ← β_t v_row + (1 - β_t) mean_cols(g² + eps),
  v_col likewise over rows, and the update is g · rsqrt(v_row / mean_rows(v_row)) ·
  rsqrt(v_col); tensors of under 2 dims keep a full v. The RMS clip, weight decay and
  learning rate are separate transformations (see `optim.make_optimizer`).
  """
  def init_fn(params):
    return FactoredRmsState(
        count=jnp.zeros([], jnp.int32),
        v_row=jax.tree_util.tree_map_with_path(lambda k, p: _keep_dims_zeros(k, p, 1), params),
        v_col=jax.tree_util.tree_map_with_path(lambda k, p: _keep_dims_zeros(k, p, 0), params),
        v=jax.tree_util.tree_map(
            lambda p: jnp.zeros_like(p) if p.ndim < 2 else jnp.zeros((), p.dtype), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    beta = 1.0 - count.astype(jnp.float32) ** -decay_rate

    def leaf(path, g, v_row, v_col, v):
      g2 = jnp.square(g) + epsilon
      if g.ndim < 2:
        v = (beta * v + (1 - beta) * g2).astype(v.dtype)
        return g * jax.lax.rsqrt(v), v_row, v_col, v
      rows, cols = torch_row_col_axes(path, g.ndim)
      v_row = (beta * v_row + (1 - beta) * g2.mean(cols, keepdims=True)).astype(v_row.dtype)
      v_col = (beta * v_col + (1 - beta) * g2.mean(rows, keepdims=True)).astype(v_col.dtype)
      row_factor = jax.lax.rsqrt(v_row / v_row.mean(rows, keepdims=True))
      return g * row_factor * jax.lax.rsqrt(v_col), v_row, v_col, v

    treedef = jax.tree_util.tree_structure(updates)
    out = jax.tree_util.tree_map_with_path(leaf, updates, state.v_row, state.v_col, state.v)
    new_updates, v_row, v_col, v = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
    return new_updates, FactoredRmsState(count, v_row, v_col, v)

  return optax.GradientTransformation(init_fn, update_fn)
