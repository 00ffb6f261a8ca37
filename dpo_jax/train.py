"""The training loop: build model, data and optimiser from the config, step, log, checkpoint."""
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import config_checks, diffusion, encode, optim, parallel, precision, preemption
from dpo_jax.checkpoint import Checkpointer
from dpo_jax.data import interfaces, latent_cache, loader, skips, synthetic
from dpo_jax.errors import UserError
from dpo_jax.metrics_log import MetricsLog
from dpo_jax.models import pipeline as pipeline_lib, unet as unet_lib
from dpo_jax.models.unet import init_params
from dpo_jax.train_step import (NoiseOptions, TrainState, make_encode_step, make_pair_loss,
                                make_train_step)


@dataclasses.dataclass(frozen=True)
class Models:
  """Everything the run needs from `model.*`: the UNet, its starting params, the noise
  schedule, and (from a pipeline) the frozen encoders with their params and tokenizers."""
  unet: Any
  initial_params: Any
  schedule: diffusion.NoiseSchedule
  encoders: encode.Encoders | None = None
  frozen_params: Any = None
  tokenizers: tuple = ()
  pipeline: Any = None  # The loaded `Pipeline` (validation samples with it).


def noise_schedule(scheduler_config: dict, config: ml_collections.ConfigDict
                   ) -> diffusion.NoiseSchedule:
  """A pipeline's (or the default) scheduler config with the run's `diffusion.*` options."""
  if config.diffusion.zero_terminal_snr:
    scheduler_config = {**scheduler_config, "rescale_betas_zero_snr": True}
  schedule = diffusion.NoiseSchedule.from_scheduler_config(scheduler_config)
  allowed = config_checks.timesteps(config) or ()
  if allowed and max(allowed) >= schedule.num_train_timesteps:
    raise UserError(f"diffusion.timesteps={config.diffusion.timesteps!r} goes past the "
                    f"schedule's {schedule.num_train_timesteps} training timesteps (0 to "
                    f"{schedule.num_train_timesteps - 1})")
  return schedule


def load_models(config: ml_collections.ConfigDict) -> Models:
  options = dict(dtype=jnp.dtype(config.model.compute_dtype), remat=config.model.remat,
                 remat_policy=config.model.remat_policy,
                 attention_implementation=config.model.attention_implementation)
  if config.model.pretrained is None:
    if config.model.unet_init or config.model.vae:
      raise UserError("model.unet_init and model.vae replace parts of model.pretrained; set "
                      "--config.model.pretrained to the pipeline folder too")
    if not config.model.unet:
      raise UserError("model.pretrained is not set and model.unet is empty; pass "
                      "--config.model.pretrained=PIPELINE (a diffusers folder or hub id), or "
                      "start from a config that sets model.unet (configs/synthetic.py)")
    unet = unet_lib.build_unet(config.model.unet.to_dict(), where="config model.unet", **options)
    return Models(unet, init_params(unet, jax.random.key(config.train.seed)),
                  noise_schedule(diffusion.DEFAULT_SCHEDULER, config))
  pipe = load_pipeline(config, **options)
  encoders, frozen = encode.pipeline_encoders(pipe)
  return Models(pipe.unet, pipe.unet_params, noise_schedule(pipe.scheduler_config, config),
                encoders, frozen, pipe.tokenizers, pipe)


def load_pipeline(config: ml_collections.ConfigDict, **options) -> pipeline_lib.Pipeline:
  """model.pretrained with the config's VAE, UNet and per-component dtypes: what training
  and `prepare` both encode with."""
  return pipeline_lib.load_pipeline(
      config.model.pretrained, variant=config.model.variant, revision=config.model.revision,
      vae=config.model.vae,
      unet_init=config.model.unet_init, vae_dtype=jnp.dtype(config.model.vae_dtype),
      text_encoder_dtype=jnp.dtype(config.model.text_encoder_dtype), **options)


def _initial_state(initial_params, adapters, optimizer,
                   config: ml_collections.ConfigDict) -> TrainState:
  """Full fine-tuning trains the UNet's params; LoRA (`adapters` given) trains the adapters
  alone, and the frozen base is the reference as well as what they add to."""
  as_float32 = lambda tree: jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), tree)
  base = as_float32(initial_params)
  params = base if adapters is None else as_float32(adapters)
  # No reference weights on the devices when the step runs no reference model (and needs
  # no base to add adapters to).
  keep_base = adapters is not None or config_checks.runs_reference(config)
  reference = (precision.reference_params(base, config.model.reference_dtype) if keep_base
               else None)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, reference_params=reference,
                    opt_state=optimizer.init(params))


def initial_adapters(config: ml_collections.ConfigDict, initial_params):
  """LoRA's starting adapters for the UNet params (B zero: the policy is the base), or None
  without `lora.enabled`. Seeded by train.seed."""
  if not config.lora.enabled:
    return None
  from dpo_jax import lora
  settings = lora.settings(config)
  return lora.init_adapters(initial_params, rank=settings.rank, targets=settings.targets,
                            key=jax.random.fold_in(jax.random.key(config.train.seed), 7),
                            init=settings.init)


def policy_params_function(config: ml_collections.ConfigDict) -> Callable | None:
  """(trained params, reference params) -> the policy UNet's params: LoRA's merge, or None
  when the trained params are the UNet's own."""
  if not config.lora.enabled:
    return None
  from dpo_jax import lora
  settings = lora.settings(config)
  return lambda adapters, base: lora.merge(base, adapters, alpha=settings.alpha,
                                           rank=settings.rank)


def noise_options(config: ml_collections.ConfigDict) -> NoiseOptions:
  return NoiseOptions(timesteps=config_checks.timesteps(config),
                      offset=config.diffusion.noise_offset,
                      input_perturbation=config.diffusion.input_perturbation)


def make_data_iterator(config: ml_collections.ConfigDict,
                       models: Models) -> interfaces.BatchIterator:
  """This process's slices of the global batches of `train.batch_pairs` (the same global
  batches on any host count), with get/set_state."""
  host_slice = parallel.host_slice(config.train.batch_pairs)
  if config.data.format == "synthetic" and not config.data.cache_dir:
    return synthetic.SyntheticIterator(
        batch_pairs=config.train.batch_pairs, host_slice=host_slice, seed=config.train.seed,
        latent_size=config.data.resolution // 8, channels=models.unet.config.in_channels,
        context_length=config.data.context_length,
        context_dim=models.unet.config.cross_attention_dim[0])
  config_checks.check_pipeline_for_data(config)  # Encoders come from model.pretrained alone.
  if config.data.cache_dir:
    metadata = latent_cache.read_metadata(config.data.cache_dir)
    latent_cache.check_compatible(
        metadata, kind=models.encoders.kind, resolution=config.data.resolution,
        fingerprint=latent_cache.encoders_fingerprint(models.frozen_params["vae"],
                                                      models.frozen_params["text_encoders"]),
        folder=config.data.cache_dir)
  if config.data.cache_dir or config.data.format in ("pickapic", "jsonl", "unpaired", "tfds"):
    return loader.make_train_iterator(config, models.tokenizers,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  raise ValueError(f"data.format {config.data.format!r}")  # config_checks refuses it first.


def _this_hosts_data_state(saved: dict, where: str) -> dict:
  """This process's data state from a checkpoint's per-host states: their one global
  position, which any host count resumes, and their counts summed on process 0 (the
  others start from zero), so the run's totals carry over."""
  hosts = saved.get("hosts")
  if hosts is None or any(isinstance(host.get("position"), dict) for host in hosts):
    raise UserError(f"the checkpoint in {where} comes from an older dpo_jax whose data "
                    "position depends on the host count; start a new --workdir")
  positions = [{key: value for key, value in host.items() if key != "counts"} for host in hosts]
  if any(position != positions[0] for position in positions):
    raise UserError(f"the checkpoint in {where} holds different data positions for its "
                    f"{len(hosts)} hosts; start a new --workdir")
  state = dict(hosts[0])
  if "counts" in state:
    first = jax.process_index() == 0
    state["counts"] = skips.sum_counts(h["counts"] for h in hosts) if first else {}
  return state


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled pieces of a run, built once from the config: the jitted train step and
  what turns a host batch into that step's input."""
  step_fn: Any  # (state, global batch) -> (state, metrics), jitted, state donated.
  step_input: Any  # Host batch -> the global (encoded) batch the step takes.
  batch_sharding: jax.sharding.NamedSharding


def build_program(config: ml_collections.ConfigDict, models: Models,
                  mesh) -> tuple[TrainState, Program]:
  """The sharded initial state and the train step of `config` for `models` on `mesh`: what
  `train` runs and what `bench` times (one builder, so both run the same program)."""
  optimizer = optim.make_optimizer(config)
  shardings = lambda tree: parallel.state_shardings(tree, mesh, config.mesh.min_shard_size)
  # The starting params enter as an argument, never as a closure: a closed-over array would
  # be baked into the program as a multi-GB constant.
  adapters = initial_adapters(config, models.initial_params)
  make_state = lambda params, adapters: _initial_state(params, adapters, optimizer, config)
  state_shardings = shardings(jax.eval_shape(make_state, models.initial_params, adapters))
  born_sharded = jax.jit(make_state, in_shardings=(shardings(models.initial_params),
                                                   shardings(adapters)),
                         out_shardings=state_shardings)
  # ShapeDtypeStruct params (`tools.memory`) give the state's shapes and shardings alone, to
  # compile the step for without allocating it.
  abstract = isinstance(jax.tree_util.tree_leaves(models.initial_params)[0],
                        jax.ShapeDtypeStruct)
  state = (born_sharded.eval_shape if abstract else born_sharded)(models.initial_params,
                                                                  adapters)
  batch_sharding = parallel.batch_sharding(mesh)
  pair_loss = make_pair_loss(models.unet, models.schedule, beta=config.dpo.beta,
                             loss_name=config.dpo.loss, loss_options=loss_options(config),
                             unpaired=config_checks.is_unpaired(config),
                             **pair_error_options(config, models))
  step_fn = make_train_step(pair_loss, optimizer, grad_accum=config.train.grad_accum,
                            state_shardings=state_shardings, batch_sharding=batch_sharding)
  return state, Program(step_fn, make_step_input(config, models, mesh), batch_sharding)


def loss_options(config: ml_collections.ConfigDict) -> dict:
  """`make_pair_loss`' loss_options: the keys of `dpo.loss`'s own hyperparameters."""
  dpo = config.dpo
  return {"mapo": dict(beta=dpo.mapo_beta, snr=dpo.mapo_snr),
          "kto": dict(beta=dpo.kto_beta, lambda_desirable=dpo.kto_lambda_desirable,
                      lambda_undesirable=dpo.kto_lambda_undesirable)}.get(dpo.loss, {})


def pair_error_options(config: ml_collections.ConfigDict, models: Models) -> dict:
  """`make_pair_errors`' options of `config`, but the model and schedule."""
  return dict(seed=config.train.seed, encoders=models.encoders,
              compute_dtype=config.model.compute_dtype, noise=noise_options(config),
              reference_pass=config.dpo.reference_pass, reference=config.dpo.reference,
              policy_params=policy_params_function(config),
              sdxl_time_ids=config.data.sdxl_time_ids)


def make_step_input(config: ml_collections.ConfigDict, models: Models, mesh) -> Callable:
  """Host batch -> the global encoded batch a step takes: the images and captions through
  the frozen encoders (a program of their own), or a latent-cache batch as it is."""
  batch_sharding = parallel.batch_sharding(mesh)
  if config.data.cache_dir or models.encoders is None:  # The encoders stay off the devices.
    return lambda host_batch: parallel.host_to_global(host_batch, batch_sharding)
  frozen_shardings = parallel.state_shardings(models.frozen_params, mesh,
                                              config.mesh.min_shard_size)
  frozen = jax.device_put(models.frozen_params, frozen_shardings)
  encode_step = make_encode_step(models.encoders, images=config_checks.images_per_example(config),
                                 grad_accum=config.train.grad_accum,
                                 frozen_shardings=frozen_shardings,
                                 batch_sharding=batch_sharding)
  return lambda host_batch: encode_step(frozen, parallel.host_to_global(host_batch,
                                                                        batch_sharding))


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
  """Trains `config.train.steps` steps, resuming from WORKDIR's newest checkpoint if any.

  `devices` (default: all) is the set the mesh is laid over.
  """
  os.makedirs(workdir, exist_ok=True)
  _use_compilation_cache(config, workdir)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  parallel.check_batch(config.train.batch_pairs, mesh, config.train.grad_accum)
  models = load_models(config)
  if config.data.format == "sampled":  # Draws the pairs (once), then reads them as files.
    from dpo_jax import sampled_pairs
    config = sampled_pairs.prepare(config, models.pipeline, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  # The data first: a cache made by other encoders, or files that cannot be read, are
  # refused before minutes of compiling.
  data = make_data_iterator(config, models)
  if config.dpo.reference == "precomputed":
    from dpo_jax import reference_errors
    data = reference_errors.attach(config, models, data)
  state, program = build_program(config, models, mesh)

  checkpointer = Checkpointer(workdir, every=config.train.ckpt_every)
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(start, state)
    data.set_state(_this_hosts_data_state(data_state, workdir))
    if jax.process_index() == 0:  # One line for the run, as the log's others.
      print(f"resumed from step {start} in {workdir}", flush=True)
  validator = None
  if config.eval.every and jax.process_index() == 0:
    from dpo_jax import validation  # Loads the scorers: only when asked for.
    validator = validation.Validation(config, models.pipeline, workdir)
  log = MetricsLog(workdir, config.train.steps)
  if start < config.train.steps:  # Ahead of time, on the first batch: compile time apart.
    first = program.step_input(next(data))
    step_fn = _compile(program.step_fn, state, first, log)
    batches = _step_inputs(first, data, program.step_input)
  else:
    step_fn, batches = program.step_fn, iter(())
  run = _Run(config, step_fn, batches, data, checkpointer, log, validator,
             profile_folder=os.path.join(workdir, "profile"))
  try:
    state, preempted = _run_steps(run, start, state)
    if config.eval.report and not preempted:
      _final_report(run, state, models.pipeline, workdir)
  finally:
    checkpointer.wait()
    checkpointer.close()
    run.log.close()
  return state


# ---------------------------------------------------------------------------------------------
# The loop. Each concern of a step is one function below; a new one (evaluation every N
# steps, a NaN policy, a preemption signal) is one more call in `_run_steps`.
# ---------------------------------------------------------------------------------------------


def _use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
  """train.compilation_cache_dir, or WORKDIR/xla_cache, unless one is already configured."""
  if jax.config.jax_compilation_cache_dir or config.train.compilation_cache_dir == "":
    return
  folder = config.train.compilation_cache_dir or os.path.join(workdir, "xla_cache")
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(folder))


def _step_inputs(first, data: interfaces.BatchIterator, step_input):
  """`first`, then each next host batch made the step's input, fetched as the loop asks (so
  the data position a checkpoint saves is the loop's)."""
  yield first
  while True:
    yield step_input(next(data))


def memory_estimate(compiled) -> dict[str, int]:
  """XLA's per-device byte counts of a compiled program ({} where the backend gives none),
  with `peak`: arguments + outputs + temporaries, donated (aliased) bytes counted once."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  sizes = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in
           ("argument", "output", "temp", "alias", "generated_code")}
  sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  return sizes


def _compile(step_fn, state, batch, log: MetricsLog):
  """The train step compiled for these shapes; logs the compile time and XLA's memory
  estimate per device once, and restarts the log's clock so no rate includes compilation."""
  started = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  seconds = time.perf_counter() - started
  memory = memory_estimate(compiled)
  estimate = ""
  if memory:
    estimate = (f"; XLA's memory estimate per device {memory['peak'] / 2**30:.2f} GiB "
                f"(arguments {memory['argument'] / 2**30:.2f}, temporaries "
                f"{memory['temp'] / 2**30:.2f})")
  log.print(f"compiled the train step in {seconds:.1f}s{estimate}")
  limit = device_memory_limit()
  if memory.get("peak") and limit and memory["peak"] > limit:
    raise UserError(out_of_memory_message(memory["peak"], limit))
  log.restart_clock()
  return compiled


def device_memory_limit(device=None) -> int | None:
  """Bytes one device may use: the accelerator's own limit, or on CPUs the host's memory
  shared by its local devices; None where unknown."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  return None


def out_of_memory_message(needed: int | None, available: int | None) -> str:
  """One line: what the step needs per device against what there is, and what to change."""
  amounts = ""
  if needed:
    amounts = f" ({needed / 2**30:.1f} GiB per device by XLA's estimate"
    amounts += f", {available / 2**30:.1f} GiB available)" if available else ")"
  return (f"the train step does not fit in the device's memory{amounts}: lower "
          "train.batch_pairs or raise train.grad_accum (same pairs per step, less memory), "
          "set model.remat=True, model.reference_dtype='bfloat16', model.compute_dtype="
          "'bfloat16', or a lower data.resolution; `python -m dpo_jax.bench` shows a config's "
          "memory without training")


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop needs, built once by `train`."""
  config: ml_collections.ConfigDict
  step_fn: Any  # (state, global batch) -> (state, metrics), compiled.
  batches: Any  # Global (encoded) batches, the step's inputs, in order.
  data: interfaces.BatchIterator  # This host's batch iterator behind them (counts, position).
  checkpointer: Checkpointer
  log: MetricsLog
  validator: Any = None  # `validation.Validation` on process 0 when eval.every is set.
  profile_folder: str = ""  # Where train.profile_steps' trace goes.


def _run_steps(run: _Run, start: int, state) -> tuple[Any, bool]:
  """Steps start + 1 .. train.steps: step, log, save. Stops, saved, on too much bad data;
  unsaved after train.max_bad_steps non-finite steps in a row; saved, at a step every host
  agrees on, on a preemption notice. Returns the state and whether a notice stopped it."""
  profiler = _Profiler(config_checks.profile_window(run.config), run.profile_folder, run.log)
  with preemption.Notice() as notice:
    for step in range(start + 1, run.config.train.steps + 1):
      # Memory runs out, if it does, in the first step.
      guard = _out_of_memory_as_user_error() if step == start + 1 else contextlib.nullcontext()
      try:
        with guard:
          state, preempted = _step(run, step, state, profiler, notice)
      except _DataEndedBySigterm:
        return _stop_before(run, step, state), True
      if preempted:
        run.checkpointer.wait()  # On disk before the line says so and the process exits.
        run.log.print(f"preempted (SIGTERM): stopped after step {step}. "
                      f"{_resume_point(run, step)}")
        return state, True
  _report_data(run)
  return state, False


class _DataEndedBySigterm(Exception):
  """The SIGTERM that stops the run also ended the data workers before this step's batch."""


def _next_batch(run: _Run, notice: preemption.Notice):
  """The step's input. Schedulers send SIGTERM to every process of a job; grain's worker
  processes (data.workers) ignore it (`loader._outlive_sigterm`). One killed outright after
  it (SIGKILL, the kernel's out-of-memory killer) fails its batch with a RuntimeError, which
  after a SIGTERM this process caught means 'stop here', not a crash."""
  try:
    return next(run.batches)
  except RuntimeError:
    if notice.received_here:
      raise _DataEndedBySigterm() from None
    raise


def _stop_before(run: _Run, step: int, state):
  """Saves the last step trained (step - 1), unless saved already or within a non-finite
  streak, and says where the same command resumes."""
  done = step - 1
  if done and run.checkpointer.latest_step() != done:
    _save(run, done, state, int(jax.device_get(state.nonfinite_streak)), force=True)
  run.checkpointer.wait()
  where = _resume_point(run, done) if done else "Nothing was trained: the same command starts over"
  run.log.print(f"preempted (SIGTERM, which also ended the data workers): stopped after step "
                f"{done}. {where}")
  return state


def _step(run: _Run, step: int, state, profiler: "_Profiler", notice: preemption.Notice):
  """One step and what follows it: log, save, validate. Returns the state and whether a
  preemption notice ends the run after this step."""
  profiler.before(step)
  state, metrics = run.step_fn(state, _next_batch(run, notice))
  profiler.after(step, state)
  logged = _is_log_step(run.config, step)
  too_bad = _log(run, step, metrics) if logged else None
  preempted = notice.reached(step)  # Every step, on every host: the sync manager's contract.
  stop = bool(too_bad) or preempted or step == run.config.train.steps
  save = stop or run.checkpointer.due(step)
  # The step counts its non-finite streak on the device; the host reads it only where it
  # waits for the step anyway (a log or a save), so counting adds no sync per step, and a
  # streak that lasts is caught within train.log_every steps (the params never move in it).
  streak = int(jax.device_get(metrics["nonfinite_streak"])) if logged or save else 0
  _check_divergence(run, step, streak)
  if save:
    _save(run, step, state, streak, force=stop)
  if _is_eval_step(run.config, step) and not (too_bad or preempted):
    _validate(run, step, state)
  if too_bad:
    raise UserError(f"{too_bad}. {_resume_point(run, step)}")
  return state, preempted


def _check_divergence(run: _Run, step: int, streak: int) -> None:
  """UserError once train.max_bad_steps steps in a row had a non-finite loss or gradient."""
  limit = run.config.train.max_bad_steps
  if streak < limit:
    return
  newest = run.checkpointer.latest_step()
  resume = (f"the newest checkpoint, step {newest}, is from before them and the same command "
            "resumes from it" if newest else "no checkpoint was saved before them")
  raise UserError(f"the loss or gradient was NaN or inf at {streak} steps in a row (steps "
                  f"{step - streak + 1} to {step}; train.max_bad_steps={limit}) and their "
                  f"updates were skipped; {resume}: lower optim.peak_lr (or optim.lr_per_pair) "
                  "or optim.grad_clip_norm, or look for NaN or inf values in the data")


def _resume_point(run: _Run, step: int) -> str:
  """Where the same command resumes: `step` if it is saved, else the newest checkpoint."""
  newest = run.checkpointer.latest_step()
  if newest == step:
    return f"Step {step} is saved: the same command resumes from it"
  unsaved = f"Step {step} is not saved (a streak of non-finite steps)"
  return (f"{unsaved}: the same command resumes from step {newest}" if newest
          else f"{unsaved}, nor any before it: the same command starts over")


@contextlib.contextmanager
def _out_of_memory_as_user_error():
  """XLA's RESOURCE_EXHAUSTED (its estimate fitted, the allocation did not) as one line."""
  try:
    yield
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    detail = str(error).splitlines()[0][:200]
    raise UserError(f"{out_of_memory_message(None, None)} ({detail})") from None


class _Profiler:
  """train.profile_steps: a jax.profiler trace of steps A..B (a run resumed inside the
  window does not trace it)."""

  def __init__(self, window: tuple[int, int] | None, folder: str, log: MetricsLog):
    self._window, self._folder, self._log, self._tracing = window, folder, log, False

  def before(self, step: int) -> None:
    if self._window and step == self._window[0]:
      jax.profiler.start_trace(self._folder)
      self._tracing = True

  def after(self, step: int, state) -> None:
    if self._tracing and step == self._window[1]:
      self._tracing = False
      jax.block_until_ready(state)  # The trace holds the window's device work, all of it.
      jax.profiler.stop_trace()
      self._log.print(f"profile of steps {self._window[0]}..{self._window[1]}: {self._folder}")


def _is_log_step(config: ml_collections.ConfigDict, step: int) -> bool:
  return step % config.train.log_every == 0 or step in (1, config.train.steps)


def _is_eval_step(config: ml_collections.ConfigDict, step: int) -> bool:
  every = config.eval.every
  return bool(every) and (step % every == 0 or step == config.train.steps)


def host_unets(config: ml_collections.ConfigDict, state, pretrained_params):
  """(policy, reference) UNet params on every host, for validation and the report: the
  policy is the trained params, or for LoRA the base with the adapters merged in; the
  reference is the state's, or, where the state holds none (MaPO, precomputed reference
  errors), `pretrained_params`, the UNet training started from. Every host must call it:
  the gather is a collective."""
  from jax.experimental import multihost_utils
  params, reference = multihost_utils.process_allgather(
      (state.params, state.reference_params), tiled=True)
  merge = policy_params_function(config)
  if merge is not None:  # LoRA: the state's reference is the base the adapters apply to.
    params = jax.device_get(merge(params, reference))
  return params, pretrained_params if reference is None else reference


def _validate(run: _Run, step: int, state) -> None:
  """Every host gathers the params to the host (a collective); process 0 validates."""
  pretrained = run.validator.pretrained_params if run.validator is not None else None
  params, reference = host_unets(run.config, state, pretrained)
  if run.validator is not None:
    metrics, grid = run.validator.run(step, params, reference)
    run.log.write_eval(step, metrics, grid)


def _final_report(run: _Run, state, pipe, workdir: str) -> None:
  """`report.write_report` on process 0 from host copies of the params (every host joins
  the gather); the console's last lines say where to look."""
  params, reference = host_unets(run.config, state, pipe.unet_params)
  if jax.process_index() == 0:
    from dpo_jax import report as report_lib
    run.log.print("writing the report: sampling the pretrained and the tuned model")
    report = report_lib.write_report(run.config, pipe, params, reference, workdir,
                                     step=run.config.train.steps)
    for line in report_lib.summary_lines(report, workdir):
      run.log.print(line)


def _data_counts(run: _Run) -> dict[str, int]:
  """Kept and skipped pairs so far, summed over the hosts (a collective: every host calls
  it at the same steps)."""
  return skips.sum_counts(parallel.gather_from_hosts(run.data.counts))


def _log(run: _Run, step: int, metrics) -> str | None:
  """Writes the step's metrics and the data counts; returns why the run must stop for bad
  data (`data.max_bad_fraction`), or None."""
  counts = _data_counts(run)
  lr = float(optim.learning_rate_schedule(run.config)(step - 1))
  run.log.write(step, {**jax.device_get(metrics), **skips.to_metrics(counts)}, lr=lr,
                pairs=run.config.train.batch_pairs)
  return skips.too_many_bad(counts, run.config.data.max_bad_fraction, f"step {step}")


def _save(run: _Run, step: int, state, streak: int, *, force: bool) -> None:
  """The state, every host's data state (one global position, its counts) and the config; not
  during a streak of non-finite steps, so that the newest checkpoint is one from before it
  (with keep-N, saves in a long streak would rotate every earlier one away)."""
  if streak:
    run.log.print(f"step {step} not saved: the last {streak} step(s) had a non-finite loss or "
                  "gradient (skipped)")
    return
  data_state = {"hosts": parallel.gather_from_hosts(run.data.get_state())}
  run.checkpointer.save(step, state, data_state, run.config.to_dict(), force=force)


def _report_data(run: _Run) -> None:
  run.log.print(f"data: {skips.describe(_data_counts(run))}")
  if any(run.data.skipped_at_start.values()):
    run.log.print(f"data files, while indexing: {skips.describe(run.data.skipped_at_start)}")
