"""`train()` beyond SD DPO in float32: SDXL in the recipe's dtypes (step 1 at exactly ln 2,
constant or actual time ids), the SFT baseline (winners' denoising loss, pushed down) and
Diffusion-KTO on unpaired likes and dislikes (data.format='unpaired')."""
import json

import jax
import numpy as np
import pytest

import tiny_config
import tiny_data
import tiny_models
from dpo_jax import parallel, precision, train
from dpo_jax.models import weights

IMAGE_SIZE = 40  # Larger than the resolution (32): the actual original size is not R.


def _write_files(kind: str, folder):
  # Two-level UNets: each test compiles a whole train step, and these compile in about half
  # the time.
  tiny_models.make_pipeline(kind, small=True).save_pretrained(folder / "pipeline")
  tiny_data.write_warm_vs_cool(str(folder / "train.parquet"), pairs=8, seed=0, size=IMAGE_SIZE)
  return folder


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
  return _write_files("sdxl", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
  return _write_files("sd", tmp_path_factory.mktemp("sd"))


def _config(folder, **train_options):
  config = tiny_config.get_config()
  config.model.pretrained = str(folder / "pipeline")
  config.data.train_files = str(folder / "train.parquet")
  config.train.update(dict(steps=3, ckpt_every=1000) | train_options)
  return config


def _sdxl_recipe_config(folder, **train_options):
  config = _config(folder, **train_options)
  config.model.compute_dtype = config.model.reference_dtype = "bfloat16"
  return config


def _logged(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_trees(expected, actual):
  expected, actual = (weights.params_to_state_dict(tree) for tree in (expected, actual))
  assert sorted(expected) == sorted(actual)
  for key in expected:
    assert expected[key].dtype == actual[key].dtype, key
    np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)


def _moved(before, after) -> list[str]:
  """The state-dict keys whose values differ between two param trees."""
  before, after = (weights.params_to_state_dict(tree) for tree in (before, after))
  return [key for key in before if not np.array_equal(before[key], after[key])]


@pytest.fixture(scope="module")
def sdxl_run(sdxl_files, tmp_path_factory):
  """3 steps of DPO on the tiny SDXL pipeline, UNet and reference in bfloat16."""
  config = _sdxl_recipe_config(sdxl_files)
  assert config.data.sdxl_time_ids == "constant"  # The default, as the official code.
  workdir = tmp_path_factory.mktemp("sdxl_run")
  state = train.train(config, str(workdir), jax.devices()[:1])
  return config, state, _logged(workdir)


@pytest.mark.slow
def test_sdxl_in_bfloat16_starts_at_exactly_ln2_with_half_the_pairs_right(sdxl_run):
  _, _, records = sdxl_run
  assert [r["step"] for r in records] == [1, 2, 3]
  first = records[0]
  # Policy and reference are the same weights in the same dtypes, run by one body: their
  # errors are equal bit for bit, so every pair ties (inside = 0) whatever bfloat16 rounds.
  assert abs(first["loss"] - np.log(2)) < 1e-6, first
  assert first["implicit_acc"] == 0.5
  assert first["policy_error_winner"] == first["reference_error_winner"]
  assert first["policy_error_loser"] == first["reference_error_loser"]
  assert first["reward_margin"] == 0.0
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
  assert first["grad_norm"] > 0


@pytest.mark.slow
def test_sdxl_training_moves_the_policy_and_never_the_bfloat16_reference(sdxl_run):
  config, state, _ = sdxl_run
  assert int(state.step) == 3
  initial = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32),
                                   train.load_models(config).initial_params)
  reference = precision.reference_params(initial, config.model.reference_dtype)
  _assert_same_trees(jax.device_get(reference), jax.device_get(state.reference_params))
  # The rounded leaves (Dense and Conv) are stored in bfloat16, the others in float32.
  dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state.reference_params)}
  assert dtypes == {"bfloat16", "float32"}
  # Every policy tensor moved (AdamW's decay alone moves any non-zero one), the added
  # (time ids and pooled text) embedding's too.
  moved = _moved(initial, jax.device_get(state.params))
  policy = weights.params_to_state_dict(initial)
  assert moved == list(policy), sorted(set(policy) - set(moved))
  assert "add_embedding.linear_1.weight" in moved


@pytest.mark.slow
def test_sdxl_actual_time_ids_condition_the_unet_on_the_images_sizes(sdxl_files, sdxl_run,
                                                                     tmp_path):
  """The same pairs (40 px images at resolution 32), noise and weights with
  data.sdxl_time_ids='actual': the UNet is conditioned on (40, 40, 0, 0, 32, 32) instead of
  the constant (32, 32, 0, 0, 32, 32), so step 1's errors and gradient differ; only the
  loss stays ln 2 (policy and reference still see the same inputs)."""
  _, _, constant = sdxl_run
  config = _sdxl_recipe_config(sdxl_files, steps=1)
  config.data.sdxl_time_ids = "actual"
  train.train(config, str(tmp_path), jax.devices()[:1])
  (actual,) = _logged(tmp_path)
  assert abs(actual["loss"] - np.log(2)) < 1e-6 and actual["implicit_acc"] == 0.5
  for name in ("policy_error_winner", "policy_error_loser", "grad_norm"):
    assert np.isfinite(actual[name])
    assert abs(actual[name] - constant[0][name]) > 1e-4 * abs(constant[0][name]), name


@pytest.mark.slow
def test_sft_trains_on_the_winners_denoising_loss_and_lowers_it(sd_files, tmp_path):
  config = _config(sd_files)
  config.dpo.loss = "sft"
  state = train.train(config, str(tmp_path / "run"), jax.devices()[:1])
  records = _logged(tmp_path / "run")
  assert [r["step"] for r in records] == [1, 2, 3]
  for record in records:
    trained = {k for k in record if k not in ("step", "lr", "pairs_per_sec")
               and not k.startswith("data_")}
    # SFT's metrics (loss.sft_loss), the step's grad_norm and its non-finite-step counts;
    # no reference, no losers.
    assert trained == {"loss", "policy_error_winner", "grad_norm", "skipped_nonfinite",
                       "skipped_nonfinite_total", "nonfinite_streak"}, record
    assert record["skipped_nonfinite"] == 0
    assert record["loss"] == record["policy_error_winner"]
    assert np.isfinite(record["loss"]) and record["loss"] > 0 and record["grad_norm"] > 0
  models = train.load_models(config)
  assert len(_moved(models.initial_params, jax.device_get(state.params))) > 0

  # Step 1's pairs again, their losers' pixels made NaN: SFT never reads them. Stepped on
  # again and again, the batch's loss (each step's taken before its update) falls, from
  # step 1's loss in the run: the winners' denoising error, under the same noise.
  state, program = train.build_program(config, models, parallel.make_mesh(-1, 1,
                                                                          jax.devices()[:1]))
  host_batch = next(train.make_data_iterator(config, models))
  host_batch["pixels"][:, 1] = np.nan
  batch = program.step_input(host_batch)
  losses = []
  for _ in range(4):
    state, metrics = program.step_fn(state, batch)
    losses.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"])), losses
  assert losses[0] == records[0]["loss"]
  assert all(after < before for before, after in zip(losses, losses[1:])), losses


def _write_likes(folder, rows: int) -> str:
  """An unpaired JSONL file: warm textures liked, cool ones disliked, alternating."""
  from PIL import Image
  rng = np.random.default_rng(0)
  lines = []
  for i in range(rows):
    liked = i % 2 == 0
    Image.fromarray(tiny_data.textured(rng, IMAGE_SIZE, warm=liked)).save(folder / f"{i}.png")
    lines.append(json.dumps({"prompt": f"picture {i}", "image": f"{i}.png", "label": liked}))
  (folder / "likes.jsonl").write_text("\n".join(lines) + "\n")
  return str(folder / "likes.jsonl")


@pytest.mark.slow
def test_kto_on_unpaired_data_starts_at_one_half_and_pushes_likes_up_dislikes_down(
    sd_files, tmp_path):
  config = _config(sd_files, steps=2, batch_pairs=8)  # Every row a step: likes and dislikes.
  config.data.format, config.dpo.loss, config.optim.peak_lr = "unpaired", "kto", 1e-5
  config.data.train_files = _write_likes(tmp_path, rows=8)
  train.train(config, str(tmp_path / "run"), jax.devices()[:1])
  first = _logged(tmp_path / "run")[0]
  # Policy = reference at step 1 (one shared pass, bit for bit): every reward is 0, so the
  # reference point is 0 and each sample's utility σ(0) = ½.
  assert first["loss"] == 0.5 and first["implicit_acc"] == 0.5
  assert first["kto_reference_point"] == 0.0
  assert {"reward_desirable", "reward_undesirable", "policy_error"} <= set(first)

  # One batch, stepped on again and again: the liked images' rewards (reference error −
  # policy error) rise above the disliked ones', which KTO's gradient asks for.
  models = train.load_models(config)
  state, program = train.build_program(config, models, parallel.make_mesh(-1, 1,
                                                                          jax.devices()[:1]))
  host_batch = next(train.make_data_iterator(config, models))
  assert host_batch["pixels"].shape[1] == 1  # One image a row.
  assert set(host_batch["desirable"].tolist()) == {True, False}
  batch = program.step_input(host_batch)
  gaps = []
  for _ in range(4):
    state, metrics = program.step_fn(state, batch)
    gaps.append(float(metrics["reward_desirable"]) - float(metrics["reward_undesirable"]))
  assert gaps[0] == 0.0 and all(after > before for before, after in zip(gaps, gaps[1:])), gaps


def test_out_of_memory_in_the_first_step_is_one_line():
  """XLA's estimate can fit and the allocation still fail: RESOURCE_EXHAUSTED becomes a
  UserError with what to change; any other runtime error passes through unchanged."""
  import jax

  from dpo_jax import train
  from dpo_jax.errors import UserError
  with pytest.raises(UserError, match=r"does not fit in the device's memory: lower "
                     r"train.batch_pairs.*RESOURCE_EXHAUSTED: Out of memory allocating 99"):
    with train._out_of_memory_as_user_error():
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 99 bytes.")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    with train._out_of_memory_as_user_error():
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")
  message = train.out_of_memory_message(3 * 2**30, 2**30)
  assert "(3.0 GiB per device by XLA's estimate, 1.0 GiB available)" in message
