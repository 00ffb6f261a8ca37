"""Tiny random diffusers models shaped like SD1.5, SD2.x and SDXL: the oracles' fixtures."""
import torch

# Shaped like SD1.5: conv projections, one head count for all blocks, 3 levels.
SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4)

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
