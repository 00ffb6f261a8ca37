"""The paper's training recipe, written once for every Stable Diffusion release's config.

Sources: the paper (Wallace et al., CVPR 2024) §5.1 "Hyperparameters", and the official code,
SalesforceAIResearch/DiffusionDPO train.py and launchers/sd15.sh, launchers/sdxl.sh.
configs/sd15.py, configs/sd21.py and configs/sdxl.py call `pickapic_dpo` and then set only
what is their own.

Learning rate: the paper prints "(2000/β) · 2.048·10⁻⁸"; the code's `--learning_rate=1e-8
--scale_lr` is 1e-8 per pair × 16 GPUs × 1 pair × 128 accumulation = 2.048·10⁻⁵, so the
printed exponent reads as a typo for 10⁻⁵ (1e-8 is the per-pair rate). Here:
lr_per_pair × train.batch_pairs × 2000/dpo.beta (`optim.peak_learning_rate`); the official
launchers run β=5000 at 2.048e-5 (the code has no 2000/β factor).
"""
import ml_collections


def pickapic_dpo(config: ml_collections.ConfigDict, *, pretrained: str, resolution: int,
                 beta: float, optimizer: str, remat: bool,
                 fsdp: int) -> ml_collections.ConfigDict:
  """`config` with the paper's Diffusion-DPO recipe on Pick-a-Pic v2 for the release
  `pretrained` at `resolution` px; `beta`, `optimizer`, `remat` and `fsdp` are what the
  releases differ in. Returns the same (modified) config."""
  config.model.pretrained = pretrained  # A hub id; override with a local folder.
  # The code trains under fp16 autocast (--mixed_precision default); bfloat16 needs no loss
  # scaling. Policy params stay float32 masters either way.
  config.model.compute_dtype = "bfloat16"
  # The code casts ref_unet to the fp16 weight dtype. Here the bf16 copy rounds only what the
  # bf16 compute rounds anyway (dense and conv weights), so step 1 is still exactly ln 2.
  config.model.reference_dtype = "bfloat16"
  # The code checkpoints gradients for SDXL only. (dpo.reference_pass='shared' holds the
  # reference's activations for the backward pass too: if memory binds, turn remat on or
  # use 'separate'.)
  config.model.remat = remat
  # model.attention_implementation stays unset: XLA's attention on accelerators (ours on
  # the CPU). On NVIDIA GPUs 'cudnn' (flash attention for the image self-attention) is the
  # fast path: --config.model.attention_implementation=cudnn.

  config.data.format = "pickapic"  # §5.1: Pick-a-Pic v2, ties excluded (851,293 pairs).
  # data.train_files stays unset: the parquet shards are required on the command line.
  config.data.resolution = resolution  # §5.1 "fixed square resolutions"; train.py's default.
  config.data.random_crop = False  # train.py: centre crop unless --random_crop.
  config.data.random_flip = True  # train.py: RandomHorizontalFlip unless --no_hflip.
  config.data.empty_prompt_prob = 0.2  # train.py --proportion_empty_prompts default 0.2.

  config.train.steps = 2000  # launchers/sd15.sh and sdxl.sh --max_train_steps=2000.
  # §5.1: an effective batch of 2048 pairs (16 A100 × 1 pair × 128 accumulation).
  config.train.batch_pairs = 2048
  # Each step runs batch_pairs/grad_accum pairs at once, split over all devices, so pick
  # grad_accum so that batch_pairs / (grad_accum × devices) pairs fit in one device's memory;
  # it must divide evenly. 128 is the paper's layout: 16 pairs per microbatch = 1 per device
  # on 16 GPUs, 2 per device on one 8-GPU node; fewer, larger microbatches (e.g. 32) run
  # faster where they fit; 32+ devices need grad_accum ≤ 64.
  config.train.grad_accum = 128
  # The launchers save every 500 (SD1.5) or 200 (SDXL); orbax saves asynchronously, so 100
  # costs little and a preempted run loses at most 100 steps.
  config.train.ckpt_every = 100
  config.train.log_every = 10

  # §5.1: β=2000 for the main SD1.5 results (2000-5000 works well), 5000 for SDXL. Paper
  # convention: the ½ is inside the sigmoid.
  config.dpo.beta = beta
  config.dpo.loss = "dpo"

  # §5.1: AdamW for SD1.5, Adafactor for SDXL "to save memory" (train.py:
  # transformers.Adafactor with scale_parameter=False, relative_step=False,
  # clip_threshold=1.0, weight_decay=1e-2).
  config.optim.name = optimizer
  # optim.peak_lr stays unset so the recipe applies (see the module docstring).
  config.optim.lr_per_pair = 1e-8  # §5.1 / train.py --learning_rate=1e-8 --scale_lr.
  # §5.1 "25% linear warmup": 500 of 2000 steps, then constant (--lr_scheduler
  # constant_with_warmup).
  config.optim.warmup_steps = 500
  config.optim.schedule = "constant"
  config.optim.weight_decay = 1e-2  # train.py --adam_weight_decay default (Adafactor too).
  # train.py --max_grad_norm default. It skips clipping under --use_adafactor, but the SDXL
  # launcher gets Adafactor from --sdxl without that flag, so its runs were clipped at 1.0.
  config.optim.grad_clip_norm = 1.0

  # Params, gradients and optimiser state are sharded over `fsdp` devices (1: pure data
  # parallelism); the rest of the devices form the data axis.
  config.mesh.fsdp = fsdp
  config.mesh.data = -1
  return config
