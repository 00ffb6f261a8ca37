"""Diffusion-DPO on Stable Diffusion 2.1 (768 px, v-prediction) with Pick-a-Pic v2.

Not a published recipe: the paper (Wallace et al., CVPR 2024, §5.1) trains only SD1.5 and
SDXL, and the official train.py asserts prediction_type == "epsilon", so SD2.1 was never run.
This is the SD1.5 recipe (configs/sd15.py; same sources) at SD2.1's native 768 px. The
v-prediction target comes from the pipeline's scheduler_config.json, not from this file.

  python -m dpo_jax.main --config configs/sd21.py --workdir RUN \
      --config.data.train_files='PICKAPIC_V2/train-*.parquet'

Peak lr: lr_per_pair × train.batch_pairs × 2000/dpo.beta = 1e-8 × 2048 × 2000/2000 = 2.048e-5.
"""
from ml_collections import config_dict

from dpo_jax import default_config


def get_config():
  config = default_config.get_config()

  # The 768 px v-prediction model. Override with a local folder.
  config.model.pretrained = "stabilityai/stable-diffusion-2-1"
  # The official code trains under fp16 autocast; bfloat16 needs no loss scaling. (SD2.1's
  # upcast_attention is moot: dpo_jax computes attention logits in float32.)
  config.model.compute_dtype = "bfloat16"
  # Rounds only what the bf16 compute rounds anyway (dense and conv weights).
  config.model.reference_dtype = "bfloat16"
  # 768 px is 2.25× SD1.5's activations at the same UNet size; fits without recompute at a
  # pair or two per device. Turn on (--config.model.remat=true) for larger microbatches.
  config.model.remat = False
  # Unset: XLA's attention on every backend. On GPUs 'cudnn' (flash attention) is the fast path:
  # --config.model.attention_implementation=cudnn.
  config.model.attention_implementation = config_dict.placeholder(str)

  config.data.format = "pickapic"  # As §5.1: Pick-a-Pic v2, ties excluded.
  config.data.train_files = config_dict.placeholder(str)  # Required: the parquet shards.
  # SD2.1's native resolution (its UNet sample_size: 96 latents).
  config.data.resolution = 768
  config.data.random_crop = False  # train.py: centre crop unless --random_crop.
  config.data.random_flip = True  # train.py: RandomHorizontalFlip unless --no_hflip.
  config.data.empty_prompt_prob = 0.2  # train.py --proportion_empty_prompts default 0.2.

  config.train.steps = 2000  # As SD1.5: launchers/sd15.sh --max_train_steps=2000.
  config.train.batch_pairs = 2048  # §5.1: an effective batch of 2048 pairs.
  # Each step runs batch_pairs/grad_accum pairs at once, split over all devices, so pick
  # grad_accum so that batch_pairs / (grad_accum × devices) pairs fit in one device's memory;
  # it must divide evenly. 128: 1 pair per device on 16 devices, 2 on one 8-GPU node.
  config.train.grad_accum = 128
  config.train.ckpt_every = 100  # Async orbax saves: a preempted run loses ≤ 100 steps.
  config.train.log_every = 10

  # The SD1.5 value (§5.1). Uncalibrated for v-prediction: ε-error = √ᾱ_t × v-error, so the
  # v-loss weights noisy timesteps more and the same β acts stronger there; sweep 2000-5000.
  config.dpo.beta = 2000.0
  config.dpo.loss = "dpo"

  config.optim.name = "adamw"  # §5.1: AdamW for SD1.5; SD2.1's UNet is the same size.
  # Unset so the recipe below applies; re-declared because the demo default is a float, and
  # ml_collections cannot set a float field back to None from the command line.
  config.optim.peak_lr = config_dict.placeholder(float)
  config.optim.lr_per_pair = 1e-8  # §5.1 / train.py --learning_rate=1e-8 --scale_lr.
  config.optim.warmup_steps = 500  # §5.1 "25% linear warmup" of 2000 steps.
  config.optim.weight_decay = 1e-2  # train.py --adam_weight_decay default.
  config.optim.grad_clip_norm = 1.0  # train.py --max_grad_norm default.

  # Pure data parallelism, as SD1.5 (0.87 B UNet params, ≈16 GB of state); on 16 GiB chips
  # (TPU v5e) shard it: --config.mesh.fsdp=4.
  config.mesh.fsdp = 1
  config.mesh.data = -1
  return config
