"""Latent cache size: the caption table (format 2) against a context in every pair (format 1).

Writes a synthetic cache with `latent_cache.ShardWriter`, as `python -m dpo_jax.prepare` does,
at the real shapes in float16 (prepare's default --dtype): SD1.5 at 512 (`latent_mean`,
`latent_logvar` [2, 64, 64, 4], `context` [77, 768]) or SDXL at 1024 ([2, 128, 128, 4],
[77, 2048], `pooled` [1280]). Its pairs repeat captions as Pick-a-Pic's do. It also writes
the same pairs in format 1's layout (one record a pair, its context inside, the same
ArrayRecord options), measures both folders' files, checks that the format 2 cache reads
back format 1's records, and prints bytes per pair for each.

Repetition. Pick-a-Pic v2's train split has 959,040 rows (its Hugging Face dataset card);
its distinct captions are assumed to be ~58,000 (a figure given with the task, not checked
here; v1's paper gives over 500,000 examples of 35,000 distinct prompts, a similar ratio).
On one host the size depends on that ratio alone: bytes = pairs x pair record + distinct
captions x caption record. Each host dedupes only its own share, so with several hosts it
also depends on how the captions spread over the shares: for `--hosts`, the script counts
the distinct captions per contiguous share of a full-size Pick-a-Pic order (no bytes
written) and prints the bytes per pair they imply from the measured record sizes, for
pairs in random order (captions spread over every share) and grouped by caption (each
caption's pairs together). Pairs per caption are drawn as 1 + a multinomial share with
log-normal weights (sigma `--spread`), an assumption: the real counts were not available.

With `--merge_shares 8,64`, the pairs (random order) are also written as that many hosts'
shares, each with its own caption table, as a multi-host prepare writes them; then
`caption_merge.merge_caption_tables` (`python -m dpo_jax.tools.merge_captions`) merges the
tables, and the script prints the tables' bytes before and after, the merge's time and read
rate, and checks that 50 pairs read the same bits after the merge as before.

  python benchmarks/cache_size.py [--model sd15|sdxl] [--pairs 2000] [--hosts 1,8,64]
                                  [--merge_shares 8,64]
"""
import os
import platform
import sys
import tempfile
import time

import numpy as np
import safetensors.numpy
from absl import app, flags
from array_record.python import array_record_module

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpo_jax.data import caption_merge, latent_cache  # noqa: E402

PICKAPIC_V2_PAIRS = 959_040  # Train split rows, Hugging Face dataset card.
PICKAPIC_V2_CAPTIONS = 58_000  # Assumed (see the docstring).
# (latent side, context width, pooled width) of each pipeline at its native resolution.
MODELS = {"sd15": (64, 768, None), "sdxl": (128, 2048, 1280)}
TEXT_TOKENS, LATENT_CHANNELS = 77, 4

_MODEL = flags.DEFINE_enum("model", "sd15", list(MODELS), "Shapes of the cache.")
_PAIRS = flags.DEFINE_integer("pairs", 2000, "Pairs written (both layouts are written).")
_HOSTS = flags.DEFINE_list("hosts", ["1", "8", "64"], "Host counts for the per-share counts.")
_SPREAD = flags.DEFINE_float("spread", 1.0, "Sigma of the log-normal pairs-per-caption weights.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_MERGE_SHARES = flags.DEFINE_list("merge_shares", [], "Host counts to write and then merge.")


def pairs_per_caption(pairs: int, captions: int, spread: float,
                      rng: np.random.Generator) -> np.ndarray:
  """[captions] counts summing to `pairs`, each at least 1, with a log-normal tail."""
  weights = rng.lognormal(0.0, spread, captions)
  return 1 + rng.multinomial(pairs - captions, weights / weights.sum())


def caption_order(counts: np.ndarray, rng: np.random.Generator, grouped: bool) -> np.ndarray:
  """Each pair's caption id, in pair order: shuffled, or each caption's pairs together."""
  order = np.repeat(np.arange(len(counts)), counts)
  return order if grouped else rng.permutation(order)


def entries_per_share(order: np.ndarray, hosts: int) -> int:
  """Caption table entries over all hosts: each contiguous share stores its distinct captions."""
  return sum(len(np.unique(share)) for share in np.array_split(order, hosts))


def synthetic_pair(rng: np.random.Generator, side: int, pair_id: int) -> dict[str, np.ndarray]:
  latents = (2, side, side, LATENT_CHANNELS)
  return {"latent_mean": rng.standard_normal(latents, np.float32).astype(np.float16),
          "latent_logvar": rng.standard_normal(latents, np.float32).astype(np.float16),
          "original_size": np.full((2, 2), side * 8, np.int32),
          "crop_top_left": np.zeros((2, 2), np.int32),
          "pair_ids": np.asarray(pair_id, np.int32)}


def synthetic_caption(rng: np.random.Generator, width: int, pooled: int | None) -> dict:
  caption = {"context": rng.standard_normal((TEXT_TOKENS, width), np.float32).astype(np.float16)}
  if pooled:
    caption["pooled"] = rng.standard_normal((pooled,), np.float32).astype(np.float16)
  return caption


def write_both(folder: str, order: np.ndarray, model: str, rng: np.random.Generator) -> dict:
  """Format 2 in folder/table, format 1's layout in folder/per_pair; their sizes in bytes."""
  side, width, pooled = MODELS[model]
  captions = [synthetic_caption(rng, width, pooled) for _ in range(order.max() + 1)]
  table, per_pair = os.path.join(folder, "table"), os.path.join(folder, "per_pair")
  os.makedirs(table)
  os.makedirs(per_pair)
  latent_cache.write_metadata(table, {
      "kind": model, "resolution": side * 8, "dtype": "float16", "num_shards": 1,
      "pretrained": "synthetic", "fingerprint": "synthetic", "source": "synthetic",
      "skipped_at_start": {}}, captions[0])
  writer = latent_cache.ShardWriter(table, 0, 1)
  old = array_record_module.ArrayRecordWriter(os.path.join(per_pair, "pairs.array_record"),
                                              latent_cache.WRITER_OPTIONS)
  for pair_id, caption in enumerate(order):
    pair = {**synthetic_pair(rng, side, pair_id), **captions[caption]}
    writer.write(pair)
    old.write(safetensors.numpy.save(pair))
  writer.close({"kept": len(order)})
  old.close()
  check_reads_back(table, os.path.join(per_pair, "pairs.array_record"), rng)
  return {"pairs": os.path.getsize(latent_cache.shard_path(table, 0, 1)),
          "captions": os.path.getsize(latent_cache.captions_path(table, 0, 1)),
          "entries": writer.captions,
          "per_pair": os.path.getsize(os.path.join(per_pair, "pairs.array_record"))}


def write_shares_then_merge(folder: str, order: np.ndarray, model: str, shares: int,
                           rng: np.random.Generator) -> dict:
  """The pairs as `shares` hosts' contiguous shares, each with its own caption table; then
  the tables merged. Bytes of the tables before and after, and the merge's report."""
  side, width, pooled = MODELS[model]
  captions = [synthetic_caption(rng, width, pooled) for _ in range(order.max() + 1)]
  latent_cache.write_metadata(folder, {
      "kind": model, "resolution": side * 8, "dtype": "float16", "num_shards": shares,
      "pretrained": "synthetic", "fingerprint": "synthetic", "source": "synthetic",
      "skipped_at_start": {}}, captions[0])
  pair_id = 0
  for index, share in enumerate(np.array_split(order, shares)):
    writer = latent_cache.ShardWriter(folder, index, shares)
    for caption in share:
      writer.write({**synthetic_pair(rng, side, pair_id), **captions[caption]})
      pair_id += 1
    writer.close({"kept": len(share)})
  source = latent_cache.LatentCacheSource(folder)
  sample = [int(p) for p in rng.choice(len(source), min(50, len(source)), replace=False)]
  before = [source[p] for p in sample]
  report = caption_merge.merge_caption_tables(folder)
  source = latent_cache.LatentCacheSource(folder)
  for position, want in zip(sample, before):
    got = source[position]
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())
  return report


def check_reads_back(table: str, per_pair: str, rng: np.random.Generator, count: int = 50):
  """Pairs read from the table layout equal format 1's records, bit for bit."""
  source = latent_cache.LatentCacheSource(table)
  reader = array_record_module.ArrayRecordReader(per_pair)
  for position in rng.choice(len(source), min(count, len(source)), replace=False):
    want = safetensors.numpy.load(reader.read([int(position)])[0])
    got = source[int(position)]
    assert want.keys() == got.keys(), (want.keys(), got.keys())
    for name in want:
      assert want[name].dtype == got[name].dtype and np.array_equal(want[name], got[name]), name
  reader.close()


def machine() -> str:
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return f"{names[0] if names else platform.processor()}, {os.cpu_count()} logical CPUs"


def main(argv):
  del argv
  print(f"CPU: {machine()}; numpy {np.__version__}")
  rng = np.random.default_rng(_SEED.value)
  model, pairs = _MODEL.value, _PAIRS.value
  captions = max(1, round(pairs * PICKAPIC_V2_CAPTIONS / PICKAPIC_V2_PAIRS))
  counts = pairs_per_caption(pairs, captions, _SPREAD.value, rng)
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    sizes = write_both(folder, caption_order(counts, rng, grouped=False), model, rng)
    seconds = time.perf_counter() - start
  entries = sizes["entries"]
  pair_record, caption_record = sizes["pairs"] / pairs, sizes["captions"] / entries
  before, after = sizes["per_pair"] / pairs, (sizes["pairs"] + sizes["captions"]) / pairs
  print(f"{model} float16: {pairs} pairs over {entries} captions (Pick-a-Pic v2's assumed "
        f"{PICKAPIC_V2_PAIRS / PICKAPIC_V2_CAPTIONS:.1f} pairs a caption), written in "
        f"{seconds:.0f}s; read back equal to format 1's records")
  print(f"measured, one host: a pair record {pair_record / 1024:.1f} KiB, a caption entry "
        f"{caption_record / 1024:.1f} KiB")
  print(f"| layout | bytes per pair (KiB) | Pick-a-Pic v2, {PICKAPIC_V2_PAIRS:,} pairs (GiB) |")
  print("| --- | --- | --- |")
  for name, size in (("format 1: context in every pair", before),
                     ("format 2: caption table, one host", after)):
    print(f"| {name} | {size / 1024:.1f} | {size * PICKAPIC_V2_PAIRS / 2**30:.0f} |")
  print(f"factor: {before / after:.2f}x smaller")

  # Full size, counted not written: entries over all hosts' tables, from the measured records.
  full = pairs_per_caption(PICKAPIC_V2_PAIRS, PICKAPIC_V2_CAPTIONS, _SPREAD.value, rng)
  print(f"\nfull size, {PICKAPIC_V2_PAIRS:,} pairs over {PICKAPIC_V2_CAPTIONS:,} captions "
        f"(pairs per caption: median {np.median(full):.0f}, max {full.max()}; spread "
        f"{_SPREAD.value}): computed from the measured record sizes, not written")
  print("| hosts | order | caption entries | bytes per pair (KiB) | factor |")
  print("| --- | --- | --- | --- | --- |")
  for hosts in (int(h) for h in _HOSTS.value):
    totals = {}
    for grouped in (False, True):
      total = totals[grouped] = entries_per_share(caption_order(full, rng, grouped), hosts)
      size = pair_record + caption_record * total / PICKAPIC_V2_PAIRS
      print(f"| {hosts} | {'grouped by caption' if grouped else 'random'} | {total:,} | "
            f"{size / 1024:.1f} | {before / size:.2f}x |")
    # Merged: one entry a distinct caption, and the map's 4 B for each of the hosts' entries
    # (random order's, the most).
    size = pair_record + (caption_record * len(full) + 4 * totals[False]) / PICKAPIC_V2_PAIRS
    print(f"| {hosts} | either, then merged | {len(full):,} | {size / 1024:.1f} | "
          f"{before / size:.2f}x |")

  if _MERGE_SHARES.value:
    print(f"\nmerged, {pairs} pairs written (random order) as each host count's shares, then "
          "their caption tables merged; 50 pairs read the same bits after")
    print("| hosts | entries: hosts' tables -> merged | tables' bytes: before -> after (MiB) "
          "| merge (s) | read (MiB/s) |")
    print("| --- | --- | --- | --- | --- |")
  for shares in (int(h) for h in _MERGE_SHARES.value):
    with tempfile.TemporaryDirectory() as folder:
      report = write_shares_then_merge(folder, caption_order(counts, rng, grouped=False),
                                       model, shares, rng)
    print(f"| {shares} | {report['host_entries']:,} -> {report['merged_entries']:,} | "
          f"{report['bytes_before'] / 2**20:.1f} -> {report['bytes_after'] / 2**20:.1f} | "
          f"{report['seconds']:.1f} | {report['bytes_before'] / 2**20 / report['seconds']:.0f} |")


if __name__ == "__main__":
  app.run(main)
