"""The tests' configs: the tiny end-to-end run (`get_config`) and `synthetic_config`.

`get_config()` is a small diffusers pipeline on Pick-a-Pic parquet at 32 px. Tests import it
or pass its path to the commands, with the pipeline and the data on the command line:

  python -m dpo_jax.main --config tests/tiny_config.py --workdir W \
      --config.model.pretrained=PIPELINE --config.data.train_files='DATA/*.parquet'
"""
import importlib.util
import os

from dpo_jax import default_config

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "synthetic.py")


def get_config():
  config = default_config.get_config()
  config.data.format = "pickapic"
  config.data.resolution = 32
  config.train.steps = 4
  config.train.batch_pairs = 2
  config.train.ckpt_every = 2
  config.train.log_every = 1
  config.optim.peak_lr = 1e-5
  return config


def synthetic_config():
  """configs/synthetic.py's config (a random tiny UNet on synthetic latents), imported by path as
  config_flags does."""
  spec = importlib.util.spec_from_file_location("synthetic_config", DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
