"""The dtypes policy and reference params enter the UNet in, so that both round alike.

Flax's Dense and Conv cast their kernel and bias to the compute dtype before use; the
normalisation layers apply their scale and bias in float32. At step 1 the policy and the
reference hold the same weights, and any difference between their two passes is noise that
β/2 (1000-2500) amplifies into the loss. So a bfloat16 reference rounds only what the compute
rounds anyway, and both param sets are cast to the same per-leaf dtypes before the one UNet
function runs on them: the two passes are then the same computation on equal inputs.
"""
import jax
import jax.numpy as jnp

from dpo_jax.models import weights


def rounded_by_compute(params):
  """A bool per leaf: True for the params of layers that hold a 'kernel' (Dense, Conv, whose
  kernel and bias Flax casts to the compute dtype), False for the rest (normalisation scales
  and biases, used in float32)."""
  paths = [weights.path_names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  with_kernel = {names[:-1] for names in paths if names[-1] == "kernel"}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: weights.path_names(path)[:-1] in with_kernel, params)


def leaf_dtypes(params, rounded_dtype):
  """`rounded_dtype` for the leaves the compute rounds, float32 for the others."""
  return jax.tree_util.tree_map(lambda rounded: jnp.dtype(rounded_dtype if rounded else
                                                          jnp.float32),
                                rounded_by_compute(params))


def cast(params, dtypes):
  """Each leaf cast to its dtype (a tree of dtypes shaped like params); differentiable."""
  return jax.tree_util.tree_map(lambda p, dtype: p.astype(dtype), params, dtypes)


def reference_params(params, reference_dtype):
  """The frozen copy: the rounded leaves stored in `reference_dtype`, the rest float32."""
  return cast(params, leaf_dtypes(params, reference_dtype))


def separate_passes(fn, params, reference_params):
  """(fn(params), fn(reference_params)) as two programs: no reference activations are held
  for the backward pass, but the two can round differently (see `policy_and_reference`)."""
  return fn(params), jax.lax.stop_gradient(fn(reference_params))


def policy_and_reference(fn, params, reference_params):
  """(fn(params), fn(reference_params)), from one compiled body run on both.

  `fn` maps UNet params to what the loss compares (the per-sample errors): everything
  between the params and the loss belongs inside it, since a reduction outside could again
  be compiled two ways.

  Two separate calls compile to two programs that XLA fuses and lays out differently (the
  policy's pass also feeds its backward pass), so they accumulate in different orders, and
  bfloat16 rounding turns those last-bit differences into a step-1 loss visibly off ln 2.
  Here a two-step `lax.scan` runs a single body, the forward pass with its residuals, on the
  reference and then on the policy; the backward pass uses the policy's residuals alone, and
  gradients flow to `params` only. The compute is that of the two separate calls. The memory
  is nearly theirs too, as three choices keep copies out:
  - the body picks its param set with a select, not by indexing a stacked copy of both
    (4 bytes a parameter in bfloat16);
  - the residuals are the scan's carry, which the policy's step overwrites, not a stacked
    output that keeps the reference's as well;
  - residuals that are the picked weights themselves are not stored at all: the backward
    pass reads the policy's params in their place, which are the same values.
  XLA's cost analysis counts a loop body once, so a step's reported FLOPs leave out one of
  the two forward passes.
  """
  layouts = []  # Per trace: the residuals' tree structure, and which are param leaves.

  def forward_with_residuals(p):
    """fn(p) and the residuals of its vjp that are not leaves of `p` itself (the weights
    that the backward pass reads): the policy's params stand in for those, unstored."""
    output, backward = jax.vjp(fn, p)
    residuals, structure = jax.tree_util.tree_flatten(backward)
    leaf_index = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(p))}
    param_leaf = [leaf_index.get(id(r)) for r in residuals]
    layouts.append((structure, param_leaf))
    return output, [r for r, i in zip(residuals, param_leaf) if i is None]

  # The reference first, so that the policy's residuals are the carry the loop ends with.
  is_policy = jnp.array([False, True])
  pick = lambda policy, p, r: jax.tree_util.tree_map(
      lambda a, b: jnp.where(policy, a, b.astype(a.dtype)), p, r)

  @jax.custom_vjp
  def both(p, r):
    _, outputs = jax.lax.scan(lambda _, policy: (None, fn(pick(policy, p, r))), None,
                              is_policy)
    return outputs[1], outputs[0]

  def both_forward(p, r):
    def body(_, policy):
      output, residuals = forward_with_residuals(pick(policy, p, r))
      return residuals, output

    shapes = jax.eval_shape(lambda q: forward_with_residuals(q)[1], p)
    unset = [jnp.zeros(s.shape, s.dtype) for s in shapes]  # Overwritten by each step.
    residuals, outputs = jax.lax.scan(body, unset, is_policy)
    reference_zeros = jax.tree_util.tree_map(jnp.zeros_like, r)  # Unused, so never computed.
    return (outputs[1], outputs[0]), (residuals, p, reference_zeros)

  def both_backward(saved, cotangents):
    stored, p, reference_zeros = saved
    structure, param_leaf = layouts[-1]
    stored, p = iter(stored), jax.tree_util.tree_leaves(p)
    residuals = [next(stored) if i is None else p[i] for i in param_leaf]
    backward = jax.tree_util.tree_unflatten(structure, residuals)
    (policy_gradient,) = backward(cotangents[0])
    return policy_gradient, reference_zeros

  both.defvjp(both_forward, both_backward)
  return both(params, reference_params)
