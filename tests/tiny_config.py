"""The tests' tiny end-to-end run: a small diffusers pipeline, Pick-a-Pic parquet, 32 px.
Tests import it (`tiny_config.get_config()`) or pass its path to the commands, with the
pipeline and the data on the command line:

  python -m dpo_jax.main --config tests/tiny_config.py --workdir W \
      --config.model.pretrained=PIPELINE --config.data.train_files='DATA/*.parquet'
"""
from dpo_jax import default_config


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
