"""Reading and writing diffusers UNet folders: exact round trips, every file layout, and
one-line errors for what we refuse."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import tiny_models
from dpo_jax.errors import UserError
from dpo_jax.models import model_files, unet as unet_lib


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def original(request, tmp_path_factory):
  config = {"sd15": tiny_models.SD15_UNET, "sd21": tiny_models.SD21_UNET,
            "sdxl": tiny_models.SDXL_UNET}[request.param]
  folder = tmp_path_factory.mktemp(request.param) / "unet"
  model = tiny_models.make_unet(config)
  model.save_pretrained(folder)
  return model, str(folder)


def test_load_export_load_is_bit_identical(original, tmp_path):
  torch_model, folder = original
  model, params = unet_lib.load_unet(folder)
  unet_lib.save_unet(model, params, str(tmp_path))
  reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
  tiny_models.assert_same_tensors(torch_model, reloaded)
  tiny_models.assert_same_config(torch_model.config, reloaded.config)


def test_sharded_export_is_read_by_diffusers(original, tmp_path):
  torch_model, folder = original
  model, params = unet_lib.load_unet(folder)
  unet_lib.save_unet(model, params, str(tmp_path), max_shard_bytes=200_000)
  index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  tiny_models.assert_same_tensors(torch_model, UNet2DConditionModel.from_pretrained(tmp_path))


def test_reexport_into_same_folder_leaves_no_stale_shards(original, tmp_path):
  _, folder = original
  model, params = unet_lib.load_unet(folder)
  unet_lib.save_unet(model, params, str(tmp_path), max_shard_bytes=200_000)
  unet_lib.save_unet(model, params, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_reads_sharded_and_fp16_variant_folders(tmp_path):
  torch_model = tiny_models.make_unet(tiny_models.SD15_UNET)
  torch_model.half()  # Values exactly representable in fp16, so both folders hold the same.
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  torch_model.save_pretrained(tmp_path / "fp16", variant="fp16")
  assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
  _, sharded = unet_lib.load_unet(str(tmp_path / "sharded"))
  _, half = unet_lib.load_unet(str(tmp_path / "fp16"), variant="fp16")
  expected = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
  for params in (sharded, half):
    state = unet_lib.weights.params_to_state_dict(params)
    assert sorted(state) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_bfloat16_weights_load(tmp_path):
  torch_model = tiny_models.make_unet(tiny_models.SD15_UNET).to(torch.bfloat16)
  torch_model.save_pretrained(tmp_path)
  _, params = unet_lib.load_unet(str(tmp_path))
  state = unet_lib.weights.params_to_state_dict(params)
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
  np.testing.assert_array_equal(state[key], torch_model.state_dict()[key].float().numpy())


def _one_line(error: UserError) -> str:
  message = str(error)
  assert "\n" not in message
  return message


def test_pickle_only_folder_is_refused_with_conversion_hint(tmp_path):
  tiny_models.make_unet(tiny_models.SD15_UNET).save_pretrained(tmp_path, safe_serialization=False)
  assert any(name.endswith(".bin") for name in os.listdir(tmp_path))
  with pytest.raises(UserError) as error:
    unet_lib.load_unet(str(tmp_path))
  message = _one_line(error.value)
  assert "pickled" in message and "save_pretrained" in message


@pytest.mark.parametrize("key, value", [
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("some_future_option", 3),
])
def test_unsupported_config_value_names_the_key(tmp_path, key, value):
  config = dict(tiny_models.SD15_UNET, **{key: value})
  with pytest.raises(UserError) as error:
    unet_lib.build_unet(config)
  assert key in _one_line(error.value)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
  tiny_models.make_unet(tiny_models.SD15_UNET).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, cross_attention_dim=48)))
  with pytest.raises(UserError) as error:
    unet_lib.load_unet(str(tmp_path))
  assert "attn2.to_k.weight" in _one_line(error.value)


def test_missing_folder_and_offline_hub_id_are_one_line_errors(tmp_path):
  with pytest.raises(UserError) as error:
    unet_lib.load_unet(str(tmp_path / "nope"))
  assert str(tmp_path / "nope") in _one_line(error.value)
  os.environ["HF_HUB_OFFLINE"] = "1"
  with pytest.raises(UserError) as error:
    model_files.resolve_pretrained("some-org/some-model-that-is-not-cached")
  message = _one_line(error.value)
  assert "some-org/some-model-that-is-not-cached" in message and "model.pretrained=" in message
