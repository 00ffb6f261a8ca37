"""Mechanical conversion between Flax params and PyTorch state_dicts.

Our modules are named so that a Flax parameter path, joined with '.', IS the PyTorch
state_dict key once the leaf is renamed: `down_blocks.0/resnets.1/conv1/kernel` <->
`down_blocks.0.resnets.1.conv1.weight`. Module names therefore contain dots (Flax allows
it) and no per-model key table exists anywhere. The only other difference is layout:
Flax convolutions are HWIO and dense kernels are (in, out); PyTorch uses OIHW and (out, in).
"""
from collections.abc import Mapping

import jax
import numpy as np

from dpo_jax.errors import UserError

# Flax leaf name -> PyTorch leaf name. Leaves not listed (e.g. CLIP's `class_embedding`,
# `logit_scale`) are raw parameters whose names already match.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
  """The PyTorch state_dict key of the Flax parameter at `path`."""
  *modules, leaf = path
  return ".".join([*modules, _TORCH_LEAF.get(leaf, leaf)])


def torch_permutation(leaf: str, ndim: int) -> tuple[int, ...]:
  """The axes that take the Flax leaf named `leaf` to its PyTorch layout: `np.transpose(flax,
  perm)` is the PyTorch tensor, whose dim k is Flax axis perm[k]. Convolution kernels are HWIO
  in Flax and OIHW in PyTorch, dense kernels (in, out) and (out, in); other leaves agree."""
  if leaf == "kernel" and ndim == 4:
    return (3, 2, 0, 1)  # HWIO -> OIHW
  if leaf == "kernel" and ndim == 2:
    return (1, 0)  # (in, out) -> (out, in)
  return tuple(range(ndim))


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  return np.transpose(array, torch_permutation(leaf, array.ndim))


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  return np.transpose(array, np.argsort(torch_permutation(leaf, array.ndim)))


def path_names(path) -> tuple[str, ...]:
  """A jax key path as the names it holds (dict keys), e.g. ('conv_in', 'kernel')."""
  return tuple(str(getattr(p, "key", p)) for p in path)


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """Flattens a Flax params pytree into a PyTorch-layout state_dict of numpy arrays."""
  state = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    names = path_names(path)
    state[torch_key(names)] = np.ascontiguousarray(_to_torch_layout(names[-1], np.asarray(value)))
  return state


def state_dict_to_params(state: Mapping[str, np.ndarray], abstract_params, *, what: str,
                         dtype=None, ignore_unexpected: tuple[str, ...] = ()):
  """Builds the params pytree shaped like `abstract_params` from a PyTorch state_dict.

  Every parameter must be present with the expected shape, and every tensor in `state` must
  be used (except keys starting with a prefix in `ignore_unexpected`, e.g. buffers), so a
  config that does not match its weights fails here with the offending key, not later.
  `what` names the weights in error messages; `dtype` casts (default: keep the file's).
  """
  used = set()

  def load(path, abstract):
    names = path_names(path)
    key = torch_key(names)
    if key not in state:
      raise UserError(f"{what}: weight '{key}' is missing; the config.json does not match "
                      "these weights (use the folder's own config.json)")
    array = _to_flax_layout(names[-1], state[key])
    if tuple(array.shape) != tuple(abstract.shape):
      raise UserError(f"{what}: weight '{key}' has shape {tuple(state[key].shape)} but the "
                      f"config implies {tuple(abstract.shape)} (in Flax layout); use the "
                      "folder's own config.json")
    used.add(key)
    return np.asarray(array, dtype=dtype or array.dtype)

  params = jax.tree_util.tree_map_with_path(load, abstract_params)
  unexpected = sorted(k for k in state if k not in used and not k.startswith(ignore_unexpected))
  if unexpected:
    raise UserError(f"{what}: {len(unexpected)} weights are not used by the model built from "
                    f"config.json (first: '{unexpected[0]}'); the config does not match the "
                    "weights")
  return params


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
