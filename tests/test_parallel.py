"""Mesh, sharding rules and host->global batches on 8 fake CPU devices (see conftest)."""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import subprocesses
import tiny_models
from dpo_jax import parallel
from dpo_jax.errors import UserError
from dpo_jax.models import unet as unet_lib
from dpo_jax.models.unet import init_abstract
from dpo_jax.train_step import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("data, fsdp, shape", [
    (2, 4, (2, 4)), (-1, 4, (2, 4)), (8, 1, (8, 1)), (1, -1, (1, 8))])
def test_make_mesh_shapes(data, fsdp, shape):
  mesh = parallel.make_mesh(data, fsdp)
  assert mesh.axis_names == ("data", "fsdp")
  assert mesh.devices.shape == shape
  assert set(mesh.devices.flat) == set(jax.devices())


@pytest.mark.parametrize("data, fsdp, key", [
    (3, -1, "mesh.data"), (2, 2, "mesh.fsdp"), (-1, -1, "mesh.fsdp"), (0, 8, "mesh.data")])
def test_make_mesh_errors_are_one_line_naming_the_key(data, fsdp, key):
  with pytest.raises(UserError) as error:
    parallel.make_mesh(data, fsdp)
  message = str(error.value)
  assert "\n" not in message and key in message and "8" in message, message


def test_make_mesh_on_a_subset_of_devices():
  mesh = parallel.make_mesh(-1, 2, devices=jax.devices()[:4])
  assert mesh.devices.shape == (2, 2)


@pytest.mark.parametrize("shape, spec", [
    ((3, 3, 320, 640), P(None, None, None, "fsdp")),  # The largest axis.
    ((320,), P()),  # Under the size threshold: replicated.
    ((3, 3, 320, 642), P(None, None, "fsdp", None)),  # 642 % 4: the next largest.
    ((3, 3, 321, 643), P()),  # Nothing divisible: replicated.
    ((1280, 1280), P("fsdp", None)),  # Ties go to the earliest axis.
    ((), P()),  # Scalars such as optimiser step counts.
])
def test_param_partition_spec(shape, spec):
  assert parallel.param_partition_spec(shape, 4) == spec


def test_param_partition_spec_without_fsdp_replicates():
  assert parallel.param_partition_spec((3, 3, 320, 640), 1) == P()


def _tiny_unet_state():
  model = unet_lib.build_unet(tiny_models.SD15_UNET)
  params = init_abstract(model)
  optimizer = optax.adamw(1e-3)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    reference_params=params, opt_state=jax.eval_shape(optimizer.init, params))


def test_state_shardings_on_a_tiny_unet():
  mesh = parallel.make_mesh(2, 4)
  abstract = _tiny_unet_state()
  # The tiny UNet's arrays are all under the default threshold; a small one exercises FSDP.
  shardings = parallel.state_shardings(abstract, mesh, min_size=2**12)
  leaves = jax.tree_util.tree_leaves(shardings)
  assert len(leaves) == len(jax.tree_util.tree_leaves(abstract))
  assert all(isinstance(s, NamedSharding) and s.mesh is mesh for s in leaves)
  assert any(s.spec != P() for s in leaves) and any(s.spec == P() for s in leaves)
  assert shardings.step.spec == P()
  # Adam's moments follow their params, so the update needs no resharding.
  adam = shardings.opt_state[0]
  assert jax.tree_util.tree_leaves(adam.mu) == jax.tree_util.tree_leaves(shardings.params)
  assert jax.tree_util.tree_leaves(adam.nu) == jax.tree_util.tree_leaves(shardings.params)
  assert adam.count.spec == P()

  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32),
                                  abstract.params)
  placed = jax.device_put(params, shardings.params)
  for array, sharding in zip(jax.tree_util.tree_leaves(placed),
                             jax.tree_util.tree_leaves(shardings.params)):
    assert array.sharding == sharding
  update = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 0.5 * x, p),
                   in_shardings=(shardings.params,), out_shardings=shardings.params)
  updated = update(placed)
  for array, sharding, host in zip(jax.tree_util.tree_leaves(updated),
                                   jax.tree_util.tree_leaves(shardings.params),
                                   jax.tree_util.tree_leaves(params)):
    assert array.sharding.is_equivalent_to(sharding, array.ndim)
    np.testing.assert_allclose(np.asarray(array), 0.5 * host)


def _pairs(batch_pairs):
  rng = np.random.default_rng(0)
  return {"latents": rng.standard_normal((batch_pairs, 2, 4, 4, 3), np.float32),
          "context": rng.standard_normal((batch_pairs, 5, 6), np.float32),
          "pair_ids": np.arange(batch_pairs, dtype=np.int32)}


def test_host_to_global_on_one_process():
  mesh = parallel.make_mesh(2, 4)
  sharding = parallel.batch_sharding(mesh)
  local = _pairs(16)
  assert parallel.host_slice(16) == slice(0, 16)
  batch = parallel.host_to_global(local, sharding)
  for name, array in batch.items():
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), local[name])
  # Each device holds 2 whole pairs: winner and loser side by side.
  assert {shard.data.shape for shard in batch["latents"].addressable_shards} == {(2, 2, 4, 4, 3)}


def test_pair_layout_reaches_the_unet_without_communication():
  """[B, 2, ...] -> [2B, ...] and repeating per-pair noise keep every pair on its device."""
  mesh = parallel.make_mesh(2, 4)
  sharding = parallel.batch_sharding(mesh)
  batch = parallel.host_to_global(_pairs(16), sharding)

  def unet_inputs(latents, context):
    pairs = latents.shape[0]
    samples = latents.reshape(2 * pairs, *latents.shape[2:])  # w0, l0, w1, l1, ...
    noise = jnp.ones(latents.shape[:1] + latents.shape[2:])
    return samples + jnp.repeat(noise, 2, axis=0), jnp.repeat(context, 2, axis=0)

  step = jax.jit(unet_inputs, in_shardings=(sharding, sharding))
  compiled = step.lower(batch["latents"], batch["context"]).compile().as_text()
  for collective in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
    assert collective not in compiled
  samples, context = step(batch["latents"], batch["context"])
  assert samples.sharding.is_equivalent_to(sharding, samples.ndim)
  np.testing.assert_array_equal(np.asarray(samples)[1::2],
                                np.asarray(batch["latents"])[:, 1] + 1)
  np.testing.assert_array_equal(np.asarray(context)[::2], np.asarray(batch["context"]))


@pytest.mark.parametrize("batch_pairs, suggestion", [(10, "8 or 16"), (4, "to 8")])
def test_check_batch_error(batch_pairs, suggestion):
  mesh = parallel.make_mesh(2, 4)
  with pytest.raises(UserError) as error:
    parallel.check_batch(batch_pairs, mesh)
  message = str(error.value)
  assert "\n" not in message and "train.batch_pairs" in message and suggestion in message


def test_check_batch_accepts_multiples():
  parallel.check_batch(24, parallel.make_mesh(2, 4))
  parallel.check_batch(32, parallel.make_mesh(2, 4), grad_accum=4)


def test_check_batch_counts_the_microbatches():
  with pytest.raises(UserError) as error:
    parallel.check_batch(24, parallel.make_mesh(2, 4), grad_accum=4)
  message = str(error.value)
  assert "train.grad_accum=4" in message and "to 32" in message and "\n" not in message


def _config(**distributed):
  config = ml_collections.ConfigDict()
  config.distributed = ml_collections.ConfigDict(distributed)
  return config


@pytest.mark.parametrize("config, environ, expected", [
    (ml_collections.ConfigDict(), {}, None),
    (_config(), {"SLURM_NTASKS": "1"}, None),
    (_config(multi_process=False), {"SLURM_NTASKS": "4"}, None),
    (_config(), {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, (None, None, None)),
    (_config(), {"OMPI_COMM_WORLD_SIZE": "2"}, (None, None, None)),
    (_config(), {"TPU_WORKER_HOSTNAMES": "w0,w1"}, (None, None, None)),
    (_config(multi_process=True), {}, (None, None, None)),
    (_config(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), {},
     ("10.0.0.1:1234", 2, 1)),
])
def test_initialize_distributed_only_for_multi_process_launches(
    monkeypatch, config, environ, expected):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(tuple(kwargs.values())))
  parallel.initialize_distributed(config, environ)
  assert calls == ([] if expected is None else [expected])


def test_a_slurm_allocation_without_srun_is_one_line_with_the_fix(monkeypatch):
  """`salloc -n 4` then `python -m dpo_jax.main`: SLURM_NTASKS=4 but no task of srun's."""
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: pytest.fail("called"))
  with pytest.raises(UserError) as error:
    parallel.initialize_distributed(_config(), {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
  assert "not started by srun" in str(error.value) and "\n" not in str(error.value)
  parallel.initialize_distributed(_config(multi_process=False), {"SLURM_NTASKS": "4"})


_WORKER = textwrap.dedent("""
    import sys
    import jax
    import ml_collections
    import numpy as np
    from dpo_jax import parallel

    process_id, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    config = ml_collections.ConfigDict({"distributed": {
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
        "process_id": process_id}})
    parallel.initialize_distributed(config)
    mesh = parallel.make_mesh(-1, 2)
    pair_ids = np.arange(8, dtype=np.int32)[parallel.host_slice(8)]
    batch = parallel.host_to_global({"pair_ids": pair_ids}, parallel.batch_sharding(mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    total = jax.jit(lambda x: x.sum(), out_shardings=replicated)(batch["pair_ids"])
    # Host-side state of unequal sizes, as data positions and skip counts are.
    hosts = parallel.gather_from_hosts({"host": process_id, "text": "x" * 3 * process_id})
    print(hosts)
    print(mesh.devices.shape, batch["pair_ids"].shape, int(total))
    """)


def test_two_processes_assemble_one_global_batch(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = subprocesses.cpu_env(devices=2)
  workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  outputs = [worker.communicate(timeout=120) for worker in workers]
  for worker, (stdout, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-2000:]
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"(2, 2) (8,) {sum(range(8))}"
    assert lines[-2] == "[{'host': 0, 'text': ''}, {'host': 1, 'text': 'xxx'}]"
