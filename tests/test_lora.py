"""LoRA (dpo_jax/lora.py) against PEFT and diffusers (the oracles): PEFT's layer naming and
shapes, diffusers' `load_lora_weights` of our export, and the merged UNet export."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from dpo_jax import export, lora
from dpo_jax.errors import UserError
from dpo_jax.models import unet as unet_lib, weights

# Every kind of layer LoRA can adapt in an SD1.5 UNet: attention (Dense), the GEGLU
# feed-forward (Dense), resnets' 3x3 conv1, the transformers' 1x1-conv proj_in and the
# stride-2 downsampling convs.
SD15_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.*", "conv1", "proj_in",
                "downsamplers.0.conv")
# The same layers as a PEFT target_modules regex (fullmatch over the module path).
SD15_PEFT_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|conv1|proj_in"
                     r"|downsamplers\.0\.conv)")
# SDXL: linear proj_in (Dense) and conv2.
SDXL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv2")


def _inputs(config):
  """One latent, a late timestep (whose embedding is far from t=0's), random text."""
  rng = np.random.default_rng(0)
  inputs = dict(sample=rng.standard_normal((1, config["in_channels"], 8, 8), np.float32),
                timestep=np.array([917], np.int64),
                context=rng.standard_normal((1, 7, config["cross_attention_dim"]), np.float32))
  if config.get("addition_embed_type") == "text_time":
    inputs["text_embeds"] = rng.standard_normal((1, tiny_models.SDXL_TEXT_EMBED_DIM),
                                                np.float32)
    inputs["time_ids"] = np.float32([[64, 64, 3, 5, 64, 64]])
  return inputs


def _torch_forward(unet, inputs) -> np.ndarray:
  added = None
  if "text_embeds" in inputs:
    added = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")}
  with torch.no_grad():
    return unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
                torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample.numpy()


def _jax_forward(model, params, inputs) -> np.ndarray:
  extra = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
  out = jax.jit(model.apply)({"params": params}, inputs["sample"].transpose(0, 2, 3, 1),
                             inputs["timestep"], inputs["context"], **extra)
  return np.asarray(out).transpose(0, 3, 1, 2)


def _random_adapters(adapters, scale=0.2):
  """Non-zero A and B, so that every adapted layer changes the output."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), adapters)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  """A tiny SD1.5 pipeline (PyTorch) and its UNet as our (model, params)."""
  pipe = tiny_models.make_pipeline("sd")
  folder = tmp_path_factory.mktemp("sd15") / "unet"
  pipe.unet.save_pretrained(folder)
  return pipe, *unet_lib.load_unet(str(folder))


def _peft_layers(config, targets, rank, init=True) -> dict[str, torch.Tensor]:
  """PEFT's LoRA state_dict (module path -> tensor) of diffusers' UNet for `targets`."""
  from diffusers import UNet2DConditionModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  unet = UNet2DConditionModel(**config)
  unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                              init_lora_weights=init))
  return get_peft_model_state_dict(unet)


def test_init_adapters_name_and_shape_layers_as_peft_and_merge_to_the_base(sd15):
  _, model, params = sd15
  adapters = lora.init_adapters(params, rank=4, targets=SD15_TARGETS, key=jax.random.key(0))
  state, metadata = lora.lora_to_diffusers(adapters, alpha=4.0, rank=4)
  expected = _peft_layers(tiny_models.SD15_UNET, SD15_PEFT_TARGETS, rank=4)
  assert {k: v.shape for k, v in state.items()} == {
      f"unet.{k}": tuple(v.shape) for k, v in expected.items()}
  assert {k.rsplit(".", 1)[-1] for k in state} == {"weight"}
  assert metadata["unet.target_modules"] == sorted(
      {k.rsplit(".", 2)[0] for k in expected})  # Full paths, each adapted module once.
  # The default targets are PEFT's and the diffusers DPO example's list of names.
  default = lora.init_adapters(params, rank=4, key=jax.random.key(0))
  assert sorted(weights.params_to_state_dict(default)) == sorted(
      _peft_layers(tiny_models.SD15_UNET, list(lora.DEFAULT_TARGETS), rank=4))

  # B is zero, so the merged policy is the base exactly, in every leaf.
  assert all(not np.any(b) for path, b in weights.params_to_state_dict(adapters).items()
             if ".lora_B." in path)
  merged = jax.jit(lambda p, a: lora.merge(p, a, alpha=4.0, rank=4))(params, adapters)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    got = merged
    for name in weights.path_names(path):
      got = got[name]
    assert got.dtype == value.dtype and np.array_equal(got, value), path


@pytest.mark.parametrize("init", lora.INITS)
def test_lora_a_init_follows_peft(sd15, init):
  """PEFT's lora_A init: kaiming_uniform_(a=√5) is U(±1/√fan_in), fan_in = in × kh × kw;
  'gaussian' is N(0, 1/r²). Pooled over layers, the standardised values have those laws."""
  _, _, params = sd15
  rank = 4
  adapters = lora.init_adapters(params, rank=rank, targets=SD15_TARGETS,
                                key=jax.random.key(0), init=init)
  standardised = []
  for key, a in weights.params_to_state_dict(adapters).items():
    if ".lora_A." in key:
      standardised.append(a.ravel() * (np.sqrt(a[0].size) if init == "kaiming" else rank))
  values = np.concatenate(standardised)
  if init == "kaiming":
    assert np.abs(values).max() <= 1 and np.abs(values).max() > 0.999
    assert np.std(values) == pytest.approx(1 / np.sqrt(3), rel=0.02)
  else:
    assert np.std(values) == pytest.approx(1.0, rel=0.02)
  assert abs(np.mean(values)) < 0.02


def _merged_and_loaded(torch_unet, load, tmp_path, unet_config, targets):
  """Random non-zero adapters with alpha ≠ rank (PEFT's default is alpha = rank, so a lost
  alpha shows) on `targets` of `torch_unet`'s weights, exported both ways. Returns our
  (model, merged params), the inputs, and the outputs of `torch_unet` after `load(folder)`
  of our LoRA export and of our merged UNet export loaded with from_pretrained."""
  from diffusers import UNet2DConditionModel
  torch_unet.save_pretrained(tmp_path / "base")
  model, params = unet_lib.load_unet(str(tmp_path / "base"))
  rank, alpha = 4, 6.0
  adapters = _random_adapters(lora.init_adapters(params, rank=rank, targets=targets,
                                                 key=jax.random.key(0)))
  merged = jax.jit(lambda p, a: lora.merge(p, a, alpha=alpha, rank=rank))(params, adapters)
  inputs = _inputs(unet_config)
  base = _torch_forward(torch_unet, inputs)

  export.write_lora(adapters, str(tmp_path / "lora"), alpha=alpha, rank=rank)
  load(str(tmp_path / "lora"))
  with_lora = _torch_forward(torch_unet, inputs)
  assert np.abs(with_lora - base).max() > 0.1  # The adapters change the output.

  export.write_unet({"model": {"pretrained": None, "unet": model.config.raw}}, merged,
                    str(tmp_path / "merged"))
  reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval()
  return model, merged, inputs, with_lora, _torch_forward(reloaded, inputs)


def test_sd15_pipeline_load_lora_weights_equals_our_merge(sd15, tmp_path):
  """Our merged UNet (JAX), diffusers' pipeline UNet after `load_lora_weights` of our export,
  and our merged export through from_pretrained: one output (float32, 1e-4)."""
  pipe, _, _ = sd15
  model, merged, inputs, with_lora, merged_export = _merged_and_loaded(
      pipe.unet, pipe.load_lora_weights, tmp_path, tiny_models.SD15_UNET, SD15_TARGETS)
  np.testing.assert_allclose(_jax_forward(model, merged, inputs), with_lora, atol=1e-4, rtol=0)
  np.testing.assert_allclose(merged_export, with_lora, atol=1e-4, rtol=0)


def test_sdxl_unet_load_lora_adapter_equals_our_merged_export(tmp_path):
  """SDXL-shaped (linear proj_in, text_time conditioning): `unet.load_lora_adapter` of our
  export equals our merged export through from_pretrained (float32, 1e-4). (Our JAX forward
  equals diffusers' on the same weights: test_unet.py.)"""
  unet = tiny_models.make_unet(tiny_models.SDXL_UNET)
  load = lambda folder: unet.load_lora_adapter(folder, weight_name=export.LORA_WEIGHTS,
                                               prefix="unet")
  *_, with_lora, merged_export = _merged_and_loaded(unet, load, tmp_path,
                                                    tiny_models.SDXL_UNET, SDXL_TARGETS)
  np.testing.assert_allclose(merged_export, with_lora, atol=1e-4, rtol=0)


def test_bad_targets_mismatched_adapters_and_a_full_output_are_one_line_errors(sd15, tmp_path):
  _, _, params = sd15
  with pytest.raises(UserError, match="'to_qq' matches no Dense or Conv layer"):
    lora.init_adapters(params, rank=4, targets=("to_q", "to_qq"), key=jax.random.key(0))
  with pytest.raises(UserError, match="'norm1' matches no Dense or Conv"):
    lora.init_adapters(params, rank=4, targets=("norm1",), key=jax.random.key(0))
  adapters = lora.init_adapters(params, rank=4, targets=("to_q",), key=jax.random.key(0))
  with pytest.raises(UserError, match="has rank 4, not lora.rank=8"):
    lora.merge(params, adapters, alpha=8.0, rank=8)
  # SD2.x's text width is 48, not 32: its cross-attention to_k does not take these adapters.
  other = unet_lib.init_abstract(unet_lib.build_unet(tiny_models.SD21_UNET))
  cross = lora.init_adapters(params, rank=4, targets=("attn2.to_k",), key=jax.random.key(0))
  with pytest.raises(UserError, match="'.*attn2.to_k' does not fit the base kernel of shape "
                     r"\(48, 32\)"):
    jax.eval_shape(lambda p: lora.merge(p, cross, alpha=4.0, rank=4), other)
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="exists and is not empty; choose another --output"):
    export.write_lora(adapters, str(tmp_path), alpha=4.0, rank=4)
  assert export.write_lora(adapters, str(tmp_path), alpha=4.0, rank=4, overwrite=True) == str(
      tmp_path / "pytorch_lora_weights.safetensors")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt",
                                                       "pytorch_lora_weights.safetensors"]


def test_settings_resolve_and_refuse_in_one_line():
  from dpo_jax import default_config
  config = default_config.get_config()
  config.lora.enabled = True
  assert lora.settings(config) == lora.Settings(8, 8.0, lora.DEFAULT_TARGETS, "kaiming")
  config.lora.alpha, config.lora.targets = 16.0, " to_q , conv1,"
  assert lora.settings(config) == lora.Settings(8, 16.0, ("to_q", "conv1"), "kaiming")
  for key, value, message in (("rank", 0, "lora.rank must be a positive integer"),
                              ("alpha", -1.0, "lora.alpha must be > 0"),
                              ("targets", " , ", "lora.targets is empty"),
                              ("init", "zeros", "lora.init='zeros' is not supported")):
    bad = default_config.get_config()
    bad.lora.enabled = True
    bad.lora[key] = value
    with pytest.raises(UserError, match=message) as error:
      lora.check(bad)
    assert len(str(error.value).splitlines()) == 1


def test_merge_is_differentiable_in_the_adapters(sd15):
  """The gradient of a loss on merged kernels reaches A and B only of the layers it reads (1 of
  the 11 attn1.to_q here):
  for sum(W ⊙ G) with W = base + s·A·B, dA = s·G·Bᵀ and dB = s·Aᵀ·G (by hand)."""
  _, _, params = sd15
  rank, alpha = 2, 3.0
  adapters = _random_adapters(lora.init_adapters(params, rank=rank, targets=("attn1.to_q",),
                                                 key=jax.random.key(0)))
  module = ("mid_block.attentions.0", "transformer_blocks.0", "attn1", "to_q")
  at = lambda tree, *path: functools.reduce(lambda node, name: node[name], module + path, tree)
  g = np.random.default_rng(5).standard_normal(at(params, "kernel").shape).astype(np.float32)
  loss = lambda a: jnp.sum(at(lora.merge(params, a, alpha=alpha, rank=rank), "kernel") * g)
  grads = jax.grad(loss)(adapters)
  a, b = at(adapters, "lora_A", "kernel"), at(adapters, "lora_B", "kernel")
  scale = alpha / rank
  np.testing.assert_allclose(at(grads, "lora_A", "kernel"), scale * g @ b.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(at(grads, "lora_B", "kernel"), scale * a.T @ g, rtol=1e-5, atol=1e-5)
  others = [x for path, x in jax.tree_util.tree_leaves_with_path(grads)
            if weights.path_names(path)[:4] != module]
  assert len(others) == 2 * 10 and not any(np.any(x) for x in others)


def test_merge_onto_a_bfloat16_base_keeps_the_update_in_float32(sd15):
  """A bfloat16 base (model.reference_dtype) plus float32 adapters: the adapted kernel comes
  out float32 (a 1e-4 update survives, which bfloat16's 8 bits would round away), equal to
  the base at init; the other leaves stay bfloat16."""
  _, _, params = sd15
  base = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  module = ("mid_block.attentions.0", "transformer_blocks.0", "attn1", "to_q")
  at = lambda tree: functools.reduce(lambda node, name: node[name], module + ("kernel",), tree)
  adapters = lora.init_adapters(base, rank=2, targets=("mid_block.*attn1.to_q",),
                                key=jax.random.key(0))
  merged = lora.merge(base, adapters, alpha=2.0, rank=2)
  assert at(merged).dtype == jnp.float32 and np.array_equal(at(merged), at(base))
  assert merged["conv_in"]["kernel"].dtype == jnp.bfloat16
  small = jax.tree_util.tree_map(lambda x: np.full_like(x, 1e-2), adapters)
  update = lora.merge(base, small, alpha=2.0, rank=2)
  np.testing.assert_allclose(at(update) - at(base).astype(np.float32), 2e-4, rtol=1e-3)
