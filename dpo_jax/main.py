"""Command line: `python -m dpo_jax.main --config configs/NAME.py --workdir DIR`.

With no --config the embedded default runs: the CPU demo (configs/demo.py).
"""
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError


def run() -> None:
  config = cli.define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config go.")

  def train(argv):
    cli.check_arguments(argv, "--config, --config.KEY=VALUE and --workdir")
    if not workdir.value:
      raise UserError("--workdir is required: the folder for checkpoints and metrics")
    from dpo_jax import config_checks, parallel, train as train_lib  # JAX is slow to load.
    config_checks.check_config(config.value)
    config_checks.check_pipeline_for_data(config.value)
    parallel.initialize_distributed(config.value)
    train_lib.train(config.value, workdir.value)

  cli.run(train)


if __name__ == "__main__":
  run()
