"""One caption table for a whole latent cache: the hosts' tables merged (format 2 -> 3).

Each host of a multi-host prepare dedupes the captions of its own share only, so a caption
whose pairs fall on k shares is stored k times (at 64 hosts from a shuffled source, most of
the table's saving is lost). `merge_caption_tables` runs once, on one machine, after every
share is complete: it reads the hosts' tables in share order, keeps the first entry of each
digest (`latent_cache.caption_digest`, the bits, as the hosts dedupe), and writes

  captions-merged.array_record   those entries, their bytes as the hosts stored them
  caption_entries.npy            for each entry of the hosts' tables, in share order, the
                                 position of its merged entry

then switches the cache to them by one atomic rewrite of cache.json (format 3), and only then
deletes the hosts' tables. Interrupted before the switch, the cache is the format 2 cache it
was (the new files are not read, and a rerun writes them again); after it, a rerun removes
the hosts' tables that are left. Pair records are not rewritten, so a merge reads every
caption entry once and writes the distinct ones: no pair is copied.
"""
import json
import os
import time

import numpy as np
import safetensors.numpy
from array_record.python import array_record_module

from dpo_jax.data import latent_cache
from dpo_jax.errors import UserError

_READ_CHUNK = 256  # Entries per read: sequential reads in chunks, a few tens of MB each.


def _entries(table: str):
  """Each entry's bytes of one host's table, in order."""
  reader = array_record_module.ArrayRecordReader(table)
  try:
    total = reader.num_records()
    for begin in range(0, total, _READ_CHUNK):
      yield from reader.read(begin, min(begin + _READ_CHUNK, total))
  finally:
    reader.close()


def _write_durably(path: str, write) -> None:
  """`write(temporary path)`, then the file renamed to `path` once on disk, and the rename
  itself made durable."""
  temporary = f"{path}.partial"  # As export and label name a file not yet in place.
  write(temporary)
  with open(temporary, "rb") as f:
    os.fsync(f.fileno())
  os.replace(temporary, path)
  folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def _remove_host_tables(folder: str, count: int) -> int:
  removed = 0
  for index in range(count):
    path = latent_cache.captions_path(folder, index, count)
    if os.path.exists(path):
      os.remove(path)
      removed += 1
  return removed


def _merged_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(folder, name))
             for name in (latent_cache.MERGED_CAPTIONS, latent_cache.CAPTION_ENTRIES))


def merge_caption_tables(folder: str) -> dict:
  """Merges a complete cache's caption tables into one (see the module docstring).

  Returns {"host_entries", "merged_entries", "bytes_before", "bytes_after", "seconds",
  "removed_tables", "already_merged"}. An incomplete cache or an unknown format is refused
  by `latent_cache.read_metadata` with one line.
  """
  started = time.perf_counter()
  metadata = latent_cache.read_metadata(folder)
  count = metadata["num_shards"]
  host_entries = sum(metadata["shard_captions"])
  if metadata["format_version"] == latent_cache.MERGED_FORMAT_VERSION:
    removed = _remove_host_tables(folder, count)  # Left by a merge stopped after its switch.
    return {"host_entries": host_entries,
            "merged_entries": metadata["merged_captions"]["entries"],
            "bytes_before": None, "bytes_after": _merged_bytes(folder),
            "seconds": time.perf_counter() - started, "removed_tables": removed,
            "already_merged": True}

  tables = metadata["caption_tables"]
  bytes_before = sum(os.path.getsize(table) for table in tables)
  positions: dict[bytes, int] = {}  # caption_digest -> position in the merged table.
  merged_entries = np.empty(host_entries, np.int32)

  def write_table(path: str) -> None:
    writer = array_record_module.ArrayRecordWriter(path, latent_cache.WRITER_OPTIONS)
    entry = 0
    for table, expected in zip(tables, metadata["shard_captions"]):
      read = 0
      for record in _entries(table):
        key = latent_cache.caption_digest(safetensors.numpy.load(record))
        if key not in positions:
          positions[key] = len(positions)
          writer.write(record)
        merged_entries[entry] = positions[key]
        entry, read = entry + 1, read + 1
      if read != expected:  # The share's summary and its table disagree: not a cache to trust.
        writer.close()
        raise UserError(f"{table} holds {read} caption entries, its share's summary says "
                        f"{expected}; prepare the cache again (--overwrite)")
    writer.close()

  def write_entries(path: str) -> None:
    with open(path, "wb") as f:  # A file object: np.save would add .npy to a path.
      np.save(f, merged_entries)

  _write_durably(os.path.join(folder, latent_cache.MERGED_CAPTIONS), write_table)
  _write_durably(os.path.join(folder, latent_cache.CAPTION_ENTRIES), write_entries)
  with open(os.path.join(folder, latent_cache.METADATA)) as f:
    stored = json.load(f)
  stored.update(format_version=latent_cache.MERGED_FORMAT_VERSION,
                merged_captions={"host_entries": host_entries, "entries": len(positions)})

  def write_metadata(path: str) -> None:
    with open(path, "w") as f:
      json.dump(stored, f, indent=2)

  _write_durably(os.path.join(folder, latent_cache.METADATA), write_metadata)  # The switch.
  removed = _remove_host_tables(folder, count)
  return {"host_entries": host_entries, "merged_entries": len(positions),
          "bytes_before": bytes_before, "bytes_after": _merged_bytes(folder),
          "seconds": time.perf_counter() - started, "removed_tables": removed,
          "already_merged": False}
