"""`data.train_files` -> the files it names: one string, a glob or a comma-separated list."""
import glob
import os

from dpo_jax.errors import UserError

_GLOB_CHARS = "*?["


def expand_files(spec: str | None, key: str = "data.train_files",
                 example: str = "DIR/*.parquet") -> list[str]:
  """Paths in the order given; each glob's matches sorted, so every host sees the same order.

  Row (and so pair) ids are positions in this order: hosts agree on them without talking.
  `example` is the glob the error messages suggest (e.g. 'pairs.jsonl' for data.format=jsonl).
  """
  entries = [entry.strip() for entry in (spec or "").split(",") if entry.strip()]
  if not entries:
    raise UserError(f"{key} is not set; pass --config.{key}={example} (a glob) or a "
                    "comma-separated list of files")
  paths = []
  for entry in entries:
    path = os.path.expanduser(entry)
    if any(char in path for char in _GLOB_CHARS):
      matches = sorted(glob.glob(path, recursive=True))
      if not matches:
        raise UserError(f"{key}: no file matches the glob {entry!r}; fix the pattern or the "
                        "folder it points at")
      paths.extend(matches)
    elif os.path.isfile(path):
      paths.append(path)
    else:
      raise UserError(f"{key}: {entry} is not a file; give existing files or a glob such as "
                      f"{example} via --config.{key}")
  return paths


def split_files(spec: str | None, split: str) -> str | None:
  """A Pick-a-Pic snapshot folder given as `spec` -> a glob of its `split` shards (the hub
  layout names them data/{split}-NNNNN-of-NNNNN.parquet); anything else unchanged."""
  if spec and os.path.isdir(os.path.expanduser(spec.strip())):
    return os.path.join(os.path.expanduser(spec.strip()), "**", f"{split}-*.parquet")
  return spec
