"""Command line: `python -m dpo_jax.main --config configs/NAME.py --workdir DIR`.

With no --config the embedded default runs: the CPU demo (dpo_jax/default_config.py).
"""
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax.errors import UserError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
_BAD_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _bad_flag_message(error: Exception, argv: list[str]) -> str:
  # config_flags reports an unknown key as a bare KeyError/AttributeError('key'): name the flag.
  missing = re.search(r"'([\w-]+)", str(error))
  culprit = next((a for a in argv[1:] if a.startswith("--config.") and missing
                  and missing.group(1) in a.split("=")[0]), None)
  if culprit:
    return (f"{culprit.split('=')[0][2:]} is not a config key (or its value has the wrong "
            "type); check the spelling against the config file")
  return f"{str(error).splitlines()[0]}; run with --help for the options"


def _define_flags():
  # config_flags applies --config.KEY overrides while defining the flag, so an unknown key
  # raises here, before absl's own parsing.
  try:
    config = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG,
        "A configs/*.py file; override keys with --config.SECTION.KEY=VALUE.")
  except _BAD_FLAG_ERRORS as error:
    _exit_with(_bad_flag_message(error, sys.argv))
  workdir = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config go.")
  return config, workdir


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except _BAD_FLAG_ERRORS as error:
    _exit_with(_bad_flag_message(error, argv))


def _train(config, workdir: str | None, argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected argument {argv[1]!r}; options are --config, --config.KEY=VALUE "
                    "and --workdir")
  config_file = flags.FLAGS["config"].config_filename.split(":")[0]
  if not os.path.isfile(config_file):
    raise UserError(f"config file {config_file} does not exist; pass --config configs/NAME.py")
  if not workdir:
    raise UserError("--workdir is required: the folder for checkpoints and metrics")
  from dpo_jax import config_checks, parallel, train  # After flag parsing: JAX is slow to load.
  config_checks.check_config(config)
  parallel.initialize_distributed(config)
  train.train(config, workdir)


def run() -> None:
  config, workdir = _define_flags()

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is noise to users.
    try:
      _train(config.value, workdir.value, argv)
    except UserError as error:
      _exit_with(str(error))

  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
