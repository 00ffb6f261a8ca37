"""configs/*.py: every config is valid and carries the paper's recipe, the command line can
override it, and the README and docs/architecture.md name only keys and modules that exist."""
import glob
import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

import subprocesses
from dpo_jax import config_checks, optim
from dpo_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
REAL_RUNS = ("sd15", "sd21", "sdxl")


def _load(name_or_path: str):
  """A config file's get_config(), imported by path as config_flags does."""
  path = name_or_path if name_or_path.endswith(".py") else os.path.join(REPO, "configs",
                                                                         f"{name_or_path}.py")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_an_unknown_remat_policy_is_refused_with_the_choices():
  config = _load("demo")
  config.model.remat_policy = "dots_saveable"
  with pytest.raises(UserError, match=r"model.remat_policy='dots_saveable' .* full, dots$"):
    config_checks.check_config(config)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_passes_checks_once_given_its_data(path):
  config = _load(path)
  if config.data.format == "pickapic":
    with pytest.raises(UserError, match="data.train_files") as error:
      config_checks.check_config(config)
    assert len(str(error.value).splitlines()) == 1
    config.data.train_files = "pickapic_v2/train-*.parquet"
  config_checks.check_config(config)


def test_real_run_configs_exist():
  assert {os.path.basename(p)[:-3] for p in CONFIGS} >= set(REAL_RUNS)


@pytest.mark.parametrize("name, pretrained, resolution, beta, optimizer, remat, fsdp", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 2000.0, "adamw", False, 1),
    ("sd21", "stabilityai/stable-diffusion-2-1", 768, 2000.0, "adamw", False, 1),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 5000.0, "adafactor", True, 8),
])
def test_real_run_configs_carry_the_paper_recipe(name, pretrained, resolution, beta, optimizer,
                                                 remat, fsdp):
  config = _load(name)
  assert (config.model.pretrained, config.data.resolution, config.dpo.beta, config.optim.name,
          config.model.remat, config.mesh.fsdp) == (pretrained, resolution, beta, optimizer,
                                                    remat, fsdp)
  # Paper §5.1 and the official launchers: 2048 pairs × 2000 steps, 25% warmup, 1e-8 per pair.
  assert (config.train.batch_pairs, config.train.steps, config.optim.warmup_steps) == (
      2048, 2000, 500)
  assert config.optim.lr_per_pair == 1e-8 and config.optim.peak_lr is None
  assert config.train.batch_pairs % config.train.grad_accum == 0
  assert (config.data.format, config.data.train_files) == ("pickapic", None)
  assert (config.data.empty_prompt_prob, config.data.random_flip, config.data.random_crop) == (
      0.2, True, False)
  assert (config.model.compute_dtype, config.model.reference_dtype) == ("bfloat16", "bfloat16")
  assert config.model.attention_implementation is None and config.mesh.data == -1


@pytest.mark.parametrize("name, expected", [
    ("sd15", 2.048e-5),  # 1e-8 × 2048 × 2000/2000
    ("sd21", 2.048e-5),
    ("sdxl", 8.192e-6),  # 1e-8 × 2048 × 2000/5000
])
def test_peak_lr_is_derived_from_the_paper_recipe(name, expected):
  assert optim.peak_learning_rate(_load(name)) == pytest.approx(expected, rel=1e-12)


def _parse(argv):
  """argv through config_flags, the parser dpo_jax.main uses."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", REAL_RUNS)
def test_command_line_sets_the_optional_keys(name):
  config = _parse(["main", f"--config={REPO}/configs/{name}.py", "--config.optim.peak_lr=1e-6",
                   "--config.data.train_files=a/*.parquet,b.parquet",
                   "--config.model.pretrained=/models/local",
                   "--config.model.attention_implementation=cudnn",
                   "--config.model.vae=/models/vae", "--config.model.unet_init=/models/sft",
                   "--config.model.revision=v1", "--config.data.max_train_pairs=1000",
                   "--config.diffusion.timesteps=249,499,749,999"])
  assert optim.peak_learning_rate(config) == 1e-6
  assert config.data.train_files == "a/*.parquet,b.parquet"
  assert config.model.pretrained == "/models/local"
  assert config.model.attention_implementation == "cudnn"
  assert (config.model.vae, config.model.unet_init, config.model.revision) == (
      "/models/vae", "/models/sft", "v1")
  assert config.data.max_train_pairs == 1000
  assert config_checks.timesteps(config) == (249, 499, 749, 999)
  config_checks.check_config(config)


def test_cli_without_train_files_exits_2_before_loading_anything(tmp_path):
  workdir = tmp_path / "run"
  # A pretrained path that does not exist: had the models been loaded first, the error would
  # name it instead; and train() creates the workdir first thing, so it must not exist.
  result = subprocesses.run_module("dpo_jax.main", "--config=configs/sd15.py",
                                   f"--workdir={workdir}",
                                   "--config.model.pretrained=/nonexistent/pipeline", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "data.train_files" in lines[0], result.stderr[-2000:]
  assert not workdir.exists()


def test_readme_names_only_config_keys_that_exist():
  """Every `section.key` the README cites (the official-flags table among them) is a key of
  the default config, so the docs cannot drift from the code."""
  import re
  from dpo_jax import default_config
  config = default_config.get_config()
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  cited = set(re.findall(r"`(?:--config\.)?((?:model|data|train|mesh|distributed|diffusion|dpo|"
                         r"optim)\.[a-z_0-9]+)(?:=[^`]*)?`", readme))
  cited = {key for key in cited if not key.endswith(".py")}  # train.py is a file.
  assert len(cited) > 40
  missing = sorted(key for key in cited if key.split(".")[1] not in config[key.split(".")[0]])
  assert not missing, missing


def test_architecture_doc_names_only_modules_that_exist():
  import re
  with open(os.path.join(REPO, "docs", "architecture.md")) as f:
    text = f.read()
  paths = set(re.findall(r"((?:dpo_jax|configs|launch)/[\w/]*(?:\.py)?)", text))
  named = set(re.findall(r"(?:models|data)/\w+\.py", text))
  assert len(paths) > 20
  missing = sorted(p for p in paths | {f"dpo_jax/{p}" for p in named}
                   if not os.path.exists(os.path.join(REPO, p.rstrip("/"))))
  assert not missing, missing
  from dpo_jax import default_config
  config = default_config.get_config()
  for module, name in re.findall(r"`(\w+)\.(\w+)`", text):  # A function, or a config key.
    path = os.path.join(REPO, "dpo_jax", f"{module}.py")
    if module in config and name in config[module]:
      continue
    with open(path) as f:
      assert f"def {name}" in f.read(), f"{module}.{name}"


def _flat(config) -> dict:
  """{'section.key': value} of a config."""
  return {f"{section}.{key}": value for section, fields in config.to_dict().items()
          for key, value in fields.items()}


def test_real_runs_share_one_recipe():
  """sd15, sd21 and sdxl come from `recipes.pickapic_dpo`: they differ in its arguments only
  (a paragraph copied into one config and edited there would show up here)."""
  sd15, sd21, sdxl = (_flat(_load(name)) for name in REAL_RUNS)
  arguments = {"model.pretrained", "data.resolution", "dpo.beta", "optim.name", "model.remat",
               "mesh.fsdp"}
  assert {k for k in sd15 if sd15[k] != sdxl[k]} == arguments
  assert {k for k in sd15 if sd15[k] != sd21[k]} == {"model.pretrained", "data.resolution"}


def test_base_is_neutral_and_the_demo_is_the_embedded_default():
  from dpo_jax import cli, default_config
  base = default_config.get_config()
  assert base.optim.peak_lr is None and not base.model.unet  # The recipe's lr, no model.
  assert base.data.format == "pickapic"
  assert os.path.samefile(cli._DEFAULT_CONFIG, os.path.join(REPO, "configs", "demo.py"))
  demo = _load("demo")
  # The demo starts from the shipped base model, draws its own pairs and reports at the end.
  from dpo_jax import demo as demo_lib
  assert demo.model.pretrained == demo_lib.BASE_MODEL
  assert os.path.isfile(os.path.join(demo.model.pretrained, "model_index.json"))
  assert demo.data.format == "sampled" and demo.data.sampled.judge == "centred"
  assert demo.eval.report and demo.eval.scorers == "centred"
  assert demo.eval.prompts == demo.data.sampled.heldout_prompts != demo.data.sampled.prompts
  synthetic = _load("synthetic")
  assert synthetic.data.format == "synthetic" and synthetic.model.unet
  assert synthetic.model.pretrained is None
