"""Diffusion-DPO LoRA on Stable Diffusion XL 1.0 (base) with Pick-a-Pic v2: the recipe of
diffusers' example (examples/research_projects/diffusion_dpo: README.md's SDXL command and
train_diffusion_dpo_sdxl.py's defaults), in this repo's conventions. docs/lora.md explains
LoRA.

  python -m dpo_jax.main --config configs/sdxl_lora.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

β: train_diffusion_dpo_sdxl.py, unlike the SD1.5 script, puts the ½ inside (scale_term =
−0.5·beta_dpo), so its default --beta_dpo 5000 is dpo.beta=5000 here too.
"""
from dpo_jax import default_config


def get_config():
  config = default_config.get_config()
  config.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
  # The example encodes with madebyollin/sdxl-vae-fp16-fix because it encodes in fp16, where
  # SDXL's VAE overflows; here the VAE encodes in float32 (model.vae_dtype), so the
  # pipeline's own serves. For the example's encoder:
  # --config.model.vae=madebyollin/sdxl-vae-fp16-fix.
  config.model.compute_dtype = "bfloat16"  # --mixed_precision=fp16; bf16 needs no loss scale.
  config.model.reference_dtype = "bfloat16"  # The frozen base, as the example's fp16 UNet.
  config.model.remat = True  # --gradient_checkpointing.

  # README: kashif/pickascore (Pick-a-Pic pairs); here the published Pick-a-Pic v2 shards.
  config.data.format = "pickapic"
  config.data.resolution = 1024  # --resolution default.
  config.data.random_crop = False  # Centre crop unless --random_crop.
  config.data.random_flip = True
  config.data.shared_flip = True  # The script flips winner and loser together.
  config.data.empty_prompt_prob = 0.0  # The example never drops captions.
  # compute_time_ids: each pair's original size and crop corner, not (R, R, 0, 0, R, R).
  config.data.sdxl_time_ids = "actual"

  config.train.steps = 2000  # --max_train_steps=2000.
  # --train_batch_size=8 × --gradient_accumulation_steps=2 on one GPU = 16 pairs per step.
  config.train.batch_pairs = 16
  config.train.grad_accum = 2
  config.train.ckpt_every = 500  # --checkpointing_steps=500.
  config.train.log_every = 10

  config.dpo.beta = 5000.0  # --beta_dpo default 5000, ½ inside as here.
  config.dpo.loss = "dpo"

  # --use_8bit_adam is bitsandbytes' AdamW8bit: AdamW with quantised moments, to save
  # memory; LoRA's moments are small, so plain float32 AdamW here (not the paper's
  # Adafactor, which its full fine-tuning needed).
  config.optim.name = "adamw"
  config.optim.peak_lr = 1e-5  # --learning_rate=1e-5, without --scale_lr.
  config.optim.warmup_steps = 0  # --lr_warmup_steps=0.
  config.optim.schedule = "constant"  # --lr_scheduler=constant.
  config.optim.weight_decay = 1e-2  # --adam_weight_decay default.
  config.optim.grad_clip_norm = 1.0  # --max_grad_norm default.

  # LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
  # target_modules=["to_k", "to_q", "to_v", "to_out.0"]) with --rank=8.
  config.lora.enabled = True
  config.lora.rank = 8
  config.lora.alpha = 8.0
  config.lora.targets = "to_q,to_k,to_v,to_out.0"
  config.lora.init = "gaussian"

  # The frozen bf16 base (5.1 GB) and the adapters fit one 40-80 GB GPU unsharded; on
  # 16 GiB chips shard the base with --config.mesh.fsdp.
  config.mesh.fsdp = 1
  config.mesh.data = -1
  return config
