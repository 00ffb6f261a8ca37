"""The training loop: build model, data and optimiser from the config, step, log."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import diffusion, optim
from dpo_jax.checkpoint import Checkpointer
from dpo_jax.data.synthetic import synthetic_pairs
from dpo_jax.metrics_log import MetricsLog
from dpo_jax.models import unet_io
from dpo_jax.models.unet import init_params
from dpo_jax.train_step import TrainState, make_train_step

# The SD1.x/2.x training schedule; a pretrained pipeline brings its own scheduler config.
DEFAULT_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _build_model(config: ml_collections.ConfigDict):
  options = dict(dtype=jnp.dtype(config.model.compute_dtype), remat=config.model.remat,
                 attention_implementation=config.model.attention_implementation)
  model = unet_io.build_unet(config.model.unet.to_dict(), where="config model.unet", **options)
  return model, init_params(model, jax.random.key(config.train.seed))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  model, params = _build_model(config)
  schedule = diffusion.NoiseSchedule.from_scheduler_config(DEFAULT_SCHEDULER)
  optimizer = optim.make_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     reference_params=jax.tree_util.tree_map(jnp.copy, params),
                     opt_state=optimizer.init(params))
  step_fn = make_train_step(model, schedule, optimizer, beta=config.dpo.beta,
                            loss_name=config.dpo.loss, seed=config.train.seed)
  lr_at = optim.learning_rate_schedule(config)
  data_options = dict(seed=config.train.seed, latent_size=config.data.resolution // 8,
                      channels=model.config.in_channels,
                      context_length=config.data.context_length,
                      context_dim=model.config.cross_attention_dim[0])
  checkpointer = Checkpointer(workdir, every=config.train.ckpt_every)
  data_state = {"next_pair": 0}
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(start, state)
    print(f"resumed from step {start} in {workdir}", flush=True)
  log = MetricsLog(workdir, config.train.steps)
  batch_pairs = config.train.batch_pairs
  for step in range(start + 1, config.train.steps + 1):
    first = data_state["next_pair"]
    pair_ids = np.arange(first, first + batch_pairs)
    state, metrics = step_fn(state, synthetic_pairs(pair_ids, **data_options))
    data_state = {"next_pair": first + batch_pairs}
    if step % config.train.log_every == 0 or step in (1, config.train.steps):
      log.write(step, jax.device_get(metrics), lr=float(lr_at(step - 1)), pairs=batch_pairs)
    checkpointer.save(step, state, data_state, config.to_dict(),
                      force=step == config.train.steps)
  checkpointer.wait()
  checkpointer.close()
  log.close()
  return state
