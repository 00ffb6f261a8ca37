"""Whole pipelines: loading SD and SDXL folders, the prompt and image encodings against the
diffusers pipelines' own (the oracles), and exports that diffusers loads bit for bit."""
import filecmp
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from dpo_jax import encode
from dpo_jax.errors import UserError
from dpo_jax.models import pipeline as pipeline_lib

# The last one is truncated.
PROMPTS = ["a photo of a cat", "", "Ünïcödé 猫 photo", "photo " * 100]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def saved(request, tmp_path_factory):
  """(diffusers pipeline, its folder, our Pipeline read from that folder)."""
  torch_pipe = tiny_models.make_pipeline(request.param)
  folder = str(tmp_path_factory.mktemp(request.param) / "pipeline")
  torch_pipe.save_pretrained(folder, safe_serialization=True)
  return torch_pipe, folder, pipeline_lib.load_pipeline(folder)


def _close(ours, theirs: torch.Tensor, tol=1e-4):
  np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=0, atol=tol)


def test_load_reads_every_component(saved):
  torch_pipe, folder, pipe = saved
  expected = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
  assert pipe.kind == expected[type(torch_pipe).__name__] and pipe.folder == folder
  assert len(pipe.text_encoders) == len(pipe.tokenizers) == (2 if pipe.kind == "sdxl" else 1)
  names = ["text_encoder", "text_encoder_2"][:len(pipe.text_encoders)]
  assert [type(module).__name__ for module, _ in pipe.text_encoders] == [
      type(getattr(torch_pipe, name)).__name__ for name in names]
  assert pipe.scheduler_config["_class_name"] == type(torch_pipe.scheduler).__name__
  np.testing.assert_allclose(pipe.noise_schedule.alphas_cumprod,
                             torch_pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-6)
  assert pipe.vae.config.scaling_factor == torch_pipe.vae.config.scaling_factor


def test_tokenization_matches_the_pipeline_tokenizers(saved):
  torch_pipe, _, pipe = saved
  theirs = [torch_pipe.tokenizer] + ([torch_pipe.tokenizer_2] if pipe.kind == "sdxl" else [])
  ids = encode.tokenize_prompts(pipe.tokenizers, PROMPTS)
  assert len(ids) == len(theirs)
  for ours, tokenizer in zip(ids, theirs):
    expected = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="np").input_ids
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)
  if pipe.kind == "sdxl":  # The second tokenizer pads with '!', the first with EOS.
    assert ids[0][0, -1] != ids[1][0, -1]


def test_encode_prompts_matches_diffusers_encode_prompt(saved):
  torch_pipe, _, pipe = saved
  ids = encode.tokenize_prompts(pipe.tokenizers, PROMPTS)
  encoders, frozen = encode.pipeline_encoders(pipe)
  run = jax.jit(lambda params, ids: encode.encode_prompts(encoders, params, ids))
  context, pooled = run(frozen["text_encoders"], ids)
  with torch.no_grad():
    theirs = torch_pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
  _close(context, theirs[0])
  assert context.shape[-1] == pipe.unet.config.cross_attention_dim[0]
  if pipe.kind == "sd":
    assert pooled is None
  else:
    _close(pooled, theirs[2])
    # The same outside jit.
    eager_context, eager_pooled = encode.encode_prompts(encoders, frozen["text_encoders"], ids)
    np.testing.assert_allclose(eager_context, context, atol=1e-5)
    np.testing.assert_allclose(eager_pooled, pooled, atol=1e-5)


def test_encode_images_matches_the_vae_posterior(saved):
  torch_pipe, _, pipe = saved
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  run = jax.jit(lambda p, x: encode.encode_images(pipe.vae, p, x))
  mean, logvar = run(pipe.vae_params, images)
  with torch.no_grad():
    posterior = torch_pipe.vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
  _close(mean, posterior.mean.permute(0, 2, 3, 1))
  _close(logvar, posterior.logvar.permute(0, 2, 3, 1))

  rng = jax.random.key(3)
  latents = jax.jit(encode.latents_from_moments, static_argnums=3)(
      mean, logvar, rng, pipe.vae.config)
  expected = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)) * (
      torch_pipe.vae.config.scaling_factor)
  np.testing.assert_allclose(latents, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("saved", ["sdxl"], indirect=True)
def test_sdxl_time_ids_match_diffusers(saved):
  torch_pipe, _, pipe = saved
  cases = [((1024, 768), (0, 0), (1024, 1024)), ((512, 640), (32, 16), (256, 320))]
  for original, crop, target in cases:
    expected = torch_pipe._get_add_time_ids(
        original, crop, target, dtype=torch.float32,
        text_encoder_projection_dim=tiny_models.SDXL_TEXT_EMBED_DIM)[0]
    ours = jax.jit(encode.sdxl_time_ids)(original, crop, target)
    assert ours.dtype == jnp.float32 and ours.shape == (6,)
    np.testing.assert_array_equal(ours, expected.numpy())
  batched = encode.sdxl_time_ids(np.array([c[0] for c in cases]), (0, 0), (64, 64))
  assert batched.shape == (2, 6) and batched[1].tolist() == [512, 640, 0, 0, 64, 64]


def _same_files(left: str, right: str) -> bool:
  comparison = filecmp.dircmp(left, right)
  names = comparison.common_files
  matches, _, _ = filecmp.cmpfiles(left, right, names, shallow=False)
  return (not comparison.left_only and not comparison.right_only and matches == names
          and all(_same_files(os.path.join(left, d), os.path.join(right, d))
                  for d in comparison.common_dirs))


def test_unchanged_export_is_bit_identical(saved, tmp_path):
  torch_pipe, folder, pipe = saved
  out = tmp_path / "out"
  pipeline_lib.export_pipeline(pipe, pipe.unet_params, str(out))
  assert os.listdir(tmp_path) == ["out"]  # No staging folder left beside it.

  reloaded = diffusers.DiffusionPipeline.from_pretrained(out)
  assert type(reloaded) is type(torch_pipe)
  modules = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if pipe.kind == "sdxl" else [])
  for name in modules:
    tiny_models.assert_same_tensors(getattr(torch_pipe, name), getattr(reloaded, name), name)
  public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
  assert public(reloaded.scheduler.config) == public(torch_pipe.scheduler.config)
  # Everything but the UNet is a byte-for-byte copy.
  components = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))]
  assert sorted(os.listdir(out)) == sorted(components + ["model_index.json"])
  assert filecmp.cmp(os.path.join(folder, "model_index.json"), out / "model_index.json",
                     shallow=False)
  for name in components:
    assert name == "unet" or _same_files(os.path.join(folder, name), str(out / name)), name


def test_changed_unet_is_what_diffusers_reads(saved, tmp_path):
  torch_pipe, _, pipe = saved
  params = jax.tree_util.tree_map(lambda x: x, pipe.unet_params)  # A new tree, same arrays.
  params["conv_in"] = dict(params["conv_in"], bias=params["conv_in"]["bias"] + 1.0)
  pipeline_lib.export_pipeline(pipe, params, str(tmp_path / "out"))
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
  expected, actual = torch_pipe.unet.state_dict(), reloaded.state_dict()
  assert sorted(expected) == sorted(actual)
  for key in expected:
    shift = 1.0 if key == "conv_in.bias" else 0.0
    assert torch.equal(actual[key], expected[key] + shift), key


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_export_refuses_a_non_empty_output_unless_overwrite(saved, tmp_path):
  _, _, pipe = saved
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(UserError) as error:
    pipeline_lib.export_pipeline(pipe, pipe.unet_params, str(out))
  assert str(out) in _one_line(error) and "overwrite" in _one_line(error)
  assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]

  pipeline_lib.export_pipeline(pipe, pipe.unet_params, str(out), overwrite=True)
  assert "keep.txt" not in os.listdir(out) and "model_index.json" in os.listdir(out)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_interrupted_export_leaves_nothing(saved, tmp_path, monkeypatch):
  _, _, pipe = saved

  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(pipeline_lib.unet_lib, "save_unet", fail)
  with pytest.raises(KeyboardInterrupt):
    pipeline_lib.export_pipeline(pipe, pipe.unet_params, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_folder_without_model_index_is_refused(tmp_path):
  with pytest.raises(UserError) as error:
    pipeline_lib.load_pipeline(str(tmp_path))
  assert "model_index.json" in _one_line(error) and str(tmp_path) in _one_line(error)


def test_unknown_pipeline_class_is_refused(tmp_path):
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
  with pytest.raises(UserError) as error:
    pipeline_lib.load_pipeline(str(tmp_path))
  assert "KandinskyPipeline" in _one_line(error)


@pytest.mark.parametrize("entry, expected", [
    (None, "no 'text_encoder' component"),
    (["transformers", "CLIPVisionModel"], "'text_encoder' is a CLIPVisionModel"),
])
def test_missing_or_wrong_component_is_refused(saved, tmp_path, entry, expected):
  _, folder, _ = saved
  shutil.copytree(folder, tmp_path / "copy")
  index_path = tmp_path / "copy" / "model_index.json"
  index_path.write_text(json.dumps(dict(json.loads(index_path.read_text()), text_encoder=entry)))
  with pytest.raises(UserError) as error:
    pipeline_lib.load_pipeline(str(tmp_path / "copy"))
  assert expected in _one_line(error)


def _unet_state(params):
  from dpo_jax.models import weights
  return weights.params_to_state_dict(params)


def test_model_vae_and_unet_init_replace_the_pipelines_own(tmp_path):
  """The official --pretrained_vae_model_name_or_path and --unet_init: a VAE folder and a
  UNet (or pipeline) folder whose weights replace the pipeline's."""
  folder = tmp_path / "pipeline"
  tiny_models.make_pipeline("sd").save_pretrained(folder)
  other_vae = tiny_models.make_vae(seed=7)
  other_vae.save_pretrained(tmp_path / "vae")
  other_unet = tiny_models.make_unet(tiny_models.SD15_UNET, seed=7)
  other_unet.save_pretrained(tmp_path / "init" / "unet")
  base = pipeline_lib.load_pipeline(str(folder))
  for unet_init in (tmp_path / "init", tmp_path / "init" / "unet"):  # Pipeline-like or UNet.
    pipe = pipeline_lib.load_pipeline(str(folder), vae=str(tmp_path / "vae"),
                                      unet_init=str(unet_init))
    for key, value in _unet_state(pipe.unet_params).items():
      np.testing.assert_array_equal(value, other_unet.state_dict()[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(pipe.vae_params["encoder"]["conv_in"]["kernel"],
                                  other_vae.encoder.conv_in.weight.detach().numpy().transpose(
                                      2, 3, 1, 0))
    assert not np.array_equal(pipe.vae_params["encoder"]["conv_in"]["kernel"],
                              base.vae_params["encoder"]["conv_in"]["kernel"])
    assert pipe.folder == base.folder  # Export still copies the pipeline's own components.
  with pytest.raises(UserError, match="model.unet_init"):
    pipeline_lib.load_pipeline(str(folder), unet_init=str(tmp_path / "vae" / "nothing"))
  with pytest.raises(UserError, match="neither config.json nor unet/config.json"):
    pipeline_lib.load_pipeline(str(folder), unet_init=str(tmp_path))


def test_vae_and_text_encoders_take_their_own_compute_dtype(tmp_path):
  folder = tmp_path / "pipeline"
  tiny_models.make_pipeline("sdxl").save_pretrained(folder)
  pipe = pipeline_lib.load_pipeline(str(folder), dtype=jnp.bfloat16, vae_dtype=jnp.float32,
                                    text_encoder_dtype=jnp.float32)
  assert pipe.unet.dtype == jnp.bfloat16 and pipe.vae.dtype == jnp.float32
  assert all(module.dtype == jnp.float32 for module, _ in pipe.text_encoders)
