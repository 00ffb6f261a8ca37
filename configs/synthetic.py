"""A tiny random UNet on synthetic latent pairs made in memory: no files, no pipeline. The
quickest config that trains (a minute on a laptop CPU): for the tests, the benchmark harness
and a machine's first check. The learnable preference (winners have a positive mean in
channel 0) is learnt within a few steps; there is nothing to look at (see configs/demo.py)."""
import ml_collections

from dpo_jax import default_config

# A UNet shaped like SD1.5's (cross-attention at the top level, none at the bottom), small
# enough to train on a laptop CPU in a minute. Tuples, not lists: config_flags overrides only
# tuples (--config.model.unet.block_out_channels='(64,128,256)').
SYNTHETIC_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)


def get_config():
  config = default_config.get_config()
  config.model.unet = ml_collections.ConfigDict(SYNTHETIC_UNET)
  # Latent pairs made in memory (winners have a positive mean in channel 0): no files.
  config.data.format = "synthetic"
  config.data.resolution = 64  # 8×8 latents.
  config.train.steps = 40
  config.train.batch_pairs = 8
  config.train.log_every = 4
  config.train.ckpt_every = 1000  # Saved at the end only.
  # A random UNet needs a larger step than the recipe's to show learning in 40 steps.
  config.optim.peak_lr = 1e-6
  return config
