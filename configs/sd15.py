"""Diffusion-DPO on Stable Diffusion 1.5 with Pick-a-Pic v2: the paper's recipe.

Sources: the paper (Wallace et al., CVPR 2024) §5.1 "Hyperparameters", and the official code,
SalesforceAIResearch/DiffusionDPO train.py and launchers/sd15.sh.

  python -m dpo_jax.main --config configs/sd15.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Learning rate: the paper prints "(2000/β) · 2.048·10⁻⁸"; the code's `--learning_rate=1e-8
--scale_lr` is 1e-8 per pair × 16 GPUs × 1 pair × 128 accumulation = 2.048·10⁻⁵, so the
printed exponent reads as a typo for 10⁻⁵ (1e-8 is the per-pair rate).
Here: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/2000 = 2.048e-5.
launchers/sd15.sh runs β=5000 at that same 2.048e-5 (the code has no 2000/β factor); to
reproduce it exactly add --config.dpo.beta=5000 --config.optim.peak_lr=2.048e-5.
"""
from ml_collections import config_dict

from dpo_jax import default_config


def get_config():
  config = default_config.get_config()

  # §5.1: SD1.5 [39]; the launcher's runwayml id now lives here. Override with a local folder.
  config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  # The code trains under fp16 autocast (--mixed_precision default); bfloat16 needs no loss
  # scaling. Policy params stay float32 masters either way.
  config.model.compute_dtype = "bfloat16"
  # The code casts ref_unet to the fp16 weight dtype. Here the bf16 copy rounds only what the
  # bf16 compute rounds anyway (dense and conv weights), so step 1 is still exactly ln 2.
  config.model.reference_dtype = "bfloat16"
  # The code checkpoints gradients only for SDXL; SD1.5 at 512 px fits without recompute.
  # (dpo.reference_pass='shared' then holds the reference's activations for the backward
  # pass too; if memory binds, turn remat on or use 'separate'.)
  config.model.remat = False
  # Unset: XLA's attention on every backend. On GPUs 'cudnn' (flash attention) is the fast path:
  # --config.model.attention_implementation=cudnn.
  config.model.attention_implementation = config_dict.placeholder(str)

  config.data.format = "pickapic"  # §5.1: Pick-a-Pic v2, ties excluded (851,293 pairs).
  config.data.train_files = config_dict.placeholder(str)  # Required: the parquet shards.
  config.data.resolution = 512  # §5.1 "fixed square resolutions"; train.py default 512.
  config.data.random_crop = False  # train.py: centre crop unless --random_crop.
  config.data.random_flip = True  # train.py: RandomHorizontalFlip unless --no_hflip.
  config.data.empty_prompt_prob = 0.2  # train.py --proportion_empty_prompts default 0.2.

  config.train.steps = 2000  # launchers/sd15.sh --max_train_steps=2000 (§5.4: 2000 steps).
  # §5.1: an effective batch of 2048 pairs (16 A100 × 1 pair × 128 accumulation).
  config.train.batch_pairs = 2048
  # Each step runs batch_pairs/grad_accum pairs at once, split over all devices, so pick
  # grad_accum so that batch_pairs / (grad_accum × devices) pairs fit in one device's memory;
  # it must divide evenly. 128 is the paper's layout: 16 pairs per microbatch = 1 per device on
  # 16 GPUs, 2 per device on one 8-GPU node. An 80 GB GPU should hold several SD1.5 pairs at
  # 512 px, and fewer, larger microbatches (e.g. grad_accum=32) run faster; 32+ devices need
  # grad_accum ≤ 64.
  config.train.grad_accum = 128
  # launchers/sd15.sh saves every 500; orbax saves asynchronously, so 100 costs little and a
  # preempted run loses at most 100 steps.
  config.train.ckpt_every = 100
  config.train.log_every = 10

  # §5.1: main SD1.5 results with β=2000 (β ∈ [2000, 5000] works well); launchers/sd15.sh uses
  # 5000. Paper convention: the ½ is inside the sigmoid.
  config.dpo.beta = 2000.0
  config.dpo.loss = "dpo"

  config.optim.name = "adamw"  # §5.1: AdamW [27] for SD1.5.
  # Unset so the recipe below applies; re-declared because the demo default is a float, and
  # ml_collections cannot set a float field back to None from the command line.
  config.optim.peak_lr = config_dict.placeholder(float)
  # §5.1 / train.py --learning_rate=1e-8 --scale_lr: 1e-8 per pair of the global batch.
  config.optim.lr_per_pair = 1e-8
  # §5.1 "25% linear warmup": 500 of 2000 steps, as launchers/sd15.sh --lr_warmup_steps=500
  # with --lr_scheduler=constant_with_warmup (constant afterwards).
  config.optim.warmup_steps = 500
  config.optim.weight_decay = 1e-2  # train.py --adam_weight_decay default.
  config.optim.grad_clip_norm = 1.0  # train.py --max_grad_norm default.

  # Pure data parallelism: the float32 policy, AdamW moments and gradients, the bf16 reference
  # and the frozen encoders (≈16 GB for 0.86 B UNet params) fit one 40-80 GB GPU, so sharding
  # would only add all-gathers. On 16 GiB chips (TPU v5e) shard them: --config.mesh.fsdp=4.
  config.mesh.fsdp = 1
  config.mesh.data = -1
  return config
