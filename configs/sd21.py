"""Diffusion-DPO on Stable Diffusion 2.1 (768 px, v-prediction) with Pick-a-Pic v2.

Not a published recipe: the paper (§5.1) trains only SD1.5 and SDXL, and the official
train.py asserts prediction_type == "epsilon", so SD2.1 was never run. This is the paper's
recipe (`dpo_jax/recipes.py`) at SD2.1's native 768 px. The v-prediction target comes from
the pipeline's scheduler_config.json, not from this file.

  python -m dpo_jax.main --config configs/sd21.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Peak lr: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/2000 = 2.048e-5.
"""
from dpo_jax import default_config, recipes


def get_config():
  return recipes.pickapic_dpo(
      default_config.get_config(),
      # The 768 px v-prediction model. (Its upcast_attention is moot: dpo_jax computes
      # attention logits in float32.)
      pretrained="stabilityai/stable-diffusion-2-1",
      resolution=768,  # Its UNet's sample_size: 96 latents.
      # The SD1.5 value. Uncalibrated for v-prediction: ε-error = √ᾱ_t × v-error, so the
      # v-loss weights noisy timesteps more and the same β acts stronger there; sweep 2000-5000.
      beta=2000.0,
      optimizer="adamw",  # As SD1.5: the UNet is the same size.
      # 768 px is 2.25× SD1.5's activations; fits without recompute at a pair or two per
      # device. Turn on (--config.model.remat=true) for larger microbatches.
      remat=False,
      fsdp=1)  # As SD1.5 (0.87 B UNet params); on 16 GiB chips --config.mesh.fsdp=4.
