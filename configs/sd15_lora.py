"""Diffusion-DPO LoRA on Stable Diffusion 1.5 with Pick-a-Pic v2: the recipe of diffusers'
example (examples/research_projects/diffusion_dpo: README.md's SD command and
train_diffusion_dpo.py's defaults), in this repo's conventions. docs/lora.md explains LoRA.

  python -m dpo_jax.main --config configs/sd15_lora.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

β: train_diffusion_dpo.py's loss is −log σ(β·(Δref − Δpolicy)), with no ½, so its default
--beta_dpo 2500 is dpo.beta=5000 here (the ½ inside, as the paper).
"""
from dpo_jax import default_config


def get_config():
  config = default_config.get_config()
  # README: runwayml/stable-diffusion-v1-5, which now lives under this id.
  config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  config.model.compute_dtype = "bfloat16"  # --mixed_precision=fp16; bf16 needs no loss scale.
  config.model.reference_dtype = "bfloat16"  # The frozen base, as the example's fp16 UNet.
  config.model.remat = True  # --gradient_checkpointing.

  # README: kashif/pickascore (Pick-a-Pic pairs); here the published Pick-a-Pic v2 shards.
  config.data.format = "pickapic"
  config.data.resolution = 512  # --resolution=512.
  config.data.random_crop = False  # Centre crop unless --random_crop.
  config.data.random_flip = True  # RandomHorizontalFlip on each image, unless --no_hflip.
  config.data.empty_prompt_prob = 0.0  # The example never drops captions.

  config.train.steps = 10000  # --max_train_steps=10000.
  # --train_batch_size=16 × --gradient_accumulation_steps=2 on one GPU = 32 pairs per step.
  config.train.batch_pairs = 32
  config.train.grad_accum = 2
  config.train.ckpt_every = 500  # The example saves every 2000; orbax saves asynchronously.
  config.train.log_every = 10

  config.dpo.beta = 5000.0  # --beta_dpo 2500 without the ½ (module docstring).
  config.dpo.loss = "dpo"

  # --use_8bit_adam is bitsandbytes' AdamW8bit: AdamW with quantised moments, to save
  # memory; LoRA's moments are small, so plain float32 AdamW here.
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

  config.mesh.fsdp = 1  # The frozen bf16 base (1.7 GB) and the adapters fit any GPU.
  config.mesh.data = -1
  return config
