"""Runs that cannot be right are refused, in one line naming what to fix: a latent cache read
with other encoders than wrote it, a checkpoint resumed with another host count."""
import jax
import pytest

import tiny_config
import tiny_data
import tiny_models
from dpo_jax import checkpoint, parallel, prepare as prepare_lib, train
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
  tiny_models.make_pipeline("sd").save_pretrained(folder / "original")
  for name, component in (("other_text_encoder", "text_encoder"), ("other_vae", "vae")):
    pipe = tiny_models.make_pipeline("sd")
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


def _host_state(next_pair: int = 4) -> dict:
  return {"next_pair": next_pair}


def test_a_checkpoint_of_another_host_count_is_refused_with_both_counts(tmp_path):
  assert jax.process_count() == 1
  assert train._this_hosts_data_state({"hosts": [_host_state()]}, str(tmp_path)) == \
      _host_state()
  for hosts in (2, 4):
    with pytest.raises(UserError) as error:
      train._this_hosts_data_state({"hosts": [_host_state(i) for i in range(hosts)]},
                                   str(tmp_path))
    message = _one_line(error)
    assert str(tmp_path) in message
    assert f"written by {hosts} process(es) and this run has 1" in message
    assert "same host count" in message and "new --workdir" in message


def test_a_checkpoint_with_one_data_position_for_all_hosts_is_refused(tmp_path):
  """The older format: the iterator's state itself, without a per-host list."""
  with pytest.raises(UserError) as error:
    train._this_hosts_data_state(_host_state(), str(tmp_path))
  message = _one_line(error)
  assert str(tmp_path) in message and "older dpo_jax" in message
  assert "new --workdir" in message


@pytest.mark.slow
def test_resuming_a_checkpoint_written_by_two_hosts_is_refused(pipelines, tmp_path):
  """A real resume: a step-1 checkpoint of this run's state whose data state lists two
  hosts' positions, as two processes write it. train() refuses it before any step."""
  config = _config(pipelines, "original")
  config.train.steps = 2
  models = train.load_models(config)
  mesh = parallel.make_mesh(-1, 1, jax.devices()[:1])
  state, _ = train.build_program(config, models, mesh)
  data = train.make_data_iterator(config, models)
  one_host = data.get_state()
  saver = checkpoint.Checkpointer(str(tmp_path), every=1)
  saver.save(1, state, {"hosts": [one_host, one_host]}, config.to_dict(), force=True)
  saver.wait()
  saver.close()

  with pytest.raises(UserError) as error:
    train.train(config, str(tmp_path), jax.devices()[:1])
  message = _one_line(error)
  assert f"the checkpoint in {tmp_path} was written by 2 process(es)" in message
  saved = checkpoint.Checkpointer(str(tmp_path), every=1)
  assert saved.all_steps() == [1]  # Refused before any step ran or saved.
  saved.close()
