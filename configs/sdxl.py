"""Diffusion-DPO on Stable Diffusion XL 1.0 (base) with Pick-a-Pic v2: the paper's recipe.

Sources: the paper (Wallace et al., CVPR 2024) §5.1 "Hyperparameters", and the official code,
SalesforceAIResearch/DiffusionDPO train.py and launchers/sdxl.sh.

  python -m dpo_jax.main --config configs/sdxl.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Learning rate: the paper prints "(2000/β) · 2.048·10⁻⁸"; the code's `--learning_rate=1e-8
--scale_lr` is 1e-8 per pair × 16 GPUs × 1 pair × 128 accumulation = 2.048·10⁻⁵, so the
printed exponent reads as a typo for 10⁻⁵ (1e-8 is the per-pair rate).
Here: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/5000 = 8.192e-6.
launchers/sdxl.sh runs β=5000 at 2.048e-5 (the code has no 2000/β factor) with 200 warmup
steps; to reproduce it exactly add --config.optim.peak_lr=2.048e-5
--config.optim.warmup_steps=200.
"""
from ml_collections import config_dict

from dpo_jax import default_config


def get_config():
  config = default_config.get_config()

  # §5.1: the SDXL-1.0 base model [33]. Override with a local folder. launchers/sdxl.sh swaps
  # in madebyollin/sdxl-vae-fp16-fix because it encodes in fp16, where SDXL's VAE overflows;
  # here the VAE encodes in float32 (model.vae_dtype), so the pipeline's own VAE serves. For
  # the paper's exact encoder: --config.model.vae=madebyollin/sdxl-vae-fp16-fix.
  config.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
  # The code trains under fp16 autocast (--mixed_precision default); bfloat16 needs no loss
  # scaling. Policy params stay float32 masters either way.
  config.model.compute_dtype = "bfloat16"
  # The code casts ref_unet to the fp16 weight dtype. Here the bf16 copy rounds only what the
  # bf16 compute rounds anyway (dense and conv weights), so step 1 is still exactly ln 2.
  config.model.reference_dtype = "bfloat16"
  # train.py turns on gradient checkpointing for every SDXL run: at 1024 px the activations of
  # the 2.6 B-parameter UNet, not its weights, bound the microbatch.
  config.model.remat = True
  # Unset: XLA's attention on every backend. On GPUs 'cudnn' (flash attention) is the fast
  # path, and matters most here (4096-token self-attention):
  # --config.model.attention_implementation=cudnn.
  config.model.attention_implementation = config_dict.placeholder(str)

  config.data.format = "pickapic"  # §5.1: Pick-a-Pic v2, ties excluded (851,293 pairs).
  config.data.train_files = config_dict.placeholder(str)  # Required: the parquet shards.
  config.data.resolution = 1024  # §5.1 "fixed square resolutions"; train.py SDXL default 1024.
  config.data.random_crop = False  # train.py: centre crop unless --random_crop.
  config.data.random_flip = True  # train.py: RandomHorizontalFlip unless --no_hflip.
  config.data.empty_prompt_prob = 0.2  # train.py --proportion_empty_prompts default 0.2.
  # train.py conditions every image on (R, R, 0, 0, R, R), R = resolution, whatever its size.
  config.data.sdxl_time_ids = "constant"

  config.train.steps = 2000  # launchers/sdxl.sh --max_train_steps=2000.
  # §5.1: an effective batch of 2048 pairs (16 A100 × 1 pair × 128 accumulation).
  config.train.batch_pairs = 2048
  # Each step runs batch_pairs/grad_accum pairs at once, split over all devices, so pick
  # grad_accum so that batch_pairs / (grad_accum × devices) pairs fit in one device's memory;
  # it must divide evenly. 128 is the paper's layout: 16 pairs per microbatch = 1 per device on
  # 16 GPUs, 2 per device on one 8-GPU node (untested at full size: if that runs out of
  # memory, grad_accum=256 gives 1); 32+ devices need grad_accum ≤ 64.
  config.train.grad_accum = 128
  # launchers/sdxl.sh saves every 200; orbax saves asynchronously, so 100 costs little and a
  # preempted run loses at most 100 steps.
  config.train.ckpt_every = 100
  config.train.log_every = 10

  # §5.1: SDXL results with β=5000 (also launchers/sdxl.sh --beta_dpo 5000). Paper convention:
  # the ½ is inside the sigmoid.
  config.dpo.beta = 5000.0
  config.dpo.loss = "dpo"

  # §5.1: Adafactor [43] for SDXL "to save memory" (train.py: transformers.Adafactor with
  # scale_parameter=False, relative_step=False, clip_threshold=1.0, weight_decay=1e-2).
  config.optim.name = "adafactor"
  # Unset so the recipe below applies; re-declared because the demo default is a float, and
  # ml_collections cannot set a float field back to None from the command line.
  config.optim.peak_lr = config_dict.placeholder(float)
  # §5.1 / train.py --learning_rate=1e-8 --scale_lr: 1e-8 per pair of the global batch.
  config.optim.lr_per_pair = 1e-8
  # §5.1 "25% linear warmup": 500 of 2000 steps, then constant (--lr_scheduler
  # constant_with_warmup). launchers/sdxl.sh uses --lr_warmup_steps=200 instead.
  config.optim.warmup_steps = 500
  config.optim.weight_decay = 1e-2  # train.py --adam_weight_decay default, given to Adafactor.
  # train.py --max_grad_norm default. It skips clipping under --use_adafactor, but the SDXL
  # launcher gets Adafactor from --sdxl without that flag, so its runs were clipped at 1.0.
  config.optim.grad_clip_norm = 1.0

  # The float32 policy and gradients, the bf16 reference and the frozen encoders come to
  # ≈30 GB for 2.6 B UNet params: sharding them over 8 devices (one GPU node, or a TPU slice's
  # ICI) leaves each ≈4 GB, freeing HBM for activations, and fits 16-32 GiB TPU chips. Needs a
  # device count divisible by 8; on fewer devices set --config.mesh.fsdp to their count.
  config.mesh.fsdp = 8
  config.mesh.data = -1
  return config
