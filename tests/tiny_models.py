"""Tiny random diffusers models shaped like SD1.5, SD2.x and SDXL: the oracles' fixtures."""
import torch

# Shaped like SD1.5: conv projections, one head count for all blocks, 3 levels.
SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4)

# SD15_UNET cut to two levels and one layer a block: a whole train step compiles in about
# half the time, for the tests that train.
SMALL_SD15_UNET = dict(SD15_UNET, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

# Shaped like SD2.x: linear projections, per-block head counts, upcast attention.
SD21_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True)

# Shaped like SDXL base: no attention at the top level, transformer depth per block,
# text_time added conditioning (pooled text embedding + 6 size/crop ids).
SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8)
SDXL_TEXT_EMBED_DIM = 32

# SD21_UNET and SDXL_UNET cut to two levels likewise.
SMALL_SD21_UNET = dict(SD21_UNET, block_out_channels=(32, 64), attention_head_dim=(2, 4),
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

# SDXL's keeps its text_time added conditioning and a transformer depth per block.
SMALL_SDXL_UNET = dict(SDXL_UNET, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2))


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
  """Adds noise to every parameter so no norm is identity and no layer is zero-initialised:
  a swapped or mis-transposed weight then changes the output."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=generator))
  return model


def make_unet(config: dict, seed: int = 0):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  return perturb_(UNet2DConditionModel(**config), seed=seed).eval()


# Shaped like the SD 1.x/2.x/XL VAE: quant convs, mid-block attention, one downsampling level.
SD_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

# A CLIP-style BPE: every byte as itself and as a word end, so any unicode text maps.
CLIP_MERGES = [("p", "h"), ("o", "t"), ("ot", "o</w>"), ("ph", "oto</w>"), ("c", "a"),
               ("ca", "t</w>")]


def _clip_vocab() -> dict[str, int]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  byte_tokens = list(bytes_to_unicode().values())
  tokens = (byte_tokens + [b + "</w>" for b in byte_tokens] + ["".join(m) for m in CLIP_MERGES]
            + ["<|startoftext|>", "<|endoftext|>"])
  return {token: i for i, token in enumerate(tokens)}


CLIP_VOCAB = _clip_vocab()  # EOS is the largest id, as in the real CLIP vocabulary.


def make_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
  """SD 1.x pads with EOS; SD 2.x and SDXL's second tokenizer pad with '!'."""
  import transformers
  return transformers.CLIPTokenizer(vocab=CLIP_VOCAB, merges=CLIP_MERGES, pad_token=pad_token,
                                    model_max_length=model_max_length)


def make_text_encoder(kind: str = "CLIPTextModel", seed: int = 0, **config):
  """A tiny CLIPTextModel(WithProjection) over CLIP_VOCAB, 77 positions like the real ones."""
  import transformers
  defaults = dict(vocab_size=len(CLIP_VOCAB), hidden_size=32, intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=CLIP_VOCAB["<|startoftext|>"], eos_token_id=2, pad_token_id=1)
  torch.manual_seed(seed)
  model = getattr(transformers, kind)(transformers.CLIPTextConfig(**{**defaults, **config}))
  return perturb_(model, seed=seed).eval()


def make_vae(config: dict = SD_VAE, seed: int = 0):
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  return perturb_(AutoencoderKL(**config), seed=seed).eval()


def make_pipeline(kind: str, *, small: bool = False):
  """A tiny random StableDiffusionPipeline ('sd', SD1.5-shaped) or StableDiffusionXLPipeline
  ('sdxl'), with the schedulers and tokenizer padding of the real releases. `small` gives it
  the two-level UNet (SMALL_*_UNET): for a test that trains and needs no third level."""
  import diffusers
  unet = make_unet({("sd", False): SD15_UNET, ("sd", True): SMALL_SD15_UNET,
                    ("sdxl", False): SDXL_UNET, ("sdxl", True): SMALL_SDXL_UNET}[kind, small])
  schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1)
  if kind == "sd":
    return diffusers.StableDiffusionPipeline(
        unet=unet, vae=make_vae(), text_encoder=make_text_encoder(seed=1),
        tokenizer=make_clip_tokenizer(),
        scheduler=diffusers.PNDMScheduler(**schedule, skip_prk_steps=True,
                                          set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  # Encoder 1 pools by the legacy 'largest id' rule (eos_token_id=2, as the hub configs),
  # encoder 2 by the first EOS; their widths add up to the UNet's cross_attention_dim.
  text_encoder_2 = make_text_encoder(
      "CLIPTextModelWithProjection", seed=2, hidden_act="gelu",
      projection_dim=SDXL_TEXT_EMBED_DIM, eos_token_id=CLIP_VOCAB["<|endoftext|>"])
  return diffusers.StableDiffusionXLPipeline(
      unet=unet, vae=make_vae(dict(SD_VAE, scaling_factor=0.13025)),
      text_encoder=make_text_encoder(seed=1), text_encoder_2=text_encoder_2,
      tokenizer=make_clip_tokenizer(), tokenizer_2=make_clip_tokenizer(pad_token="!"),
      scheduler=diffusers.EulerDiscreteScheduler(**schedule, timestep_spacing="leading"))


def assert_same_tensors(expected: torch.nn.Module, actual: torch.nn.Module, what: str = ""):
  """Same keys, dtypes and bit-identical values in both modules' state_dicts."""
  expected, actual = expected.state_dict(), actual.state_dict()
  assert sorted(expected) == sorted(actual), what
  for key in expected:
    assert expected[key].dtype == actual[key].dtype, f"{what}.{key}"
    assert torch.equal(expected[key], actual[key]), f"{what}.{key}"


def assert_same_config(expected, actual):
  """Equal public config entries (keys without a leading '_'), tuples and lists alike."""
  import json
  as_json = lambda config: json.loads(json.dumps({k: v for k, v in config.items()
                                                  if not k.startswith("_")}))
  assert as_json(actual) == as_json(expected)
