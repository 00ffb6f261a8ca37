"""One caption table for a latent cache written by several hosts.

  python -m dpo_jax.tools.merge_captions --cache_dir /data/cache/sdxl

Run once, on one machine that sees the whole cache folder, after every host's share of
`python -m dpo_jax.prepare` is complete, and while no run reads the cache. Each host stored
the distinct captions of its own share; the merge keeps each distinct encoding once over all
shares and deletes the hosts' tables (`dpo_jax.data.caption_merge`). Pairs read the same bits
after it, so a run started before the merge resumes after it. Safe to interrupt: run it again.
"""
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError


def _gib(size: int) -> str:
  return f"{size / 2**30:.2f} GiB"


def run() -> None:
  cache_dir = flags.DEFINE_string("cache_dir", None, "The latent cache folder to merge.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; the only option is --cache_dir")
    if not cache_dir.value:
      raise UserError("--cache_dir is required: the latent cache folder that prepare wrote")
    from dpo_jax.data import caption_merge
    report = caption_merge.merge_caption_tables(cache_dir.value)
    if report["already_merged"]:
      print(f"{cache_dir.value}: caption tables already merged ({report['merged_entries']} "
            f"entries, {_gib(report['bytes_after'])}); removed {report['removed_tables']} "
            "hosts' tables left by an interrupted merge")
      return
    print(f"{cache_dir.value}: {report['host_entries']} caption entries in the hosts' tables "
          f"({_gib(report['bytes_before'])}) merged into {report['merged_entries']} "
          f"({_gib(report['bytes_after'])}) in {report['seconds']:.0f} s")

  cli.run(command)


if __name__ == "__main__":
  run()
