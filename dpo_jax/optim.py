"""The optimiser: optax chain and learning-rate schedule from the config's `optim` section."""
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`optim.peak_lr` when set; else the paper's recipe, lr per pair × pairs per step, scaled
  by 2000/β so that the effective step stays constant when β changes ("inverse-β")."""
  if config.optim.peak_lr is not None:
    return config.optim.peak_lr
  return config.optim.lr_per_pair * config.train.batch_pairs * 2000.0 / config.dpo.beta


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """`optim.warmup_fraction` × train.steps when set (the paper: 25%), else optim.warmup_steps."""
  if config.optim.warmup_fraction is not None:
    return round(config.optim.warmup_fraction * config.train.steps)
  return config.optim.warmup_steps


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then constant (the paper's schedule)."""
  peak, warmup = peak_learning_rate(config), warmup_steps(config)
  if warmup <= 0:
    return optax.constant_schedule(peak)
  return optax.linear_schedule(0.0, peak, warmup)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config)
  if config.optim.name == "adamw":
    update = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  elif config.optim.name == "adafactor":
    # The official code's transformers.Adafactor(scale_parameter=False, relative_step=False):
    # the step is lr × the RMS-clipped update (optax.adafactor's default would also scale it by
    # each weight's RMS) and weight decay is lr × wd × p (optax's weight_decay_rate is not scaled
    # by lr: 1e-2 would shrink every weight by 1% per step).
    update = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                         optax.add_decayed_weights(config.optim.weight_decay),
                         optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"optim.name {config.optim.name!r}")  # main validates before this.
  return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), update)
