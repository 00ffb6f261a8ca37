"""CLIP in Flax against transformers' PyTorch CLIP (the oracle), and the CLIP tokenizer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny_models
from dpo_jax.errors import UserError
from dpo_jax.models import clip
from dpo_jax.models import model_files
from dpo_jax.models import tokenizer as tokenizer_lib

VOCAB, LENGTH, BOS, BANG = 64, 16, 1, 0
TOL = 1e-4


def _text_config(eos_token_id, hidden_act="quick_gelu"):
  return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=hidden_act,
              eos_token_id=eos_token_id, bos_token_id=BOS, pad_token_id=BANG, projection_dim=24)


def _randomise(model):
  """transformers initialises norms to 1/0 and biases to 0; random values catch swapped leaves."""
  torch.manual_seed(0)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.normal_(0.0, 0.3)
  return model.eval()


def _saved(model, folder):
  model.save_pretrained(folder)  # safetensors
  return folder


def _token_ids(eos_token_id):
  """Prompts as SD tokenizers make them, where the pooling position depends on the rule.

  Words include ids above the EOS id (except when EOS is the largest id), so 'largest id' and
  'first EOS' disagree; padding with EOS makes 'first' and 'last' EOS disagree.
  """
  rng = np.random.default_rng(eos_token_id)

  def words(n):
    return rng.choice([i for i in range(3, VOCAB) if i != eos_token_id], n).tolist()

  rows = [[BOS, *words(5), eos_token_id] + [eos_token_id] * (LENGTH - 7),  # SD 1.x: pad = EOS.
          [BOS, *words(9), eos_token_id] + [BANG] * (LENGTH - 11),  # SD 2.x / SDXL 2nd: pad '!'.
          [BOS, *words(LENGTH - 2), eos_token_id]]  # Truncated to the full length.
  ids = np.array(rows, np.int32)
  largest, first_eos = ids.argmax(-1), (ids == eos_token_id).argmax(-1)
  assert eos_token_id == VOCAB - 1 or (largest != first_eos).any()
  return ids


def _close(ours, theirs, tol=TOL):
  theirs = theirs.detach().numpy()
  np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, rtol=0, atol=tol)


@pytest.mark.parametrize("eos_token_id", [2, VOCAB - 1, 40])
@pytest.mark.parametrize("kind,hidden_act", [("CLIPTextModel", "quick_gelu"),
                                             ("CLIPTextModelWithProjection", "gelu")])
def test_text_models_match_transformers(tmp_path, kind, hidden_act, eos_token_id):
  config = transformers.CLIPTextConfig(**_text_config(eos_token_id, hidden_act))
  torch_model = _randomise(getattr(transformers, kind)(config))
  ids = _token_ids(eos_token_id)
  module, params = clip.load_clip(_saved(torch_model, tmp_path), kind)

  ours = jax.jit(module.apply)({"params": params}, ids)
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(ids).long(), output_hidden_states=True)
  _close(ours.last_hidden_state, theirs.last_hidden_state)
  assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
  _close(ours.hidden_states[-2], theirs.hidden_states[-2])
  if kind == "CLIPTextModel":
    _close(ours.pooler_output, theirs.pooler_output)
  else:
    _close(ours.text_embeds, theirs.text_embeds)


def test_text_model_loads_hub_layout(tmp_path):
  """Hub checkpoints keep the `text_model.` prefix and old ones a position_ids buffer."""
  torch_model = _randomise(transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**_text_config(2))))
  _, params = clip.load_clip(_saved(torch_model, tmp_path / "new"), "CLIPTextModel")
  state = {f"text_model.{k}": v.numpy() for k, v in torch_model.state_dict().items()}
  state["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
  model_files.write_state_dict(state, tmp_path / "hub", model_files.TRANSFORMERS_WEIGHTS)
  model_files.write_config(torch_model.config.to_dict(), tmp_path / "hub")

  _, hub_params = clip.load_clip(str(tmp_path / "hub"))  # kind from `architectures`
  jax.tree.map(np.testing.assert_array_equal, hub_params, params)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  config = transformers.CLIPConfig(
      text_config=_text_config(VOCAB - 1),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16, logit_scale_init_value=2.0)
  torch_model = _randomise(transformers.CLIPModel(config))
  return torch_model, _saved(torch_model, tmp_path_factory.mktemp("clip"))


def _images():
  return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


def test_clip_model_matches_transformers(clip_pair):
  torch_model, folder = clip_pair
  module, params = clip.load_clip(folder)
  ids, images = _token_ids(VOCAB - 1), _images()

  apply = jax.jit(module.apply, static_argnames="method")
  variables = {"params": params}
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.from_numpy(ids).long(),
                         pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    text_embeds = torch_model.get_text_features(torch.from_numpy(ids).long()).pooler_output
    image_embeds = torch_model.get_image_features(
        torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
  _close(apply(variables, ids, method="get_text_features"), text_embeds)
  _close(apply(variables, images, method="get_image_features"), image_embeds)
  _close(apply(variables, method="get_logit_scale"), torch_model.logit_scale)
  _close(apply(variables, ids, images), theirs.logits_per_image)


def test_bfloat16_compute_stays_close(clip_pair):
  """bf16 matmuls (8-bit mantissa), f32 norms/softmax: within 3% of the output's scale."""
  torch_model, folder = clip_pair
  module, params = clip.load_clip(folder, dtype=jnp.bfloat16)
  ids, images = _token_ids(VOCAB - 1), _images()
  assert jax.tree.leaves(params)[0].dtype == np.float32
  with torch.no_grad():
    text = torch_model.text_model(torch.from_numpy(ids).long()).last_hidden_state
    image_embeds = torch_model.get_image_features(
        torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
  ours_text = module.apply({"params": params}, ids, method=lambda m, x: m.text_model(x))
  ours_image = module.apply({"params": params}, images, method="get_image_features")
  assert ours_image.dtype == jnp.bfloat16
  for ours, theirs in ((ours_text.last_hidden_state, text), (ours_image, image_embeds)):
    _close(ours, theirs, tol=0.03 * float(theirs.abs().max()))


@pytest.mark.parametrize("key,value", [("hidden_act", "relu"), ("eos_token_id", None),
                                       ("image_size", [224, 224])])
def test_config_rejects_unsupported_values(key, value):
  config = {"text_config": {}, "vision_config": {}}
  config["vision_config" if key == "image_size" else "text_config"][key] = value
  with pytest.raises(UserError, match=f"'{key}'"):
    clip.CLIPConfig.from_dict(config)


def test_config_defaults_and_projection_dim():
  config = clip.CLIPConfig.from_dict({"projection_dim": 768, "text_config": {"hidden_size": 768}})
  assert config.text.hidden_size == 768 and config.text.num_attention_heads == 8
  assert config.text.projection_dim == config.vision.projection_dim == 768
  assert config.vision.patch_size == 32 and config.logit_scale_init_value == 2.6592


_MERGES, _VOCAB = tiny_models.CLIP_MERGES, tiny_models.CLIP_VOCAB


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenize_matches_transformers(tmp_path, pad_token):
  (tmp_path / "vocab.json").write_text(json.dumps(_VOCAB))
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
  prompts = ["a photo of a cat", "Ünïcödé 猫 🐱 photo", "", "photo " * 100]

  ids = tokenizer_lib.tokenize(tokenizer_lib.load_tokenizer(str(tmp_path)), prompts)
  oracle = transformers.CLIPTokenizer(vocab=_VOCAB, merges=_MERGES, pad_token=pad_token)
  expected = oracle(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  assert ids.dtype == np.int32 and ids.shape == (4, 77)
  np.testing.assert_array_equal(ids, expected)
  bos, eos, pad = _VOCAB["<|startoftext|>"], _VOCAB["<|endoftext|>"], _VOCAB[pad_token]
  words = [_VOCAB[t] for t in ("a</w>", "photo</w>", "o", "f</w>", "a</w>", "cat</w>")]
  assert ids[0].tolist() == [bos, *words, eos] + [pad] * 69  # The merges were read.
  assert ids[2, :3].tolist() == [bos, eos, pad]
  assert ids[3, 0] == bos and ids[3, -1] == eos and (ids[3, 1:-1] == _VOCAB["photo</w>"]).all()


def test_load_tokenizer_needs_vocab(tmp_path):
  with pytest.raises(UserError, match="vocab.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
