"""The optimiser: optax chain and learning-rate schedule from the config's `optim` section."""
import ml_collections
import optax

from dpo_jax import adafactor


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`optim.peak_lr` when set; else the paper's recipe, lr per pair × pairs per step, scaled
  by 2000/β so that the effective step stays constant when β changes ("inverse-β"). SFT has
  no β, so no such factor (the paper's SFT: lr_per_pair=1e-9)."""
  if config.optim.peak_lr is not None:
    return config.optim.peak_lr
  per_step = config.optim.lr_per_pair * config.train.batch_pairs
  if config.dpo.loss == "sft":
    return per_step
  return per_step * 2000.0 / config.dpo.beta


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """`optim.warmup_fraction` × train.steps when set (the paper: 25%), else optim.warmup_steps."""
  if config.optim.warmup_fraction is not None:
    return round(config.optim.warmup_fraction * config.train.steps)
  return config.optim.warmup_steps


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then `optim.schedule`: 'constant' (the paper's,
  diffusers' constant_with_warmup), or 'linear' / 'cosine' decay to 0 at train.steps
  (diffusers' get_scheduler 'linear' and 'cosine')."""
  peak, warmup, total = peak_learning_rate(config), warmup_steps(config), config.train.steps
  if config.optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))
  if config.optim.schedule == "linear":
    decay = optax.linear_schedule(peak, 0.0, max(total - warmup, 1))
    if warmup <= 0:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  if warmup <= 0:
    return optax.constant_schedule(peak)
  return optax.linear_schedule(0.0, peak, warmup)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config)
  if config.optim.name == "adamw":
    update = optax.adamw(schedule, b1=config.optim.adam_beta1, b2=config.optim.adam_beta2,
                         eps=config.optim.adam_epsilon, weight_decay=config.optim.weight_decay)
  elif config.optim.name == "adafactor":
    # The official code's transformers.Adafactor(scale_parameter=False, relative_step=False):
    # the step is lr × the RMS-clipped update (optax.adafactor's default would also scale it by
    # each weight's RMS) and weight decay is lr × wd × p (optax's weight_decay_rate is not scaled
    # by lr: 1e-2 would shrink every weight by 1% per step). 'transformers' factoring equals its
    # second moment (over the last two dims of each PyTorch tensor); 'optax' factors the two
    # largest axes when both are >= 128 (conv kernels over channels) and keeps the rest whole.
    factored_rms = (adafactor.scale_by_factored_rms()
                    if config.optim.adafactor_factoring == "transformers"
                    else optax.scale_by_factored_rms())
    update = optax.chain(factored_rms, optax.clip_by_block_rms(1.0),
                         optax.add_decayed_weights(config.optim.weight_decay),
                         optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"optim.name {config.optim.name!r}")  # main validates before this.
  return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), update)
