"""Diffusion-DPO on Stable Diffusion 1.5 with Pick-a-Pic v2: the paper's recipe
(`dpo_jax/recipes.py` gives its sources and every value's reason).

  python -m dpo_jax.main --config configs/sd15.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Peak lr: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/2000 = 2.048e-5.
launchers/sd15.sh runs β=5000 at that same 2.048e-5; to reproduce it exactly add
--config.dpo.beta=5000 --config.optim.peak_lr=2.048e-5.
"""
from dpo_jax import default_config, recipes


def get_config():
  return recipes.pickapic_dpo(
      default_config.get_config(),
      # §5.1: SD1.5; the launcher's runwayml id now lives here.
      pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5",
      resolution=512,  # train.py's default.
      beta=2000.0,  # §5.1's main SD1.5 results.
      optimizer="adamw",  # §5.1: AdamW for SD1.5.
      remat=False,  # The code checkpoints only SDXL; SD1.5 at 512 px fits without recompute.
      # The float32 policy, AdamW moments and gradients, the bf16 reference and the frozen
      # encoders (≈16 GB for 0.86 B UNet params) fit one 40-80 GB GPU: sharding would only
      # add all-gathers. On 16 GiB chips (TPU v5e) shard them: --config.mesh.fsdp=4.
      fsdp=1)
