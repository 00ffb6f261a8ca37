"""Mesh, sharding rules, host->global batches and multi-host start-up.

One `Mesh` with axes ('data', 'fsdp') serves every device count, from one CPU to a pod:
the train state is sharded over 'fsdp' by a shape rule (`param_partition_spec`), the batch
over both axes on its leading (pair) axis (`batch_sharding`), and `jax.jit` with those
shardings lets XLA insert the all-gathers and reduce-scatters. No pmap, no per-layer
annotations.

Batch layout: every array of a batch has the pairs on its leading axis, so a device holds
whole pairs. Latents are [B, 2, H, W, C] with winner at index 0 and loser at 1 of axis 1;
context is [B, T, D]; pair_ids is [B]. Inside the step `latents.reshape(2B, H, W, C)`
interleaves winners and losers (w0, l0, w1, l1, ...) without moving data between devices.
"""
import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpo_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # The pair axis is split over every device.
# Below a MiB of float32 an array is not worth an all-gather: biases, norms, small kernels.
MIN_SHARDED_SIZE = 2**18


def _resolve_mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
  """(data, fsdp) with a -1 filled in, or a UserError naming the keys and the fix."""
  for key, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if value != -1 and value < 1:
      raise UserError(f"{key}={value} must be a positive int or -1 (take what the other "
                      f"axis leaves of the {device_count} devices); set --config.{key}")
  if data == fsdp == -1:
    raise UserError(f"mesh.data and mesh.fsdp are both -1; set at most one to -1, e.g. "
                    f"--config.mesh.data=-1 --config.mesh.fsdp=1 for {device_count} devices")
  if -1 in (data, fsdp):
    key, given = ("mesh.fsdp", fsdp) if data == -1 else ("mesh.data", data)
    if device_count % given:
      divisors = [d for d in range(1, device_count + 1) if device_count % d == 0]
      raise UserError(f"{key}={given} does not divide the {device_count} devices; set "
                      f"--config.{key} to one of {', '.join(map(str, divisors))}")
    other = device_count // given
    return (other, fsdp) if data == -1 else (data, other)
  if data * fsdp != device_count:
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} does not equal "
                    f"the {device_count} devices; make their product {device_count} or set "
                    f"one to -1, e.g. --config.mesh.data=-1")
  return data, fsdp


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; -1 in one axis takes the rest.

  Keep `fsdp` within one host (or one TPU slice): its all-gathers then ride ICI/NVLink,
  while 'data' only all-reduces gradients, which tolerates the slower network between hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = _resolve_mesh_shape(data, fsdp, len(devices))
  # Auto axes: the step relies on XLA's sharding propagation, not on sharding in types.
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    # Orders devices along the physical torus / NVLink topology where JAX knows it.
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError) as e:
    # Multi-slice TPUs and unusual topologies: process-major order keeps each host's
    # devices adjacent, so 'fsdp' stays inside a host when it divides the local count.
    logging.warning("jax.make_mesh(%s) failed (%s); using devices in process order", shape, e)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered).reshape(shape), AXES, axis_types=axis_types)


def param_partition_spec(shape: Sequence[int], fsdp_size: int,
                         min_size: int = MIN_SHARDED_SIZE) -> P:
  """FSDP rule for one array: split its largest axis divisible by `fsdp_size` over 'fsdp'.

  Arrays under `min_size` elements, and arrays with no divisible axis, are replicated:
  gathering them would cost more latency than their memory is worth. Ties go to the
  earliest axis so the rule is deterministic.
  """
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  divisible = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda a: (shape[a], -a))
  return P(*(("fsdp" if a == axis else None) for a in range(len(shape))))


def state_shardings(abstract_tree, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE):
  """NamedShardings for any pytree of arrays or ShapeDtypeStructs: params, a TrainState.

  The rule looks only at shapes, so optax states (whose moments mirror the params) and
  the reference params get the same layout as the policy params without naming optax
  internals; step counters are scalars and replicate.
  """
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(
      lambda leaf: NamedSharding(mesh, param_partition_spec(np.shape(leaf), fsdp_size,
                                                            min_size)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (pair) axis over every device; other axes whole on each device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch_pairs: int, mesh: Mesh, grad_accum: int = 1) -> None:
  """UserError unless every device gets the same whole number of pairs in each of the
  `grad_accum` microbatches (and so every host, which drives as many devices as the
  others, an equal share): the one place this rule is checked for a run."""
  unit = grad_accum * mesh.size
  if global_batch_pairs % unit == 0:
    return
  lower = global_batch_pairs // unit * unit
  valid = [n for n in (lower, lower + unit) if n > 0]
  accumulation = f"train.grad_accum={grad_accum} x " if grad_accum > 1 else ""
  raise UserError(f"train.batch_pairs={global_batch_pairs} is not divisible by "
                  f"{accumulation}the {mesh.size} devices of the mesh "
                  f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}); set "
                  f"--config.train.batch_pairs to {' or '.join(map(str, valid))}")


def host_slice(global_batch_pairs: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
  """The pairs of a global batch a process (default: this one) loads: an equal, contiguous
  share; the one place a host's share is computed.

  Which global rows they land on does not matter: each pair's noise comes from its id.
  `check_batch` makes the share whole, as every host drives the same number of devices.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  per_host = global_batch_pairs // count
  return slice(index * per_host, (index + 1) * per_host)


def host_to_global(local_batch: Mapping[str, np.ndarray],
                   sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's rows into global arrays without copying data between hosts.

  Every process passes its own `host_slice` of the batch; on one process that is all of it.
  """
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}


def gather_from_hosts(value) -> list:
  """Every process's JSON-ready `value`, in process order, on every process.

  A collective: all processes must call it at the same point. It carries small host-side
  state (data positions, skip counts), a few KB, never arrays of the model.
  """
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(encoded.size))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:encoded.size] = encoded
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]


def _multi_process_launch(environ: Mapping[str, str]) -> bool:
  """Whether a launcher started several processes of this program (SLURM, MPI, TPU pod)."""
  slurm_tasks = int(environ.get("SLURM_NTASKS") or 1)
  if slurm_tasks > 1 and "SLURM_PROCID" not in environ:
    # An allocation's shell (salloc, or an sbatch script's own lines) holds SLURM_NTASKS
    # too, but only srun starts the tasks, each with its SLURM_PROCID.
    raise UserError(f"this SLURM allocation has {slurm_tasks} tasks but this process was "
                    "not started by srun (no SLURM_PROCID): run `srun python -m "
                    "dpo_jax.main ...` (launch/slurm_gpu.sbatch), or pass "
                    "--config.distributed.multi_process=False to train in this one process")
  if slurm_tasks > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_NUM_SLICES" in environ


def _wants_distributed(settings: Mapping, coordinator: str | None,
                       environ: Mapping[str, str]) -> bool:
  if settings.get("multi_process") is not None:
    return settings["multi_process"]
  return bool(coordinator) or _multi_process_launch(environ)


def initialize_distributed(config, environ: Mapping[str, str] | None = None) -> None:
  """Joins the other processes of a multi-host run; a no-op for a single process.

  Call it first, before anything touches a device. Optional config keys, all in
  `distributed`: `coordinator_address` ('host:port'), `num_processes` and `process_id` for
  a hand-started run; `multi_process` True/False to force the decision, e.g. on GCE TPU
  pods whose topology lives in the metadata server rather than the environment. Unset,
  SLURM, Open MPI and TPU pod launches are detected from their environment variables and
  `jax.distributed.initialize()` reads the rest from the cluster.
  """
  environ = os.environ if environ is None else environ
  settings = config.get("distributed") or {}
  coordinator = settings.get("coordinator_address") or environ.get("JAX_COORDINATOR_ADDRESS")
  if jax.distributed.is_initialized() or not _wants_distributed(settings, coordinator,
                                                                 environ):
    return
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=settings.get("num_processes"),
                             process_id=settings.get("process_id"))
