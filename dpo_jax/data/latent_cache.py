"""The latent cache: preference pairs encoded once, as VAE latent moments and text embeddings.

`python -m dpo_jax.prepare` writes it; `--config.data.cache_dir=DIR` trains from it, with no
VAE or text encoder in the step and no JPEG decoding on the hosts. A cache folder holds:

  cache.json                             what it holds: model kind, shapes, dtype, the data and
                                         options it was made from, the encoders' fingerprint
  empty_prompt.safetensors               the embeddings of "": prompt dropout stays per epoch
  pairs-00000-of-00002.array_record      one host's share of the pairs, one record per pair
  captions-00000-of-00002.array_record   that share's caption table: each distinct text
                                         encoding among its pairs, once
  pairs-00000-of-00002.json              written once that share is complete: its counts

A pair record is safetensors bytes (no pickle) of `latent_mean`, `latent_logvar` [2, h, w, C]
(winner, loser), `original_size` and `crop_top_left` [2, 2] int32, `pair_ids` (the source's
pair id, which seeds the pair's noise, so a cached pair trains exactly as the same pair read
raw) and `caption_index`, the position of its caption's entry in its own share's table. An
entry is safetensors bytes of `context` [T, D] and SDXL's `pooled` [P]. Reading a pair joins
the two, so training sees the record of format 1 (context and pooled in every pair) again:
same keys, shapes, dtypes and bits.

Why a table: Pick-a-Pic judges each prompt many times (its paper: over 500,000 examples of
35,000 distinct prompts in v1), and for SD1.5 at 512 a context is 116 of the 244 KB a pair
took in format 1. Entries are deduplicated by their bits (a digest of the stored arrays), not
by the caption text: a pair always reads back exactly what the encoder gave it, and a caption
encoded twice to the same bits (the same program on the same token ids) is stored once. Each
host dedupes within its own share and writes its own table, with no coordination between
hosts: a caption whose pairs fall on k hosts is stored k times. That costs some of the
saving at many hosts (BENCHMARKS.md has the sizes) but keeps prepare a set of independent
writers, and a cache's tables never depend on which host finished first.

Merged (format 3): `python -m dpo_jax.tools.merge_captions --cache_dir DIR`, run once on one
machine after a multi-host prepare (`data/caption_merge.py`), replaces the hosts' tables by
one, which holds each distinct encoding once over all shares:

  captions-merged.array_record           the first entry of each digest, in share order
  caption_entries.npy                    int32: for each entry of the hosts' tables, in share
                                         order, its position in the merged table

Pair records are left as they are: a pair's `caption_index` still counts in its own share's
table, and the map sends it to the merged entry, whose bits are those of the entry it
replaces. So a pair reads exactly what it read before the merge, and a run resumes across it.

Moments rather than a latent sample are stored: every epoch draws its own sample, as
encoding anew would. The crop and flip are those of epoch 0, fixed for the whole run: that is
the price of encoding once.
"""
import hashlib
import json
import os

import grain.python as grain
import numpy as np
import safetensors.numpy
from array_record.python import array_record_module

from dpo_jax.data import transforms
from dpo_jax.errors import UserError

# 2: captions in a table of their own (1 held them in every pair record). Prepare writes it.
FORMAT_VERSION = 2
# 3: format 2 with the hosts' caption tables merged into one (data/caption_merge.py).
MERGED_FORMAT_VERSION = 3
READABLE_FORMATS = (FORMAT_VERSION, MERGED_FORMAT_VERSION)
METADATA = "cache.json"
MERGED_CAPTIONS = "captions-merged.array_record"
CAPTION_ENTRIES = "caption_entries.npy"
EMPTY_PROMPT = "empty_prompt.safetensors"
# What a pair shares with the other pairs of its caption: stored once, in the caption table.
CAPTION_KEYS = ("context", "pooled")
# A pair record's reference to its entry in its own share's caption table.
CAPTION_INDEX = "caption_index"
# One record a chunk: training reads pairs in random order, one at a time.
WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_path(folder: str, index: int, count: int) -> str:
  return os.path.join(folder, f"pairs-{index:05d}-of-{count:05d}.array_record")


def captions_path(folder: str, index: int, count: int) -> str:
  """The caption table of share `index`: its pairs' `caption_index` count in it."""
  return os.path.join(folder, f"captions-{index:05d}-of-{count:05d}.array_record")


def summary_path(folder: str, index: int, count: int) -> str:
  """Share `index`'s counts, written last: its presence means the share is complete."""
  return os.path.join(folder, f"pairs-{index:05d}-of-{count:05d}.json")


def encoders_fingerprint(vae_params, text_encoder_params) -> str:
  """A digest of the frozen encoders' weights: a cache must be read with the VAE and text
  encoders that wrote it."""
  return params_fingerprint(vae_params, *text_encoder_params)


def params_fingerprint(*trees) -> str:
  """A digest of nested dicts of weights. Sums per array, so it costs one pass over them."""
  digest = hashlib.sha1()
  for tree in trees:
    leaves = sorted(_flatten(tree).items())
    for path, value in leaves:
      value = np.asarray(value)
      total, magnitude = value.sum(dtype=np.float64), np.abs(value).sum(dtype=np.float64)
      digest.update(f"{path}{value.shape}{total:.10e}{magnitude:.10e}".encode())
  return digest.hexdigest()[:16]


def _flatten(tree, prefix: str = "") -> dict:
  """{'/a/b': leaf} of nested dicts (without JAX: grain workers import this module)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {path: leaf for key, child in tree.items()
          for path, leaf in _flatten(child, f"{prefix}/{key}").items()}


def split_pair(pair: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(the pair's own arrays, its caption's: `CAPTION_KEYS`) of one encoded pair."""
  own = {k: v for k, v in pair.items() if k not in CAPTION_KEYS}
  return own, {k: v for k, v in pair.items() if k in CAPTION_KEYS}


def caption_digest(caption: dict[str, np.ndarray]) -> bytes:
  """What identifies a caption table entry: its names, dtypes, shapes and bits.

  The encodings themselves, not the caption text: two pairs share an entry only if they
  would have stored the very same arrays, so the table never changes what a pair reads.
  """
  digest = hashlib.sha1()
  for name in sorted(caption):
    value = np.ascontiguousarray(caption[name])
    digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.digest()


def _record(arrays: dict[str, np.ndarray]) -> bytes:
  return safetensors.numpy.save({k: np.require(v, requirements="C") for k, v in arrays.items()})


class ShardWriter:
  """Writes one host's share: its pairs and their caption table. The share's .json appears
  only when `close` completes both.

  `write` takes an encoded pair as training reads it (with `context`, SDXL's `pooled`);
  the caption arrays go to the table the first time their bits are seen in this share, and
  the pair record keeps their position there. Only digests stay in memory (20 B a caption).
  """

  def __init__(self, folder: str, index: int, count: int):
    self._path = shard_path(folder, index, count)
    self._summary_path = summary_path(folder, index, count)
    if os.path.exists(self._summary_path):  # An earlier cache's: this share is not done yet.
      os.remove(self._summary_path)
    self._writer = array_record_module.ArrayRecordWriter(self._path, WRITER_OPTIONS)
    self._captions_writer = array_record_module.ArrayRecordWriter(
        captions_path(folder, index, count), WRITER_OPTIONS)
    self._entries: dict[bytes, int] = {}  # caption_digest -> position in the table.
    self.pairs = 0

  @property
  def captions(self) -> int:
    """Entries in this share's caption table so far."""
    return len(self._entries)

  def write(self, pair: dict[str, np.ndarray]) -> None:
    own, caption = split_pair(pair)
    key = caption_digest(caption)
    if key not in self._entries:
      self._entries[key] = len(self._entries)
      self._captions_writer.write(_record(caption))
    self._writer.write(_record({**own, CAPTION_INDEX: np.int32(self._entries[key])}))
    self.pairs += 1

  def close(self, counts: dict[str, int]) -> None:
    self._writer.close()
    self._captions_writer.close()
    with open(self._summary_path, "w") as f:
      json.dump({"pairs": self.pairs, "captions": self.captions, "counts": counts}, f)


def write_metadata(folder: str, metadata: dict, empty_prompt: dict[str, np.ndarray]) -> None:
  safetensors.numpy.save_file(empty_prompt, os.path.join(folder, EMPTY_PROMPT))
  for name in (MERGED_CAPTIONS, CAPTION_ENTRIES):  # A merge of an earlier cache's tables.
    if os.path.exists(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))
  with open(os.path.join(folder, METADATA), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, **metadata}, f, indent=2)


def read_metadata(folder: str) -> dict:
  """cache.json, plus `shards` (complete shard paths, in order), per-shard `shard_pairs` and
  `shard_captions` (entries of each host's table), their summed `counts` and `pairs`, and
  `caption_tables`: the hosts' tables, or once merged (format 3) the merged table alone."""
  path = os.path.join(folder, METADATA)
  if not os.path.isfile(path):
    raise UserError(f"data.cache_dir={folder} holds no {METADATA}; write a cache there first "
                    "with python -m dpo_jax.prepare --output DIR")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format_version") not in READABLE_FORMATS:
    raise UserError(format_error(folder, metadata.get("format_version")))
  count = metadata["num_shards"]
  summaries = [summary_path(folder, i, count) for i in range(count)]
  incomplete = [os.path.basename(shard_path(folder, i, count))
                for i, summary in enumerate(summaries) if not os.path.isfile(summary)]
  if incomplete:
    raise UserError(f"data.cache_dir={folder} is incomplete ({', '.join(incomplete[:3])} not "
                    "finished); run python -m dpo_jax.prepare again with the same hosts")
  shares = []
  for summary in summaries:
    with open(summary) as f:
      shares.append(json.load(f))
  counts = {}
  for share in shares:
    for kind, n in share["counts"].items():
      counts[kind] = counts.get(kind, 0) + n
  merged = metadata["format_version"] == MERGED_FORMAT_VERSION
  return {**metadata, "shards": [shard_path(folder, i, count) for i in range(count)],
          "caption_tables": ([os.path.join(folder, MERGED_CAPTIONS)] if merged else
                             [captions_path(folder, i, count) for i in range(count)]),
          "shard_pairs": [s["pairs"] for s in shares],
          "shard_captions": [s["captions"] for s in shares],
          "counts": counts, "pairs": sum(s["pairs"] for s in shares)}


def format_error(folder: str, found) -> str:
  """The one line that refuses a cache written in another format."""
  return (f"data.cache_dir={folder} is a latent cache of format {found}, this dpo_jax reads "
          f"formats {FORMAT_VERSION} and {MERGED_FORMAT_VERSION} (captions in a table of their "
          "own); write it again with "
          f"python -m dpo_jax.prepare --output {folder} --overwrite")


class LatentCacheSource:
  """A grain `RandomAccessDataSource`: position -> one cached pair's arrays (numpy), joined
  with its caption's entry: `context` (and `pooled`) in place of `caption_index`.

  Positions run over the shards in order, so the pairs keep the source's order; `pair_ids`
  in each record is the source's id, which keys the pair's randomness.
  """

  def __init__(self, folder: str):
    self.metadata = read_metadata(folder)
    if not self.metadata["pairs"]:
      raise UserError(f"data.cache_dir={folder} holds no pairs; check the data it was "
                      "prepared from")
    self._records = grain.ArrayRecordDataSource(self.metadata["shards"])
    self._captions = grain.ArrayRecordDataSource(self.metadata["caption_tables"])
    self._shard_ends = np.cumsum(self.metadata["shard_pairs"])
    self._caption_starts = np.cumsum([0] + self.metadata["shard_captions"][:-1])
    # Merged: each host's entry -> its position in the merged table. (None: the hosts' own.)
    self._merged_entries = None
    if self.metadata["format_version"] == MERGED_FORMAT_VERSION:
      self._merged_entries = np.load(os.path.join(folder, CAPTION_ENTRIES))
    # What the source and the transforms left out while the cache was written.
    self.skipped_at_start = {k: n for k, n in self.metadata["counts"].items() if k != "kept"}
    self.skipped_at_start.update(self.metadata.get("skipped_at_start", {}))
    self.empty_prompt = safetensors.numpy.load_file(os.path.join(folder, EMPTY_PROMPT))

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    # grain checks a restored iterator against this: the cache's content, not its folder.
    digest = hashlib.sha1(json.dumps([self.metadata["source"], self.metadata["counts"],
                                      self.metadata["fingerprint"]]).encode()).hexdigest()[:16]
    return f"LatentCacheSource(pairs={len(self)}, digest={digest})"

  def __getitem__(self, position: int) -> dict[str, np.ndarray]:
    pair = safetensors.numpy.load(self._records[position])
    entry = caption_entry(position, int(pair.pop(CAPTION_INDEX)), self._shard_ends,
                          self._caption_starts)
    if self._merged_entries is not None:
      entry = int(self._merged_entries[entry])
    return {**pair, **safetensors.numpy.load(self._captions[entry])}


def caption_entry(position: int, caption_index: int, shard_ends: np.ndarray,
                  caption_starts: np.ndarray) -> int:
  """The position over all caption tables of the entry that pair `position` refers to: its
  `caption_index` counts in its own shard's table."""
  shard = int(np.searchsorted(shard_ends, position, side="right"))
  return int(caption_starts[shard]) + caption_index


class CachedPair(grain.MapTransform):
  """Prompt dropout on a cached pair, drawn as the raw pipeline draws it: the pair's context
  (and pooled embedding) become those of "" for the same (seed, epoch, pair id)."""

  def __init__(self, *, seed: int, empty_prompt_prob: float, empty_prompt: dict):
    self._seed, self._probability, self._empty = seed, empty_prompt_prob, empty_prompt

  def map(self, element: dict) -> dict:
    draws = transforms.pair_draws(self._seed, element["epochs"], element["pair_ids"],
                                  shared_flip=False)
    element = dict(element, pair_ids=np.int32(element["pair_ids"]),
                   epochs=np.int32(element["epochs"]))
    if draws[0] < self._probability:
      element.update(self._empty)
    return element


def check_compatible(metadata: dict, *, kind: str, resolution: int, fingerprint: str,
                     folder: str) -> None:
  """UserError unless the run's model and resolution are the ones the cache was made for."""
  if metadata["kind"] != kind:
    raise UserError(f"data.cache_dir={folder} was prepared for a '{metadata['kind']}' "
                    f"pipeline, model.pretrained is '{kind}'; prepare a cache with this model")
  if metadata["resolution"] != resolution:
    raise UserError(f"data.cache_dir={folder} holds {metadata['resolution']}px pairs, "
                    f"data.resolution is {resolution}; set --config.data.resolution="
                    f"{metadata['resolution']} or prepare the cache again")
  if metadata["fingerprint"] != fingerprint:
    raise UserError(f"data.cache_dir={folder} was encoded by other VAE or text encoder weights "
                    f"({metadata['pretrained']}); prepare it again with model.pretrained")
