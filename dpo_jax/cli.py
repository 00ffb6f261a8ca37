"""What the commands (main, prepare, export) share: every user mistake as one line with exit
status 2, and for the config-driven ones the --config flag with its --config.SECTION.KEY
overrides.

Flags are defined when a command runs, not when its module is imported, because
config_flags applies the overrides in sys.argv at definition time.
"""
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax.errors import UserError

# The embedded default: the CPU demo of the checkout the package runs from.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "demo.py")
_BAD_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def exit_with(message: str) -> None:
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


def define_config_flag() -> flags.FlagHolder:
  """--config (default: the embedded CPU demo), exiting with one line on a bad override."""
  # config_flags applies --config.KEY overrides while defining the flag, so an unknown key
  # raises here, before absl's own parsing.
  try:
    return config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG,
        "A configs/*.py file; override keys with --config.SECTION.KEY=VALUE.")
  except _BAD_FLAG_ERRORS as error:
    exit_with(_bad_flag_message(error, sys.argv))


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except _BAD_FLAG_ERRORS as error:
    exit_with(_bad_flag_message(error, argv))


def check_arguments(argv: list[str], options: str) -> None:
  """UserError for a positional argument or a --config file that does not exist."""
  if len(argv) > 1:
    raise UserError(f"unexpected argument {argv[1]!r}; options are {options}")
  config_file = flags.FLAGS["config"].config_filename.split(":")[0]
  if not os.path.isfile(config_file):
    raise UserError(f"config file {config_file} does not exist; pass --config configs/NAME.py")


def run(command: Callable[[list[str]], None]) -> None:
  """Runs `command(argv)` as an absl app; a UserError it raises becomes one line, exit 2."""

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is noise to users.
    try:
      command(argv)
    except UserError as error:
      exit_with(str(error))

  app.run(main, flags_parser=_parse_flags)
