"""LoRA-DPO through `train`: adapters alone are trained, the base is the reference (step 1
at exactly ln 2 in bfloat16), and the run exports as a diffusers LoRA file and as a merged
UNet that diffusers loads to the same outputs."""
import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

import tiny_config
import tiny_models
from dpo_jax import export, lora, runs, train
from dpo_jax.models import unet as unet_lib

SMALL_UNET = tiny_models.SMALL_SD15_UNET


def _config():
  config = tiny_config.synthetic_config()
  config.model.unet = SMALL_UNET
  config.model.compute_dtype = config.model.reference_dtype = "bfloat16"
  config.lora.update(enabled=True, rank=4, alpha=8.0, targets="to_q,to_k,to_v,to_out.0,conv1")
  config.train.update(steps=3, batch_pairs=4, log_every=1, ckpt_every=1000)
  config.optim.peak_lr = 1e-3  # Adapters must move visibly in 3 steps.
  return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora_run")
  state = train.train(_config(), str(workdir), jax.devices()[:1])
  return workdir, state


@pytest.mark.slow
def test_lora_trains_the_adapters_alone_from_exactly_ln2(lora_run):
  workdir, state = lora_run
  with open(workdir / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f if '"loss"' in line]
  # B = 0 at init: the merged policy is the base, which is the reference, bit for bit.
  assert abs(logged[0]["loss"] - math.log(2)) < 1e-6 and logged[0]["implicit_acc"] == 0.5
  assert logged[-1]["loss"] != logged[0]["loss"]
  trained = traverse_util.flatten_dict(jax.device_get(state.params))
  assert trained and all(path[-2] in (lora.A, lora.B) for path in trained)
  assert any(np.abs(value).max() > 0 for path, value in trained.items() if path[-2] == lora.B)
  # The optimiser holds moments of the adapters only; the reference is the whole base UNet.
  adapter_size = sum(v.size for v in trained.values())
  moments = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.opt_state))
  assert moments < 3 * adapter_size + 100
  base = unet_lib.init_params(unet_lib.build_unet(SMALL_UNET), jax.random.key(0))
  assert (sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.reference_params))
          == sum(leaf.size for leaf in jax.tree_util.tree_leaves(base)))


@pytest.mark.slow
def test_lora_export_loads_in_diffusers_as_the_merged_unet(lora_run, tmp_path):
  """The LoRA file on the base UNet (diffusers' load_lora_adapter) and the `--merge` export
  (from_pretrained) give one output (float32, 1e-4)."""
  import torch
  from diffusers import UNet2DConditionModel

  workdir, _ = lora_run
  run = runs.load_run(str(workdir))
  export.export(str(workdir), str(tmp_path / "lora"))
  export.export(str(workdir), str(tmp_path / "merged"), merge=True)
  base = unet_lib.init_params(unet_lib.build_unet(SMALL_UNET), jax.random.key(0))
  export.write_unet(run.config, base, str(tmp_path / "base"))

  with_lora = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet").eval()
  with_lora.load_lora_adapter(str(tmp_path / "lora"), weight_name=export.LORA_WEIGHTS,
                              prefix="unet")
  merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval()
  generator = torch.Generator().manual_seed(0)
  sample = torch.randn(2, 4, 16, 16, generator=generator)
  context = torch.randn(2, 8, SMALL_UNET["cross_attention_dim"], generator=generator)
  with torch.no_grad():
    outputs = [unet(sample, torch.tensor([10, 700]), context).sample.numpy()
               for unet in (with_lora, merged)]
  np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4, rtol=0)
  base_unet = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet").eval()
  with torch.no_grad():
    untouched = base_unet(sample, torch.tensor([10, 700]), context).sample.numpy()
  assert np.abs(outputs[1] - untouched).max() > 1e-3  # The trained adapters change it.
