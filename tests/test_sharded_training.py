"""The same steps on one device and on a 2 x 4 (data x fsdp) mesh of 8 give the same model,
and a run saved on one mesh resumes on another."""
import json

import jax
import pytest
import numpy as np

import tiny_config
from dpo_jax import train


def _config(data: int, fsdp: int):
  config = tiny_config.synthetic_config()
  config.train.steps = 4
  config.train.batch_pairs = 8
  config.train.log_every = 1
  config.data.resolution = 32
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.mesh.min_shard_size = 2**10  # So that the tiny UNet's kernels really are sharded.
  return config


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  """The 4 steps on one device that every sharded run is compared with (trained once)."""
  workdir = tmp_path_factory.mktemp("one")
  return train.train(_config(1, 1), str(workdir), jax.devices()[:1]), workdir


@pytest.mark.slow
def test_one_device_and_eight_devices_train_the_same_params(tmp_path, one_device_run):
  single, single_workdir = one_device_run
  sharded = train.train(_config(2, 4), str(tmp_path / "eight"), jax.devices()[:8])

  kernel = sharded.params["conv_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert len({s.device for s in kernel.addressable_shards}) == 8
  for a, b in zip(jax.tree_util.tree_leaves(single.params),
                  jax.tree_util.tree_leaves(sharded.params)):
    # Gradient sums are reduced in another order across devices: float32 rounding only.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  # AdamW hides a gradient's scale from the weights (a gradient 8x too large moves them
  # alike); the logged gradient norm and loss of every step do not.
  logs = [[json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
          for workdir in (single_workdir, tmp_path / "eight")]
  assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
  for one, eight in zip(*logs):
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-3)
    # β/2 = 2500 multiplies the float32 rounding of the errors into the loss.
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-3, atol=1e-6)
  moved = np.abs(np.asarray(single.params["conv_in"]["kernel"])
                 - np.asarray(single.reference_params["conv_in"]["kernel"])).max()
  assert moved > 1e-7  # The policy did move, so agreeing after 4 steps means something.


@pytest.mark.slow
@pytest.mark.parametrize("saved_on, resumed_on", [((2, 4), (2, 1)), ((2, 1), (2, 4))])
def test_a_run_resumes_on_another_device_count(tmp_path, capsys, one_device_run, saved_on,
                                              resumed_on):
  """Orbax reshards on restore: steps 1-2 on one mesh (8 devices as 2 × 4, or 2 as 2 × 1),
  steps 3-4 resumed on the other, give the model of 4 steps on one device (float32
  rounding only)."""
  single, _ = one_device_run
  first = _config(*saved_on)
  first.train.steps, first.train.ckpt_every = 2, 2
  train.train(first, str(tmp_path / "moved"), jax.devices()[:saved_on[0] * saved_on[1]])
  capsys.readouterr()
  devices = resumed_on[0] * resumed_on[1]
  resumed = train.train(_config(*resumed_on), str(tmp_path / "moved"), jax.devices()[:devices])
  assert f"resumed from step 2 in {tmp_path / 'moved'}" in capsys.readouterr().out
  assert int(resumed.step) == 4
  shards = resumed.params["conv_in"]["kernel"].addressable_shards
  assert len({s.device for s in shards}) == devices
  steps = [json.loads(line)["step"]
           for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]  # Steps 3-4 continued from the checkpoint, not from scratch.
  for a, b in zip(jax.tree_util.tree_leaves(single.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
