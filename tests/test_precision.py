"""dpo_jax.precision: a bfloat16 reference rounds exactly what the bfloat16 compute rounds, and
policy and reference passes are one computation, so step 1's loss is ln 2 in the recipe dtypes."""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_data
import tiny_models
from dpo_jax import precision, train
from dpo_jax.models import unet as unet_lib
from dpo_jax.models.unet import _example_inputs, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _uses(jaxpr, var):
  """Every equation of `jaxpr` (at the top level) that reads `var`."""
  return [eqn for eqn in jaxpr.eqns if any(v is var for v in eqn.invars)]


@pytest.mark.parametrize("shape", ["SD15_UNET", "SDXL_UNET"])
def test_rounded_leaves_are_exactly_those_the_bfloat16_unet_casts(shape):
  """Traced UNet in bfloat16: a leaf marked rounded is only ever read through a cast to
  bfloat16; any other leaf is never cast to bfloat16 (it enters float32 arithmetic)."""
  unet = unet_lib.build_unet(dict(getattr(tiny_models, shape)), dtype=jnp.bfloat16)
  params = jax.eval_shape(lambda: init_params(unet, jax.random.key(0)))
  args, kwargs = _example_inputs(unet.config)
  closed = jax.make_jaxpr(lambda p, a, k: unet.apply({"params": p}, *a, **k))(
      params, args, kwargs)
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  rounded = jax.tree_util.tree_leaves(precision.rounded_by_compute(params))
  kinds = {True: 0, False: 0}
  for (path, _), var, is_rounded in zip(leaves, closed.jaxpr.invars, rounded):
    uses = _uses(closed.jaxpr, var)
    to_bf16 = [e.primitive.name == "convert_element_type"
               and e.params["new_dtype"] == jnp.bfloat16 for e in uses]
    name = jax.tree_util.keystr(path)
    assert uses, name
    assert all(to_bf16) if is_rounded else not any(to_bf16), name
    kinds[is_rounded] += 1
  assert kinds[True] > 50 and kinds[False] > 20  # Kernels and biases; norm scales and biases.


def test_bfloat16_reference_keeps_normalisation_params_in_float32():
  unet = unet_lib.build_unet(dict(tiny_models.SD15_UNET))
  params = init_params(unet, jax.random.key(0))
  reference = precision.reference_params(params, "bfloat16")
  assert reference["conv_in"]["kernel"].dtype == jnp.bfloat16
  assert reference["conv_in"]["bias"].dtype == jnp.bfloat16
  assert reference["conv_norm_out"]["scale"].dtype == jnp.float32
  assert reference["conv_norm_out"]["bias"].dtype == jnp.float32
  norm = reference["down_blocks.0.attentions.0"]["transformer_blocks.0"]["norm1"]
  assert norm["scale"].dtype == norm["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(reference["conv_norm_out"]["scale"],
                                params["conv_norm_out"]["scale"])
  # Rounding the policy for the compute gives the reference's values, bit for bit.
  compute = precision.cast(params, precision.leaf_dtypes(params, jnp.bfloat16))
  for a, b in zip(jax.tree_util.tree_leaves(compute), jax.tree_util.tree_leaves(reference)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_policy_and_reference_give_each_output_and_the_policy_gradient():
  """Against two plain calls: the same values, and the gradient of a loss of both outputs
  with respect to the policy alone. The backward pass reads the weights of the second layer
  (`v`, which the shared pass does not store but takes from the policy's params) and of the
  first, square ones, so a weight taken from the wrong set or leaf changes the gradient."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  fn = lambda p: jnp.sum(jnp.tanh(jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]) ** 2, axis=1)
  params = {"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}
  reference = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  loss = lambda a, b: jnp.sum(a * jnp.arange(5.0)) - jnp.sum(b ** 2)
  shared = lambda p: loss(*precision.policy_and_reference(fn, p, reference))
  separate = lambda p: loss(fn(p), jax.lax.stop_gradient(fn(reference)))
  np.testing.assert_allclose(shared(params), separate(params), rtol=1e-6)
  for got, want in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(shared))(params)),
                       jax.tree_util.tree_leaves(jax.grad(separate)(params))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  policy, ref = jax.jit(lambda p: precision.policy_and_reference(fn, p, reference))(params)
  np.testing.assert_allclose(policy, fn(params), rtol=1e-6)
  np.testing.assert_allclose(ref, fn(reference), rtol=1e-6)


def test_policy_and_reference_hold_no_copy_of_the_weights():
  """The shared pass's gradient program plans no more temporaries than two separate passes
  plus a quarter of the params' bytes. A stacked copy of both param sets costs twice their
  bytes, and keeping the weights among the body's residuals once more (XLA:CPU's plan,
  float32: its bfloat16 plans hold float32 copies of their own)."""
  layers, width = 8, 512
  params = {f"w{i}": jnp.full((width, width), 0.01, jnp.float32) for i in range(layers)}
  reference = jax.tree_util.tree_map(lambda p: p * 0.5, params)
  block = jax.checkpoint(lambda h, w: jnp.tanh(h @ w))

  def fn(p):
    h = jnp.ones((16, width), jnp.float32)
    for i in range(layers):
      h = block(h, p[f"w{i}"])
    return jnp.sum(h ** 2, axis=1)

  def temporaries(passes):
    loss = lambda p: jnp.sum(jnp.subtract(*passes(fn, p, reference)))
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  param_bytes = layers * width * width * 4
  shared = temporaries(precision.policy_and_reference)
  separate = temporaries(precision.separate_passes)
  assert shared <= separate + param_bytes / 4, (shared / param_bytes, separate / param_bytes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("recipe")
  tiny_models.make_pipeline("sd", small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=16, seed=0)
  return folder


@pytest.mark.slow
def test_sd15_recipe_step_1_is_ln2_with_every_pair_a_tie(files, tmp_path):
  """configs/sd15.py as it is (bfloat16 compute, bfloat16 reference) on a tiny pipeline at
  32 px: at step 1 policy and reference are equal, so every pair's inside term is 0 exactly:
  the loss is ln 2 and the implicit accuracy ½ (ties count ½). Two separately compiled passes
  gave 0.48-0.78 here, as their bfloat16 roundings differ."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import sd15  # configs/sd15.py
  config = sd15.get_config()
  assert (config.model.compute_dtype, config.model.reference_dtype) == ("bfloat16", "bfloat16")
  config.model.pretrained = str(files / "pipeline")
  config.data.train_files = str(files / "train.parquet")
  config.data.resolution = 32
  config.train.update(steps=1, batch_pairs=8, grad_accum=1, log_every=1)
  train.train(config, str(tmp_path), jax.devices()[:1])
  with open(tmp_path / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert first["step"] == 1
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert first["implicit_acc"] == 0.5
  assert first["reward_margin"] == 0.0
