"""`python -m dpo_jax.reference_errors --config C [--output DIR]`: the frozen reference's
denoising errors for every pair a run will train on, computed once.

Each pair's (t, ε) is a function of (seed, epoch, pair id) (`train_step.pair_keys`), so the
reference's errors on it can be computed before training. This pass runs the run's own data
iterator for `train.steps` batches, encodes them as the step does, and stores the reference
UNet's winner and loser errors per (epoch, pair id). A run with `dpo.reference='precomputed'`
and `dpo.reference_errors=DIR` then reads them with its batches: its step runs the policy
alone (6 UNet forward-equivalents per pair instead of 8) and holds no reference weights.
The loss equals live mode's for the same (t, ε), up to the float rounding of a separately
compiled forward pass.

A store depends on the seed, the reference weights and dtypes, the data and its order
(`train.batch_pairs`), the resolution and the noise options; it covers `train.steps` steps.
It serves any number of runs that differ in the rest (β, learning rate, optimiser, loss
among 'dpo', 'hinge', 'ipo'), and is refused, with one line, by a run it was not made for.
"""
import json
import os
import time

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError

METADATA = "reference_errors.json"
ERRORS = "reference_errors.npy"  # float32 [epochs, pairs, 2]: winner, loser; NaN: not drawn.
_PROGRESS_SECONDS = 30
_DATA_KEYS = ("format", "train_files", "split", "cache_dir", "tfds_name", "tfds_split",
              "tfds_data_dir", "model_filter", "max_train_pairs", "resolution", "random_crop",
              "random_flip", "shared_flip", "empty_prompt_prob", "sdxl_time_ids",
              "context_length")


def identity(config, models) -> dict:
  """Everything a store's errors depend on but the number of steps, JSON-ready."""
  from dpo_jax.data import latent_cache
  schedule = models.schedule
  return {
      "seed": config.train.seed,
      "batch_pairs": config.train.batch_pairs,
      "reference_weights": latent_cache.params_fingerprint(models.initial_params),
      "reference_dtype": config.model.reference_dtype,
      "compute_dtype": config.model.compute_dtype,
      "data": {key: config.data.get(key) for key in _DATA_KEYS},
      "diffusion": config.diffusion.to_dict(),
      "schedule": [schedule.prediction_type, schedule.num_train_timesteps,
                   f"{np.asarray(schedule.alphas_cumprod, np.float64).sum():.12e}"],
  }


def _first_difference(stored, wanted, prefix: str = "") -> str | None:
  """The first key whose value differs, dotted ('data.resolution'), or None."""
  for key in sorted(set(stored) | set(wanted)):
    a, b = stored.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      found = _first_difference(a, b, f"{prefix}{key}.")
      if found:
        return found
    elif a != b:
      return f"{prefix}{key} (stored {a!r}, this run {b!r})"
  return None


def _recompute_hint(folder: str) -> str:
  return (f"compute it for this run: python -m dpo_jax.reference_errors --config ... "
          f"--output {folder} --overwrite")


class Store:
  """A folder's reference errors, looked up per (epoch, pair id)."""

  def __init__(self, folder: str):
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
      raise UserError(f"dpo.reference_errors={folder} holds no {METADATA}; "
                      f"{_recompute_hint(folder)}")
    with open(path) as f:
      self.metadata = json.load(f)
    self.errors = np.load(os.path.join(folder, ERRORS))
    self.folder = folder

  def check(self, run_identity: dict, steps: int) -> None:
    """UserError unless this store was made for a run like this one, for as many steps."""
    difference = _first_difference(self.metadata["identity"], run_identity)
    if difference:
      raise UserError(f"dpo.reference_errors={self.folder} was computed for another run: "
                      f"{difference}; {_recompute_hint(self.folder)}")
    if steps > self.metadata["steps"]:
      raise UserError(f"dpo.reference_errors={self.folder} covers {self.metadata['steps']} "
                      f"steps and train.steps is {steps}; {_recompute_hint(self.folder)}")

  def lookup(self, pair_ids: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """[B, 2] float32 (winner, loser) for each pair of a batch."""
    epochs_stored, pairs_stored, _ = self.errors.shape
    inside = (epochs < epochs_stored) & (pair_ids < pairs_stored)
    found = np.full((len(pair_ids), 2), np.nan, np.float32)
    found[inside] = self.errors[epochs[inside], pair_ids[inside]]
    missing = np.isnan(found).any(axis=1)
    if missing.any():
      i = int(np.argmax(missing))
      raise UserError(f"dpo.reference_errors={self.folder} has no errors for pair "
                      f"{pair_ids[i]} of epoch {epochs[i]}, which this run draws; "
                      f"{_recompute_hint(self.folder)}")
    return found


class WithReferenceErrors:
  """A `BatchIterator` whose batches carry `reference_errors` [B, 2] from a `Store`."""

  def __init__(self, batches, store: Store):
    self._batches, self._store = batches, store

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    epochs = batch.get("epochs", np.zeros_like(batch["pair_ids"]))
    return {**batch, "reference_errors": self._store.lookup(np.asarray(batch["pair_ids"]),
                                                            np.asarray(epochs))}

  @property
  def counts(self) -> dict[str, int]:
    return self._batches.counts

  @property
  def skipped_at_start(self) -> dict[str, int]:
    return self._batches.skipped_at_start

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)


def attach(config, models, batches) -> WithReferenceErrors:
  """`batches` with the reference errors of `config.dpo.reference_errors`, checked first."""
  store = Store(config.dpo.reference_errors)
  store.check(identity(config, models), config.train.steps)
  return WithReferenceErrors(batches, store)


def _as_table(epochs: np.ndarray, pair_ids: np.ndarray, errors: np.ndarray) -> np.ndarray:
  table = np.full((epochs.max() + 1, pair_ids.max() + 1, 2), np.nan, np.float32)
  table[epochs, pair_ids] = errors
  return table


def _reference_errors_function(config, models, mesh):
  """A jitted (reference params, encoded batch) -> (errors [B, 2], pair ids, epochs), on
  every host whole; the batch in `train.grad_accum` sequential parts, as the step runs it."""
  import jax
  import jax.numpy as jnp

  from dpo_jax import train, train_step

  options = {**train.pair_error_options(config, models), "reference": "none"}
  pair_errors = train_step.make_pair_errors(models.unet, models.schedule, **options)
  parts = config.train.grad_accum

  def errors_of(reference_params, batch):
    winners_first, _ = pair_errors(reference_params, None, batch)
    return winners_first.reshape(2, -1).T

  def errors(reference_params, batch):
    if parts == 1:
      found = errors_of(reference_params, batch)
    else:
      found = train_step._merge_microbatches(jax.lax.map(
          lambda micro: errors_of(reference_params, micro),
          train_step._microbatches(batch, parts)))
    epochs = batch.get("epochs", jnp.zeros_like(batch["pair_ids"]))
    return found, batch["pair_ids"], epochs

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(errors, out_shardings=replicated)


def _reference_params(config, models, mesh):
  """The reference as the train state holds it: float32, then `model.reference_dtype`."""
  import jax
  import jax.numpy as jnp

  from dpo_jax import parallel, precision

  def make(params):
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    return precision.reference_params(params, config.model.reference_dtype)

  shardings = parallel.state_shardings(jax.eval_shape(make, models.initial_params), mesh,
                                       config.mesh.min_shard_size)
  return jax.jit(make, out_shardings=shardings)(models.initial_params)


def compute(config, output: str, *, overwrite: bool = False, devices=None) -> dict:
  """Runs the pass on `devices` (default: all) and writes the store in `output` (process 0);
  returns its metadata."""
  import jax

  from dpo_jax import parallel, train

  if config.data.format == "unpaired":
    raise UserError("data.format='unpaired' trains KTO with its reference live; the stored "
                    "errors are for pairs: train without this pass (dpo.reference='live')")
  if config.data.format == "sampled":
    raise UserError("data.format='sampled' draws its pairs inside a run; point this pass at "
                    "them instead: --config.data.format=pickapic --config.data.train_files="
                    "WORKDIR/pairs/*.parquet")
  if os.path.isfile(os.path.join(output, METADATA)) and not overwrite:
    raise UserError(f"{output} already holds reference errors; choose another --output or "
                    "pass --overwrite")
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  parallel.check_batch(config.train.batch_pairs, mesh, config.train.grad_accum)
  models = train.load_models(config)
  batches = train.make_data_iterator(config, models)
  step_input = train.make_step_input(config, models, mesh)
  errors_fn = _reference_errors_function(config, models, mesh)
  reference = _reference_params(config, models, mesh)
  found, started, last_report = [], time.perf_counter(), time.perf_counter()
  for step in range(1, config.train.steps + 1):
    outputs = errors_fn(reference, step_input(next(batches)))
    # Replicated: every host holds the whole batch's errors, ids and epochs.
    found.append([np.asarray(value.addressable_data(0)) for value in outputs])
    if time.perf_counter() - last_report > _PROGRESS_SECONDS:
      last_report = time.perf_counter()
      print(f"step {step}/{config.train.steps}: "
            f"{step * config.train.batch_pairs / (last_report - started):.1f} pairs/s",
            flush=True)
  errors, pair_ids, epochs = (np.concatenate(part) for part in zip(*found))
  metadata = {"identity": identity(config, models), "steps": config.train.steps,
              "pairs": len(pair_ids), "epochs": int(epochs.max()) + 1}
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    np.save(os.path.join(output, ERRORS), _as_table(epochs, pair_ids, errors))
    with open(os.path.join(output, METADATA), "w") as f:  # Last: it marks the store whole.
      json.dump(metadata, f, indent=2)
    print(f"wrote the reference's errors on {len(pair_ids)} pairs ({config.train.steps} "
          f"steps of {config.train.batch_pairs}) to {output}", flush=True)
  return metadata


def run() -> None:
  config = cli.define_config_flag()
  output = flags.DEFINE_string("output", None, "The folder to write the errors in "
                               "(default: dpo.reference_errors).")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace errors already in --output.")

  def command(argv):
    cli.check_arguments(argv, "--config, --config.KEY=VALUE, --output and --overwrite")
    folder = output.value or config.value.dpo.reference_errors
    if not folder:
      raise UserError("--output is required (or --config.dpo.reference_errors): the folder "
                      "to write the reference errors in")
    from dpo_jax import config_checks, parallel  # JAX is slow to load.
    config_checks.check_config(config.value)
    parallel.initialize_distributed(config.value)
    compute(config.value, folder, overwrite=overwrite.value)

  cli.run(command)


if __name__ == "__main__":
  run()
