"""Diffusion-DPO on Stable Diffusion XL 1.0 (base) with Pick-a-Pic v2: the paper's recipe
(`dpo_jax/recipes.py` gives its sources and every value's reason).

  python -m dpo_jax.main --config configs/sdxl.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Peak lr: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/5000 = 8.192e-6.
launchers/sdxl.sh runs β=5000 at 2.048e-5 with 200 warmup steps; to reproduce it exactly add
--config.optim.peak_lr=2.048e-5 --config.optim.warmup_steps=200.
"""
from dpo_jax import default_config, recipes


def get_config():
  config = recipes.pickapic_dpo(
      default_config.get_config(),
      # §5.1: the SDXL-1.0 base model. launchers/sdxl.sh swaps in
      # madebyollin/sdxl-vae-fp16-fix because it encodes in fp16, where SDXL's VAE
      # overflows; here the VAE encodes in float32 (model.vae_dtype), so the pipeline's own
      # serves. For the paper's exact encoder: --config.model.vae=madebyollin/sdxl-vae-fp16-fix.
      pretrained="stabilityai/stable-diffusion-xl-base-1.0",
      resolution=1024,  # train.py's SDXL default.
      beta=5000.0,  # §5.1 (also launchers/sdxl.sh --beta_dpo 5000).
      optimizer="adafactor",  # §5.1: Adafactor for SDXL "to save memory".
      # train.py checkpoints gradients for every SDXL run: at 1024 px the activations of the
      # 2.6 B-parameter UNet, not its weights, bound the microbatch.
      remat=True,
      # The float32 policy and gradients, the bf16 reference and the frozen encoders come to
      # ≈30 GB for 2.6 B UNet params: sharding them over 8 devices (one GPU node, or a TPU
      # slice's ICI) leaves each ≈4 GB and fits 16-32 GiB TPU chips. Needs a device count
      # divisible by 8; on fewer devices set --config.mesh.fsdp to their count.
      fsdp=8)
  # train.py conditions every image on (R, R, 0, 0, R, R), R = resolution, whatever its size.
  config.data.sdxl_time_ids = "constant"
  return config
