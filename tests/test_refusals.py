"""Runs that cannot be right are refused, in one line naming what to fix: a latent cache read
with other encoders than wrote it."""
import jax
import pytest

import tiny_config
import tiny_data
import tiny_models
from dpo_jax import prepare as prepare_lib, train
from dpo_jax.errors import UserError

PAIRS = 8


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert message and "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  """A tiny SD pipeline, two copies of it each with one frozen encoder's weights changed
  (same shapes, same UNet), and Pick-a-Pic parquet."""
  folder = tmp_path_factory.mktemp("pipelines")
  tiny_models.make_pipeline("sd", small=True).save_pretrained(folder / "original")
  for name, component in (("other_text_encoder", "text_encoder"), ("other_vae", "vae")):
    pipe = tiny_models.make_pipeline("sd", small=True)
    tiny_models.perturb_(getattr(pipe, component), scale=1e-3, seed=7)
    pipe.save_pretrained(folder / name)
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=PAIRS, seed=0)
  return folder


def _config(folder, pipeline: str):
  config = tiny_config.get_config()
  config.model.pretrained = str(folder / pipeline)
  config.data.train_files = str(folder / "train.parquet")
  config.train.steps = 1
  return config


@pytest.fixture(scope="module")
def cache(pipelines, tmp_path_factory):
  """A latent cache of the parquet, encoded by the original pipeline's VAE and text encoder."""
  output = str(tmp_path_factory.mktemp("cache") / "cache")
  counts = prepare_lib.prepare(_config(pipelines, "original"), output, batch_pairs=PAIRS)
  assert counts["kept"] == PAIRS
  return output


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["other_text_encoder", "other_vae"])
def test_a_latent_cache_is_refused_by_a_model_with_other_encoder_weights(pipelines, cache,
                                                                        pipeline, tmp_path):
  config = _config(pipelines, pipeline)
  config.data.cache_dir = cache
  with pytest.raises(UserError) as error:
    train.train(config, str(tmp_path), jax.devices()[:1])
  message = _one_line(error)
  assert message.startswith(f"data.cache_dir={cache} was encoded by other VAE or text encoder "
                            "weights"), message
  assert str(pipelines / "original") in message  # The pipeline that wrote it.
  assert "prepare it again" in message
  assert not list(tmp_path.glob("checkpoints/[0-9]*"))  # Refused before any step.


@pytest.mark.slow
def test_the_same_cache_is_read_with_the_encoders_that_wrote_it(pipelines, cache):
  """The control for the refusals above: with the pipeline that wrote it, the cache loads
  and gives batches of the encoded pairs."""
  config = _config(pipelines, "original")
  config.data.cache_dir = cache
  batch = next(train.make_data_iterator(config, train.load_models(config)))
  assert "latent_mean" in batch and "pixels" not in batch
  assert len(batch["pair_ids"]) == config.train.batch_pairs
