"""`python -m dpo_jax.tools.memory`: XLA's per-device memory of the real train step, compiled from
shapes alone, on 1 and 8 devices, with and without remat."""
import json
import math
import sys
import types

import jax
import pytest
from ml_collections import config_dict

import tiny_config
from dpo_jax import bench, parallel
from dpo_jax.errors import UserError
from dpo_jax.tools import memory
from subprocesses import run_module

# The smallest UNet the code builds (one level without attention, the mid block's one
# transformer): compiling dominates these tests, and it grows with the number of layers.
ONE_LEVEL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32],
    down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"], attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8)
LATENT = 4  # 32 px / the VAE's 8.
CONTEXT = (77, 32)
# One cached pair as the step receives it: winner and loser latent means and log-variances
# and the context in float16, pair id and epoch as int32.
PAIR_BYTES = 2 * (2 * LATENT * LATENT * 4) * 2 + math.prod(CONTEXT) * 2 + 4 + 4
# Per parameter: the float32 policy, the float32 reference and AdamW's two float32 moments.
STATE_BYTES_PER_PARAM = 4 + 4 + 4 + 4


def _config(remat: bool, fsdp: int, remat_policy: str = "full",
            resolution: int = 32) -> config_dict.ConfigDict:
  config = tiny_config.synthetic_config()
  config.model.unet = config_dict.ConfigDict(ONE_LEVEL_UNET)
  config.data.resolution = resolution
  config.model.remat = remat
  config.model.remat_policy = remat_policy
  config.mesh.fsdp = fsdp
  config.mesh.min_shard_size = 1  # Shard every array with an axis divisible by 8.
  return config


@pytest.fixture(scope="module")
def reports():
  """The tool's result for two layouts (conftest gives this process 8 CPU devices), and for
  the remat choices at 64 px, where activations outweigh this UNet's state.

  Compiled with most XLA optimisations off, as the tests' subprocesses are: that halves the
  compile time and leaves the arguments as they are; it changes the temporaries' size, but
  remat still lowers them."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    return {
        "1": memory.measure(_config(remat=False, fsdp=1), devices=jax.devices()[:1]),
        **{name: memory.measure(_config(remat=remat, fsdp=1, remat_policy=policy,
                                        resolution=64), devices=jax.devices()[:1])
           for name, remat, policy in (("64px", False, "full"), ("64px remat", True, "full"),
                                       ("64px remat dots", True, "dots"))},
        "8 fsdp": memory.measure(_config(remat=False, fsdp=8), devices=jax.devices()[:8]),
    }
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def _param_shapes():
  params = bench.abstract_models(_config(False, 1), ONE_LEVEL_UNET).initial_params
  return [leaf.shape for leaf in jax.tree_util.tree_leaves(params)]


def test_one_device_holds_the_whole_state_and_its_pairs(reports):
  result = reports["1"]
  json.loads(json.dumps(result))  # The command's last line.
  assert len(memory.summary(result).splitlines()) == 3
  assert (result["devices"], result["mesh_fsdp"], result["batch_pairs"]) == (1, 1, 1)
  # Unset, the attention is XLA's, as accelerators run it (not the CPU's own default).
  assert result["attention"] == "xla"
  params = sum(math.prod(shape) for shape in _param_shapes())
  assert result["params"] == params
  # Arguments: the train state and one pair, to within the step counters.
  expected = STATE_BYTES_PER_PARAM * params + PAIR_BYTES
  assert expected <= result["argument_bytes"] <= expected + 64
  # The state is donated: its buffers are the new state's.
  assert result["alias_bytes"] == pytest.approx(STATE_BYTES_PER_PARAM * params, abs=64)
  assert result["total_bytes"] == (result["argument_bytes"] + result["output_bytes"]
                                   - result["alias_bytes"] + result["temp_bytes"])
  assert result["flops_per_step"] == result["flops_per_device"] > 0


def test_fsdp_over_8_devices_divides_the_state(reports):
  """Each device holds 1/8 of every array the FSDP rule splits, the others whole, and its
  own pair: the factor against one device comes from the shapes, not from XLA."""
  one, eight = reports["1"], reports["8 fsdp"]
  assert (eight["devices"], eight["mesh_fsdp"], eight["batch_pairs"]) == (8, 8, 8)
  per_device = sum(math.prod(shape) / (8 if parallel.param_partition_spec(shape, 8, 1) else 1)
                   for shape in _param_shapes())
  expected = STATE_BYTES_PER_PARAM * per_device + PAIR_BYTES
  assert expected <= eight["argument_bytes"] <= expected + 64
  assert 7 < one["argument_bytes"] / eight["argument_bytes"] <= 8
  # XLA's cost analysis is one device's: the step's is 8 times it.
  assert eight["flops_per_step"] == 8 * eight["flops_per_device"]


def test_remat_trades_flops_for_temporaries(reports):
  plain, remat = reports["64px"], reports["64px remat"]
  assert remat["remat"] and not plain["remat"]
  assert remat["argument_bytes"] == plain["argument_bytes"]
  # Measured on this UNet: 2.67 MB of temporaries against 3.21 MB, 22% more FLOPs.
  assert remat["temp_bytes"] < 0.9 * plain["temp_bytes"]
  assert remat["flops_per_step"] > 1.05 * plain["flops_per_step"]


def test_remat_policy_dots_keeps_products_to_recompute_less(reports):
  """'dots' keeps the blocks' dense and 1x1 products: between no remat and full remat in
  both temporaries and FLOPs."""
  plain, full, dots = reports["64px"], reports["64px remat"], reports["64px remat dots"]
  assert (full["remat_policy"], dots["remat_policy"]) == ("full", "dots")
  assert full["temp_bytes"] < dots["temp_bytes"] <= plain["temp_bytes"]
  assert plain["flops_per_step"] <= dots["flops_per_step"] < full["flops_per_step"]


@pytest.fixture(scope="module")
def tpu_reports():
  """The tool's result compiled by libtpu for TPU v5p (no TPU here): one chip, and a 2x2x2
  slice with FSDP over its 8 chips."""
  return {"1": memory.measure(_config(remat=False, fsdp=1),
                              devices=memory.tpu_devices("v5p:1x1x1")),
          "8 fsdp": memory.measure(_config(remat=False, fsdp=8),
                                   devices=memory.tpu_devices("v5p:2x2x2"))}


def test_tpu_slices_compile_without_a_tpu(tpu_reports, reports):
  one, eight = tpu_reports["1"], tpu_reports["8 fsdp"]
  assert (one["platform"], one["devices"], eight["devices"]) == ("tpu", 1, 8)
  assert one["device_kind"].startswith("TPU v5") and eight["mesh_fsdp"] == 8
  assert one["device_memory_bytes"] == 95 * 2**30 and one["fits"] and eight["fits"]
  assert "of 95 GiB per chip: fits" in memory.summary(one)
  # The state's bytes on a TPU: the shapes' bytes, or more where its tiled layouts pad the
  # small arrays; FSDP over 8 chips divides them (4.8x on this UNet, whose small padded
  # arrays stay whole).
  assert one["argument_bytes"] >= reports["1"]["argument_bytes"]
  assert one["argument_bytes"] / eight["argument_bytes"] > 3
  assert eight["flops_per_step"] == 8 * eight["flops_per_device"] > 0


def test_tpu_refusals_are_one_line(monkeypatch):
  with pytest.raises(UserError, match="e.g. v5p:2x2x1"):
    memory.tpu_devices("v5p-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # As if not installed.
  with pytest.raises(UserError, match=r"pip install -e '.\[tpu\]'"):
    memory.tpu_devices("v5p:2x2x1")


def test_fit_is_judged_against_the_chips_memory():
  chip = lambda kind: types.SimpleNamespace(platform="tpu", device_kind=kind)
  assert memory.device_memory_gib(chip("TPU v5 lite")) == 16  # v5e, not v5p's 95.
  assert memory.device_memory_gib(chip("TPU v5")) == 95
  assert memory.device_memory_gib(chip("TPU v6 lite")) == 32
  assert memory.device_memory_gib(jax.devices()[0]) is None  # Fake CPU devices: no bound.
  result = {"unet": "sdxl", "params": 2.6e9, "devices": 1, "device_kind": "TPU v5 lite",
            "mesh_data": 1, "mesh_fsdp": 1, "pairs_per_device": 1, "grad_accum": 1,
            "resolution": 1024, "compile_seconds": 1.0, "flops_per_step": 1.0,
            "device_memory_bytes": 16 * 2**30, "fits": False,
            **{f"{kind}_bytes": 2**30 for kind in
               ("argument", "output", "temp", "alias", "generated_code", "total")}}
  assert "of 16 GiB per chip: does NOT fit" in memory.summary(result)


def test_unet_shape_from_a_release_id_a_folder_or_the_config(tmp_path):
  config = _config(False, 1)
  config.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
  name, shape = memory.unet_shape(config, None)
  assert name == "sdxl" and shape["cross_attention_dim"] == 2048
  assert memory.unet_shape(config, "sd15")[1]["cross_attention_dim"] == 768
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text(json.dumps(ONE_LEVEL_UNET))
  config.model.pretrained = str(tmp_path)
  assert memory.unet_shape(config, None) == (str(tmp_path), ONE_LEVEL_UNET)
  config.model.pretrained = "someone/their-model"
  with pytest.raises(UserError, match="--unet sd15"):
    memory.unet_shape(config, None)
  config.model.pretrained = None
  assert memory.unet_shape(config, None) == ("config", ONE_LEVEL_UNET)


def test_refusals_are_one_line():
  config = _config(False, 1)
  config.model.attention_implementation = "cudnn"
  with pytest.raises(UserError, match="pass .blocked. for a fused .flash. kernel.s memory"):
    memory.measure(config, devices=jax.devices()[:1])
  with pytest.raises(UserError, match="pairs_per_device"):
    memory.measure(_config(False, 1), pairs_per_device=0)


def test_device_environment_replaces_only_the_device_count():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d",
             "JAX_PLATFORMS": "cuda", "HOME": "/h"}
  assert memory.device_environment(64, environ) == {
      "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=64",
      "JAX_PLATFORMS": "cpu", "HOME": "/h"}


@pytest.mark.slow
def test_command_runs_itself_on_the_devices_asked_for():
  """Started on one device, the command re-executes itself on --devices: a mesh that does not
  fit those devices is refused in one line naming their count."""
  done = run_module("dpo_jax.tools.memory", "--config", "configs/synthetic.py", "--devices", "2",
                    "--config.mesh.fsdp=3", timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines() == [
      "error: mesh.fsdp=3 does not divide the 2 devices; set --config.mesh.fsdp to one of 1, 2"]
