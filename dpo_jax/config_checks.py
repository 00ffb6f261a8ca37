"""Validation of a run's config before anything is built or compiled.

Each check raises UserError with one line naming the key, the bad value and the fix.
"""
import ml_collections

from dpo_jax.errors import UserError

_CHOICES = {
    ("data", "format"): ("synthetic", "pickapic", "jsonl", "unpaired", "tfds", "sampled"),
    ("data", "sdxl_time_ids"): ("constant", "actual"),
    ("dpo", "loss"): ("dpo", "sft", "hinge", "ipo", "mapo", "kto"),
    ("dpo", "reference_pass"): ("shared", "separate"),
    ("dpo", "reference"): ("live", "precomputed"),
    ("optim", "name"): ("adamw", "adafactor"),
    ("optim", "adafactor_factoring"): ("transformers", "optax"),
    ("optim", "schedule"): ("constant", "linear", "cosine"),
    ("model", "compute_dtype"): ("float32", "bfloat16"),
    ("model", "reference_dtype"): ("float32", "bfloat16"),
    ("model", "vae_dtype"): ("float32", "bfloat16"),
    ("model", "text_encoder_dtype"): ("float32", "bfloat16"),
    ("model", "attention_implementation"): (None, "xla", "cudnn", "blocked"),
    ("model", "remat_policy"): ("full", "dots"),
}
_POSITIVE = (("dpo", "beta"), ("dpo", "mapo_beta"), ("dpo", "mapo_snr"), ("dpo", "kto_beta"),
             ("dpo", "kto_lambda_desirable"), ("dpo", "kto_lambda_undesirable"),
             ("train", "steps"), ("train", "batch_pairs"), ("train", "grad_accum"),
             ("train", "log_every"), ("train", "ckpt_every"), ("train", "max_bad_steps"),
             ("data", "resolution"))


def check_config(config: ml_collections.ConfigDict) -> None:
  for (section, key), allowed in _CHOICES.items():
    value = config[section][key]
    if value not in allowed:
      raise UserError(f"{section}.{key}={value!r} is not supported; use one of "
                      f"{', '.join(allowed)}")
  for section, key in _POSITIVE:
    value = config[section][key]
    if not value > 0:
      raise UserError(f"{section}.{key} must be > 0, got {value}; set --config.{section}.{key}")
  if config.optim.peak_lr is not None and config.optim.peak_lr < 0:
    raise UserError(f"optim.peak_lr must be >= 0, got {config.optim.peak_lr}")
  if config.dpo.loss in ("mapo", "kto") and config.optim.peak_lr is None:
    # The recipe's 2000/β factor is DPO's β, which MaPO and KTO do not use.
    raise UserError(f"dpo.loss={config.dpo.loss!r} has no learning-rate recipe; set "
                    "--config.optim.peak_lr (docs/losses.md gives the official values)")
  if not 0 <= config.data.max_bad_fraction <= 1:
    raise UserError(f"data.max_bad_fraction must be in [0, 1], got "
                    f"{config.data.max_bad_fraction}; set --config.data.max_bad_fraction")
  if config.data.max_train_pairs is not None and config.data.max_train_pairs < 1:
    raise UserError(f"data.max_train_pairs must be >= 1, got {config.data.max_train_pairs}; "
                    "set --config.data.max_train_pairs or leave it unset for all pairs")
  _check_shuffle_window(config.data.get("shuffle_window_groups"))
  for key in ("noise_offset", "input_perturbation"):
    if not config.diffusion[key] >= 0:
      raise UserError(f"diffusion.{key} must be >= 0, got {config.diffusion[key]}")
  timesteps(config)
  profile_window(config)
  _check_reference(config)
  _check_unpaired(config)
  from dpo_jax import lora, validation  # Their own keys' rules live with them.
  validation.check(config)
  lora.check(config)
  if config.data.resolution % 8:
    raise UserError(f"data.resolution={config.data.resolution} must be a multiple of 8 (the "
                    "VAE downsamples by 8)")
  if config.data.format == "sampled":
    from dpo_jax import sampled_pairs
    sampled_pairs.check(config)
  # Caught here, before minutes of model loading: the real-run configs leave it unset on purpose.
  if not config.data.get("cache_dir"):  # A latent cache names the data it was made from.
    _check_data_source(config)


def check_pipeline_for_data(config: ml_collections.ConfigDict) -> None:
  """Data other than synthetic latents needs the pipeline whose encoders made or make its
  UNet inputs ('sampled' data checks its own keys). Not in `check_config`: the benchmark
  and the memory tool feed made-up latent-cache batches to a UNet built from its config."""
  if config.model.pretrained:
    return
  if config.data.get("cache_dir"):
    raise UserError("data.cache_dir needs model.pretrained: the diffusers pipeline the cache "
                    "was prepared with")
  if config.data.format not in ("synthetic", "sampled"):
    raise UserError(f"data.format={config.data.format!r} needs model.pretrained: a diffusers "
                    "pipeline whose VAE and text encoders turn images and captions into UNet "
                    "inputs")


# Losses whose step runs no reference model: SFT, and the reference-free ones.
_REFERENCE_FREE_LOSSES = ("sft", "mapo")


def _check_shuffle_window(window) -> None:
  # bool is an int to Python, and True would read as a window of one group.
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 0):
    raise UserError(f"data.shuffle_window_groups must be a whole number of row groups >= 0 "
                    f"(0: shuffle all pairs at once), got {window!r}; set "
                    "--config.data.shuffle_window_groups")


def uses_reference(config: ml_collections.ConfigDict) -> bool:
  """Whether `dpo.loss` compares against the frozen reference's errors."""
  return config.dpo.loss not in _REFERENCE_FREE_LOSSES


def runs_reference(config: ml_collections.ConfigDict) -> bool:
  """Whether the train step runs the reference model (and so holds its weights)."""
  return uses_reference(config) and config.dpo.reference == "live"


def _check_reference(config: ml_collections.ConfigDict) -> None:
  if config.dpo.reference != "precomputed":
    return
  if not uses_reference(config):
    raise UserError(f"dpo.reference='precomputed' but dpo.loss={config.dpo.loss!r} uses no "
                    "reference model; leave dpo.reference at 'live'")
  if not config.dpo.get("reference_errors"):
    raise UserError("dpo.reference='precomputed' needs dpo.reference_errors: the folder "
                    "`python -m dpo_jax.reference_errors --config ... --output DIR` wrote")


def is_unpaired(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains on unpaired likes and dislikes (KTO) rather than on pairs."""
  return config.data.format == "unpaired"


def images_per_example(config: ml_collections.ConfigDict) -> int:
  """How many images of each batch row the step runs the UNet on: a pair's two, or one for
  SFT (the winner) and for unpaired data (the row's only image)."""
  return 1 if config.dpo.loss == "sft" or is_unpaired(config) else 2


def _check_unpaired(config: ml_collections.ConfigDict) -> None:
  if not is_unpaired(config):
    return
  if config.dpo.loss != "kto":
    raise UserError(f"data.format='unpaired' holds single liked/disliked images, which only "
                    f"dpo.loss='kto' trains on (got {config.dpo.loss!r}); set "
                    "--config.dpo.loss=kto, or give pairs (data.format='jsonl')")
  if config.dpo.reference != "live":
    raise UserError("dpo.reference='precomputed' stores errors for pairs; data.format="
                    "'unpaired' runs the reference live: leave dpo.reference at 'live'")
  if config.data.get("cache_dir"):
    raise UserError("the latent cache holds pairs; data.format='unpaired' reads its images: "
                    "unset data.cache_dir")


def _check_data_source(config: ml_collections.ConfigDict) -> None:
  if config.data.format == "tfds" and not config.data.tfds_name:
    raise UserError("data.tfds_name is not set; data.format='tfds' needs a TFDS dataset: pass "
                    "--config.data.tfds_name=NAME (with --config.data.tfds_data_dir=DIR) or "
                    "a prepared version folder")
  if config.data.format in ("pickapic", "jsonl", "unpaired") and not config.data.train_files:
    example = {"pickapic": "DIR/*.parquet", "jsonl": "pairs.jsonl",
               "unpaired": "likes.jsonl"}[config.data.format]
    raise UserError(f"data.train_files is not set; data.format='{config.data.format}' needs "
                    f"its files: pass --config.data.train_files='{example}'")


def timesteps(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
  """`diffusion.timesteps` as a tuple of ints, or None when unset."""
  text = config.diffusion.timesteps
  if not text:
    return None
  try:
    values = tuple(int(value) for value in str(text).split(","))
  except ValueError:
    raise UserError(f"diffusion.timesteps={text!r} must be comma-separated integers, e.g. "
                    "'249,499,749,999'") from None
  if min(values) < 0:
    raise UserError(f"diffusion.timesteps={text!r} holds a negative timestep")
  return values


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """train.profile_steps 'A,B' -> (A, B), 1 <= A <= B <= train.steps; unset -> None."""
  text = config.train.get("profile_steps")
  if not text:
    return None
  try:
    first, last = (int(part) for part in str(text).split(","))
  except ValueError:
    raise UserError(f"train.profile_steps={text!r}: write two step numbers 'A,B', e.g. "
                    "'10,15'") from None
  if not 1 <= first <= last <= config.train.steps:
    raise UserError(f"train.profile_steps={text!r}: need 1 <= A <= B <= train.steps "
                    f"({config.train.steps})")
  return first, last
