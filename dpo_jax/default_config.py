"""Every config key dpo_jax reads, with neutral defaults: the base of every config.

`configs/*.py` start from this `get_config()` and override what their run needs (the paper's
recipes through `dpo_jax.recipes`, the CPU demo in configs/synthetic.py), so any key here can be
set on the command line (`--config.dpo.beta=5000`). Optional values are `placeholder`s
because ml_collections cannot override a field whose default is plain None.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  # A diffusers pipeline folder or hub id; unset: a random UNet built from `model.unet`.
  config.model.pretrained = config_dict.placeholder(str)
  # A diffusers unet/config.json as a dict, for a random UNet (configs/synthetic.py sets one).
  config.model.unet = ml_collections.ConfigDict()
  config.model.variant = config_dict.placeholder(str)  # e.g. 'fp16' for *.fp16.safetensors.
  config.model.revision = config_dict.placeholder(str)  # A hub id's branch, tag or commit.
  # A UNet (or pipeline) folder whose UNet replaces the pipeline's as the starting point of
  # policy and reference (official --unet_init), e.g. an earlier SFT run's export.
  config.model.unet_init = config_dict.placeholder(str)
  # A VAE folder replacing the pipeline's for encoding (official
  # --pretrained_vae_model_name_or_path, e.g. madebyollin/sdxl-vae-fp16-fix).
  config.model.vae = config_dict.placeholder(str)
  config.model.compute_dtype = "float32"  # The UNet's; 'bfloat16' on accelerators.
  # The frozen copy: 'bfloat16' rounds what the compute rounds anyway (dense and conv
  # weights) and halves its memory; normalisation scales and biases stay float32.
  config.model.reference_dtype = "float32"
  # The frozen encoders' compute dtypes, in the step and in `prepare` alike, so a latent
  # cache equals encoding in the step. float32 by default: they run once per image.
  config.model.vae_dtype = "float32"
  config.model.text_encoder_dtype = "float32"
  config.model.remat = False
  # With remat, what each recomputed block keeps: 'full' its inputs alone (least memory);
  # 'dots' also its dense and 1x1 products' outputs (models/unet.REMAT_POLICIES): more
  # memory, less recomputation. `python -m dpo_jax.tools.memory` prices each.
  config.model.remat_policy = "full"
  # Unset: ours ('blocked', FlashAttention's backward pass) on the CPU, XLA's elsewhere;
  # 'xla' | 'cudnn' (NVIDIA) | 'blocked' (models/layers.attention_implementation).
  config.model.attention_implementation = config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  # 'synthetic': latent pairs with a learnable preference (winners have a positive mean in
  # channel 0), made in memory, so the demo needs no files. 'pickapic': Pick-a-Pic v2
  # parquet shards as published; 'jsonl': your own {"prompt", "chosen", "rejected"} lines;
  # 'unpaired': {"prompt", "image", "label": true|false} lines, one rated image each, for
  # dpo.loss='kto' (Diffusion-KTO on likes and dislikes); 'tfds': a TFDS dataset
  # (array_record) with Pick-a-Pic's features; 'sampled': pairs the model draws itself,
  # judged by a scorer (data.sampled below) (all need model.pretrained).
  config.data.format = "pickapic"
  config.data.train_files = config_dict.placeholder(str)  # A glob or comma-separated list.
  # Pick-a-Pic given as a folder (data.train_files=PICKAPIC_V2): its files of this split,
  # '{split}-*.parquet' anywhere below it ('train', 'validation', 'test',
  # 'validation_unique', 'test_unique'), as the official --split.
  config.data.split = "train"
  # Train on a seeded random subset of this many pairs (official --max_train_samples).
  config.data.max_train_pairs = config_dict.placeholder(int)
  # data.format='tfds': 'name', 'name:1.0.0' (found in tfds_data_dir) or a prepared version
  # folder; read with tfds.data_source, without TensorFlow.
  config.data.tfds_name = config_dict.placeholder(str)
  config.data.tfds_split = "train"
  config.data.tfds_data_dir = config_dict.placeholder(str)
  # A latent cache written by `python -m dpo_jax.prepare`: when set, training reads it
  # instead of the images (no VAE or text encoder in the step, no JPEG decoding).
  config.data.cache_dir = config_dict.placeholder(str)
  # Pick-a-Pic only: comma-separated substrings; keep a pair only if both images' model names
  # contain one (case-insensitive). The paper's Dreamlike-only subset: 'dreamlike'.
  config.data.model_filter = config_dict.placeholder(str)
  # Pick-a-Pic parquet only: each epoch shuffles the row groups, then the pairs within
  # windows of this many consecutive groups, so each group (~100s of MB in the published
  # shards) is read about once an epoch instead of about once per pair; each process keeps
  # max(4, this) decoded groups in memory. 0: shuffle all pairs at once (the order of every
  # other source, and of a run saved before this key existed).
  config.data.shuffle_window_groups = 4
  config.data.resolution = 512  # Pixels; latents are resolution / 8.
  config.data.context_length = 8  # Text tokens of the synthetic conditioning.
  config.data.random_crop = False  # Official default: centre crop.
  config.data.random_flip = True  # Official: per-image horizontal flip.
  # True: winner and loser flip together (one draw per pair), so a pair never differs by a
  # mirror alone; the official code draws each image's flip on its own.
  config.data.shared_flip = False
  config.data.empty_prompt_prob = 0.2  # Official proportion_empty_prompts (one per pair).
  config.data.workers = 0  # grain processes decoding JPEGs (0: a thread of the main process).
  # Unusable pairs (undecodable or tiny images, null captions or labels, missing files,
  # malformed lines) are skipped and counted; the run stops, saved, once their share of the
  # pairs read passes this (judged after 1000 pairs).
  config.data.max_bad_fraction = 0.05
  # SDXL time ids: 'constant' (R, R, 0, 0, R, R) as the official DPO code, or 'actual'
  # original size and crop of each image (diffusers' training convention).
  config.data.sdxl_time_ids = "constant"
  # data.format='sampled' (dpo_jax/sampled_pairs.py): before training, pairs are drawn from
  # model.pretrained itself, pairs_per_prompt per prompt of `prompts`, and `judge` (an
  # `evaluate --scorer` spec, e.g. 'centred' or 'pickscore=FOLDER,processor=FOLDER') picks
  # each winner; they are written to WORKDIR/pairs and trained on as Pick-a-Pic data.
  config.data.sampled = ml_collections.ConfigDict()
  config.data.sampled.prompts = config_dict.placeholder(str)  # A prompts file.
  config.data.sampled.pairs_per_prompt = 8
  config.data.sampled.judge = config_dict.placeholder(str)
  # Held-out pairs (WORKDIR/pairs_heldout), the default eval.pairs when set.
  config.data.sampled.heldout_prompts = config_dict.placeholder(str)
  config.data.sampled.heldout_pairs_per_prompt = 8
  config.data.sampled.steps = 25  # DDIM steps.
  config.data.sampled.guidance = 7.5
  config.data.sampled.batch = 64  # Images per compiled sampler call.
  config.data.sampled.seed = config_dict.placeholder(int)  # Unset: train.seed.

  config.train = ml_collections.ConfigDict()
  config.train.steps = 2000
  config.train.batch_pairs = 64  # Global, in pairs, per optimiser step.
  # Split each step's batch into this many sequential microbatches (gradients averaged):
  # the paper's 2048 pairs per step on 16 GPUs is batch_pairs=2048, grad_accum=128.
  config.train.grad_accum = 1
  config.train.seed = 0
  config.train.ckpt_every = 500
  config.train.log_every = 10
  # A step whose loss or gradient is NaN or inf is skipped (params and optimiser state kept,
  # counted in metrics.jsonl) and no checkpoint is written while such steps run in a row;
  # this many in a row stop the run (checked at each log step), the newest checkpoint being
  # one from before them.
  config.train.max_bad_steps = 10
  # XLA's persistent compilation cache: a resumed or repeated run reads its compiled programs
  # back instead of compiling again (minutes for SD-size steps on a GPU). Unset: WORKDIR/
  # xla_cache, unless JAX_COMPILATION_CACHE_DIR already names one; '' turns it off.
  config.train.compilation_cache_dir = config_dict.placeholder(str)
  # 'A,B': a jax.profiler trace of steps A..B (after compilation) in WORKDIR/profile, for
  # TensorBoard's profile plugin or Perfetto (xprof). Unset: no trace.
  config.train.profile_steps = config_dict.placeholder(str)

  # Devices form a ('data', 'fsdp') mesh; -1 takes what the other axis leaves. Params and
  # optimizer state are sharded over 'fsdp' (keep it within one host's NVLink/ICI domain).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.min_shard_size = 2**18  # Arrays with fewer elements are replicated, not sharded.

  # Multi-host: SLURM, Open MPI and TPU pod launches are detected; set these for a run
  # started by hand on several machines (see launch/).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = config_dict.placeholder(str)
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)
  config.distributed.multi_process = config_dict.placeholder(bool)

  # In-training validation (dpo_jax/validation.py), every `every` steps and at the end; 0: off.
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 0
  config.eval.pairs = config_dict.placeholder(str)  # Held-out pairs: implicit accuracy.
  config.eval.draws = 4  # (t, ε) draws averaged per held-out pair.
  config.eval.prompts = config_dict.placeholder(str)  # A prompts file: the sample grid.
  config.eval.prompts_limit = 8  # Its first N prompts.
  config.eval.sample_steps = 25  # DDIM steps of the grid's samples.
  config.eval.guidance = 7.5
  # Scorers of the grid's samples, `evaluate --scorer` specs separated by ';', e.g.
  # 'pickscore=/models/PickScore_v1,processor=/models/CLIP-ViT-H-14;clip=/models/CLIP-ViT-H-14'.
  config.eval.scorers = config_dict.placeholder(str)
  config.eval.seed = 0  # Seeds of the held-out draws and of the grid's images (seed + i).
  # At the end of training, a report in WORKDIR (dpo_jax/report.py): report.json with the
  # win rate of the tuned model against the pretrained one on every eval.prompts prompt,
  # `report_images_per_prompt` paired seeds each, judged by the first of eval.scorers, and the
  # held-out implicit accuracy on eval.pairs; samples_before_after.png and curves.png.
  config.eval.report = False
  config.eval.report_images_per_prompt = 8
  config.eval.report_batch = 16  # Images per compiled sampler call (split over the devices).

  # How each pair's (t, ε) is drawn; the defaults are the paper's.
  config.diffusion = ml_collections.ConfigDict()
  # Comma-separated timesteps to draw t from, uniformly; unset: every training timestep.
  # SDXL-Turbo (official launchers/turbo.sh): '249,499,749,999'.
  config.diffusion.timesteps = config_dict.placeholder(str)
  # Rescale the pipeline's schedule to zero terminal SNR (the official code does for Turbo).
  config.diffusion.zero_terminal_snr = False
  config.diffusion.noise_offset = 0.0  # Official --noise_offset: ε += offset·N(0,1) per channel.
  # Official --input_perturbation: the noisy input uses ε + p·N(0, I), the target stays ε.
  config.diffusion.input_perturbation = 0.0

  config.dpo = ml_collections.ConfigDict()
  config.dpo.beta = 5000.0  # Paper convention (½ inside the sigmoid).
  # 'dpo' | 'sft' (winners' denoising loss) | 'hinge' | 'ipo' (diffusers' example, same β)
  # | 'mapo' (reference-free) | 'kto' (winners liked, losers disliked): docs/losses.md.
  config.dpo.loss = "dpo"
  # MaPO's (official defaults --beta_mapo 0.1, --snr_value 0.5): loss = mean(L_w)
  # − mapo_beta · mean(log σ(T·(s(L_w) − s(L_l)))), s(L) = aL/(exp(aL) − 1), a = mapo_snr.
  config.dpo.mapo_beta = 0.1
  config.dpo.mapo_snr = 0.5
  # Diffusion-KTO's β, no ½ (official --beta_dpo 1000), and its weights of liked and
  # disliked images (--lambda_d_kto, --lambda_u_kto).
  config.dpo.kto_beta = 1000.0
  config.dpo.kto_lambda_desirable = 1.0
  config.dpo.kto_lambda_undesirable = 1.0
  # 'shared': policy and reference run through one compiled UNet body, so at step 1 their
  # errors are equal bit for bit in any dtype (the loss is exactly ln 2), for no more memory
  # than two separate passes (SD1.5 at 128 px on a TPU v5p chip, XLA's plan: 5.95 GiB of
  # temporaries against 6.34). 'separate': two programs, whose bfloat16 roundings can differ.
  config.dpo.reference_pass = "shared"
  # 'live': the step runs the frozen reference on every pair. 'precomputed': it reads the
  # reference's errors for each pair's (t, ε) from `reference_errors`, a folder written once
  # by `python -m dpo_jax.reference_errors` for this seed, model, data and batch size: the
  # step runs 6 UNet forward-equivalents per pair instead of 8 and holds no reference
  # weights. The losses are equal; a store serves any dpo.beta, learning rate or optimiser.
  config.dpo.reference = "live"
  config.dpo.reference_errors = config_dict.placeholder(str)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"  # 'adamw' | 'adafactor'
  # Adafactor's factored second moment: 'transformers' factors every tensor of 2+ dims over
  # the last two dims of its PyTorch layout, as the official code's transformers.Adafactor;
  # 'optax' factors over the two largest axes, only when both are >= 128 (optax's choice).
  config.optim.adafactor_factoring = "transformers"
  # The exact peak learning rate; unset, it follows the paper's recipe: lr_per_pair × pairs
  # per step × 2000/β (`optim.peak_learning_rate`).
  config.optim.peak_lr = config_dict.placeholder(float)
  config.optim.lr_per_pair = 1e-8
  config.optim.warmup_steps = 0
  # After the warmup: 'constant' (the paper's), or 'linear' / 'cosine' decay to 0.
  config.optim.schedule = "constant"
  config.optim.warmup_fraction = config_dict.placeholder(float)  # Overrides warmup_steps.
  config.optim.weight_decay = 1e-2
  # AdamW's moments (official --adam_beta1, --adam_beta2, --adam_epsilon defaults).
  config.optim.adam_beta1 = 0.9
  config.optim.adam_beta2 = 0.999
  config.optim.adam_epsilon = 1e-8
  config.optim.grad_clip_norm = 1.0

  # LoRA (dpo_jax/lora.py, docs/lora.md): train low-rank adapters A·B on the UNet's `targets`
  # instead of its weights; the policy is base + (alpha/rank)·A·B, the reference the base.
  config.lora = ml_collections.ConfigDict()
  config.lora.enabled = False
  config.lora.rank = 8
  config.lora.alpha = config_dict.placeholder(float)  # Unset: = rank (scale 1).
  # Comma-separated diffusers module names or fnmatch patterns, matched as PEFT's
  # target_modules (full path or a '.'-suffix of it), e.g. add 'conv1,conv2,proj_in,ff.net.*'.
  config.lora.targets = "to_q,to_k,to_v,to_out.0"
  config.lora.init = "kaiming"  # lora_A's init: 'kaiming' (PEFT's default) or 'gaussian'.
  return config
