"""Scorers against the published PyTorch recipes (the oracles): transformers' CLIPModel with its
CLIPProcessor (PIL backend, as the scorers were published) and the LAION aesthetic MLP.
"""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from diffusers.image_processor import VaeImageProcessor

import tiny_models
from dpo_jax import scorers
from dpo_jax.errors import UserError

IMAGE_SIZE, SHORTEST_EDGE, PROJECTION = 32, 36, 24
LOGIT_SCALE = 4.0  # exp = 54.6: 'pickscore' then differs from 'clip' and 'clip_torchmetrics'.
# Not OpenAI's values, so a processor that ignored the folder's config would fail.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PROMPTS = ["a photo of a cat", "photo", "a cat on a photo of a cat", "Ünïcödé 猫"]
# Landscape and portrait sizes whose resized long side truncates (36 * 61 / 45 = 48.8 -> 48),
# where rounding would give another size.
SIZES = [(45, 61), (53, 40), (32, 32), (90, 90)]


def _processor_config(legacy: bool) -> dict:
  """Hub folders (openai, laion) still hold the old int spelling; save_pretrained the new one."""
  if legacy:
    sizes = dict(size=SHORTEST_EDGE, crop_size=IMAGE_SIZE,
                 feature_extractor_type="CLIPFeatureExtractor")
  else:
    sizes = dict(size={"shortest_edge": SHORTEST_EDGE},
                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                 image_processor_type="CLIPImageProcessor")
  return dict(sizes, do_resize=True, do_center_crop=True, do_normalize=True, resample=3,
              image_mean=list(MEAN), image_std=list(STD))


def _write_processor(folder, legacy: bool = False):
  (folder / scorers.PREPROCESSOR_CONFIG).write_text(json.dumps(_processor_config(legacy)))
  return folder


def _oracle_processor(folder):
  # transformers 5 picks the torchvision backend when installed; the scorers were published
  # (transformers 4.27) with the PIL one, the only one that is the same function everywhere.
  return transformers.CLIPImageProcessorPil.from_pretrained(folder)


def _images(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in SIZES]


def _oracle_pixels(processor, pil_images) -> np.ndarray:
  pixels = processor(images=pil_images, return_tensors="np")["pixel_values"]
  return pixels.transpose(0, 2, 3, 1)  # NCHW -> our channels-last


@pytest.mark.parametrize("legacy", [False, True])
def test_preprocess_equals_clip_image_processor(tmp_path, legacy):
  """Bit-exact: the same PIL resize and the processor's own float64-then-float32 arithmetic."""
  folder = _write_processor(tmp_path, legacy)
  processing = scorers.read_processing(str(folder))
  images = _images()
  ours = scorers.preprocess(images, processing)
  theirs = _oracle_pixels(_oracle_processor(folder), images)
  assert ours.dtype == np.float32 and ours.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  np.testing.assert_array_equal(ours, theirs)


def test_preprocess_float_images_as_saved_pngs(tmp_path):
  """[0, 1] floats are scored as the PNGs diffusers would save (numpy_to_pil: round(255 x))."""
  folder = _write_processor(tmp_path)
  floats = np.random.default_rng(1).uniform(size=(3, 45, 61, 3)).astype(np.float32)
  ours = scorers.preprocess(floats, scorers.read_processing(str(folder)))
  theirs = _oracle_pixels(_oracle_processor(folder), VaeImageProcessor.numpy_to_pil(floats))
  np.testing.assert_array_equal(ours, theirs)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    scorers.preprocess(floats * 2, scorers.read_processing(str(folder)))


def test_default_processing_is_openai_clip(tmp_path):
  """No preprocessor_config.json: transformers' CLIPImageProcessor defaults (224, OpenAI)."""
  images = [np.random.default_rng(2).integers(0, 256, (240, 300, 3), dtype=np.uint8)]
  ours = scorers.preprocess(images, scorers.read_processing(str(tmp_path)))
  theirs = _oracle_pixels(transformers.CLIPImageProcessorPil(), images)
  np.testing.assert_array_equal(ours, theirs)


def test_processing_config_errors(tmp_path):
  with pytest.raises(UserError, match="'crop_size'"):
    scorers.processing_from_config({"crop_size": {"height": 224}})
  with pytest.raises(UserError, match="'image_std'"):
    scorers.processing_from_config({"image_std": [0.5, 0.5]})
  (tmp_path / scorers.PREPROCESSOR_CONFIG).write_text("{")
  with pytest.raises(UserError, match="not valid JSON"):
    scorers.read_processing(str(tmp_path))


class AestheticMLP(torch.nn.Module):
  """LAION improved-aesthetic-predictor's MLP (simple_inference.py), input size configurable:
  its state_dict keys are the published .pth's."""

  def __init__(self, input_size: int):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  def forward(self, x):
    return self.layers(x)


def make_scorer_folder(folder):
  """A tiny random CLIPModel + tokenizer + processor config in `folder`, and an aesthetic
  MLP: (model, mlp, folder, mlp path)."""
  vocab = tiny_models.CLIP_VOCAB
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=vocab["<|endoftext|>"], pad_token_id=0),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8),
      projection_dim=PROJECTION)
  torch.manual_seed(0)
  model = tiny_models.perturb_(transformers.CLIPModel(config), scale=0.3).eval()
  with torch.no_grad():
    model.logit_scale.fill_(LOGIT_SCALE)
  model.save_pretrained(folder)
  tiny_models.make_clip_tokenizer(pad_token="!").save_pretrained(folder)  # As laion's.
  _write_processor(folder)
  mlp = tiny_models.perturb_(AestheticMLP(PROJECTION), scale=0.05, seed=1).eval()
  mlp_path = str(folder / "aesthetic.safetensors")
  safetensors.torch.save_file(mlp.state_dict(), mlp_path)  # What MLP_CONVERSION writes.
  return model, mlp, folder, mlp_path


@pytest.fixture(scope="module")
def scorer_folder(tmp_path_factory):
  return make_scorer_folder(tmp_path_factory.mktemp("scorer"))


def _oracle_embeddings(model, folder, images, prompts):
  """PickScore's README recipe: processor(images), processor(text, padding=True), features."""
  processor = transformers.CLIPProcessor(image_processor=_oracle_processor(folder),
                                         tokenizer=transformers.CLIPTokenizer.from_pretrained(
                                             folder))
  image_inputs = processor(images=images, return_tensors="pt")
  text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77,
                          return_tensors="pt")
  with torch.no_grad():
    image = model.get_image_features(**image_inputs).pooler_output.double()
    text = model.get_text_features(**text_inputs).pooler_output.double()
  return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


# Written out independently of dpo_jax.scorers, in float64, from the sources it cites.
ORACLE_FORMULAS = {
    "clip": lambda cos: cos,  # DiffusionDPO utils/clip_utils.py
    "clip_torchmetrics": lambda cos: 100 * cos.clamp(min=0),  # torchmetrics CLIPScore
    "pickscore": lambda cos: math.exp(LOGIT_SCALE) * cos,  # PickScore README
}


@pytest.mark.parametrize("kind", list(ORACLE_FORMULAS))
def test_text_scores_match_transformers(scorer_folder, kind):
  """float32 throughout: cosines agree to ~2e-7, so 1e-5 of the formula's scale is strict."""
  model, _, folder, _ = scorer_folder
  images = _images(3)
  image, text = _oracle_embeddings(model, folder, images, PROMPTS)
  cos = (image * text).sum(-1)
  assert (cos > 0.05).any() and (cos < -0.05).any()  # Clamping at 0 matters in this batch.
  theirs = ORACLE_FORMULAS[kind](cos).numpy()

  ours = scorers.load_scorer(str(folder), kind)(images, PROMPTS)
  scale = {"clip": 1.0, "clip_torchmetrics": 100.0, "pickscore": math.exp(LOGIT_SCALE)}[kind]
  assert ours.dtype == np.float32 and ours.shape == (4,)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale)


def test_aesthetic_matches_laion_predictor(scorer_folder):
  model, mlp, folder, mlp_path = scorer_folder
  images = _images(4)
  image, _ = _oracle_embeddings(model, folder, images, PROMPTS)
  with torch.no_grad():
    theirs = mlp(image.float()).flatten().numpy()  # As aes_utils.py: the MLP in float32.
  assert np.ptp(theirs) > 1e-3  # The images score differently: the embedding reaches the MLP.

  ours = scorers.load_scorer(str(folder), "aesthetic", mlp_path=mlp_path)(images)
  assert ours.dtype == np.float32 and ours.shape == (4,)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_bfloat16_compute_stays_close(scorer_folder):
  """bf16 matmuls (8-bit mantissa, 0.4% rounding) with float32 norms: embeddings are off by
  ~1% of their scale, so cosines by ~0.01 (0.004 measured); 0.02 bounds it and is far below
  the spread of the cosines (> 0.1), so a score that ignored the image or prompt fails."""
  model, _, folder, _ = scorer_folder
  images = _images(3)
  image, text = _oracle_embeddings(model, folder, images, PROMPTS)
  theirs = (image * text).sum(-1).numpy()
  assert np.ptp(theirs) > 0.1
  ours = scorers.load_scorer(str(folder), "clip", dtype=jnp.bfloat16)(images, PROMPTS)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.02)


def test_one_compilation_per_batch_size(scorer_folder):
  """Prompts of any length tokenise to max_position_embeddings ids: one program per batch."""
  _, _, folder, _ = scorer_folder
  scorer = scorers.load_scorer(str(folder), "pickscore")
  first = scorer(_images(5), PROMPTS)
  second = scorer(_images(5), ["photo"] * 4)
  assert scorer.score_fn._cache_size() == 1
  assert not np.allclose(first, second)
  with pytest.raises(ValueError, match="one prompt string per image"):
    scorer(_images(5), PROMPTS[:3])


def _one_line_user_error(call, match):
  with pytest.raises(UserError, match=match) as error:
    call()
  assert "\n" not in str(error.value)


def test_aesthetic_mlp_file_errors(scorer_folder, tmp_path):
  _, mlp, folder, _ = scorer_folder
  load = lambda path: lambda: scorers.load_scorer(str(folder), "aesthetic", mlp_path=str(path))
  _one_line_user_error(load(tmp_path / "missing.safetensors"), "do not exist.*torch.load")
  _one_line_user_error(load(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), "pickled")
  # Saving the Sequential itself drops the published `layers.` prefix.
  safetensors.torch.save_file(mlp.layers.state_dict(), str(tmp_path / "bare.safetensors"))
  _one_line_user_error(load(tmp_path / "bare.safetensors"), "not the LAION aesthetic MLP")
  safetensors.torch.save_file(AestheticMLP(768).state_dict(), str(tmp_path / "l14.safetensors"))
  _one_line_user_error(load(tmp_path / "l14.safetensors"), "768-dim")
  (tmp_path / "corrupt.safetensors").write_bytes(b"not safetensors")
  _one_line_user_error(load(tmp_path / "corrupt.safetensors"), "cannot read")
  _one_line_user_error(lambda: scorers.load_scorer(str(folder), "clip", mlp_path="x"), "only it")
  _one_line_user_error(lambda: scorers.load_scorer(str(folder), "hpsv2"), "not one of")


def test_processor_must_fit_the_model(scorer_folder, tmp_path):
  """A processor folder of another model (crop 40, the model takes 32) is refused at load."""
  _, _, folder, _ = scorer_folder
  config = dict(_processor_config(legacy=True), crop_size=40, size=40)
  (tmp_path / scorers.PREPROCESSOR_CONFIG).write_text(json.dumps(config))
  _one_line_user_error(lambda: scorers.load_scorer(str(folder), "clip", processor_folder=str(
      tmp_path)), r"cropped to \(40, 40\) but the model .* takes 32x32")


def test_a_batch_split_over_the_devices_scores_as_one_image_at_a_time(scorer_folder):
  """8 images over the 8 fake devices, data-parallel, against each image scored alone."""
  _, _, folder, _ = scorer_folder
  scorer = scorers.load_scorer(str(folder), "clip")
  assert scorer.devices == 8
  images = _images(4) + _images(5)  # Of several sizes, as a list.
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
  assert len(images) == 8
  together = scorer(images, prompts)
  alone = np.concatenate([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(8)])
  np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
