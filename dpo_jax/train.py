"""The training loop: build model, data and optimiser from the config, step, log."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import diffusion, optim, parallel
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
  return unet_io.build_unet(config.model.unet.to_dict(), where="config model.unet", **options)


def _initial_state(model, optimizer, config: ml_collections.ConfigDict) -> TrainState:
  params = init_params(model, jax.random.key(config.train.seed))
  reference_dtype = jnp.dtype(config.model.reference_dtype)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    reference_params=jax.tree_util.tree_map(
                        lambda p: p.astype(reference_dtype), params),
                    opt_state=optimizer.init(params))


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
  """Trains `config.train.steps` steps, resuming from WORKDIR's newest checkpoint if any.

  `devices` (default: all) is the set the mesh is laid over.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  parallel.check_batch(config.train.batch_pairs, mesh)
  model = _build_model(config)
  schedule = diffusion.NoiseSchedule.from_scheduler_config(DEFAULT_SCHEDULER)
  optimizer = optim.make_optimizer(config)
  make_state = lambda: _initial_state(model, optimizer, config)
  state_shardings = parallel.state_shardings(jax.eval_shape(make_state), mesh,
                                             config.mesh.min_shard_size)
  state = jax.jit(make_state, out_shardings=state_shardings)()  # Born sharded, never whole.
  batch_sharding = parallel.batch_sharding(mesh)
  step_fn = make_train_step(model, schedule, optimizer, beta=config.dpo.beta,
                            loss_name=config.dpo.loss, seed=config.train.seed,
                            state_shardings=state_shardings, batch_sharding=batch_sharding)
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
    pair_ids = np.arange(first, first + batch_pairs)[parallel.host_slice(batch_pairs)]
    batch = parallel.host_to_global(synthetic_pairs(pair_ids, **data_options), batch_sharding)
    state, metrics = step_fn(state, batch)
    data_state = {"next_pair": first + batch_pairs}
    if step % config.train.log_every == 0 or step in (1, config.train.steps):
      log.write(step, jax.device_get(metrics), lr=float(lr_at(step - 1)), pairs=batch_pairs)
    checkpointer.save(step, state, data_state, config.to_dict(),
                      force=step == config.train.steps)
  checkpointer.wait()
  checkpointer.close()
  log.close()
  return state
