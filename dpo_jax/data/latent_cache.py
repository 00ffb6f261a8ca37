"""The latent cache: preference pairs encoded once, as VAE latent moments and text embeddings.

`python -m dpo_jax.prepare` writes it; `--config.data.cache_dir=DIR` trains from it, with no
VAE or text encoder in the step and no JPEG decoding on the hosts. A cache folder holds:

  cache.json                          what it holds: model kind, shapes, dtype, the data and
                                      options it was made from, the encoders' fingerprint
  empty_prompt.safetensors            the embeddings of "": prompt dropout stays per epoch
  pairs-00000-of-00002.array_record   one host's share of the pairs, one record per pair
  pairs-00000-of-00002.json           written once that share is complete: its counts

A record is safetensors bytes (no pickle) of `latent_mean`, `latent_logvar` [2, h, w, C]
(winner, loser), `context` [T, D], SDXL's `pooled` [P], `original_size` and `crop_top_left`
[2, 2] int32, and `pair_ids` (the source's pair id, which seeds the pair's noise, so a cached
pair trains exactly as the same pair read raw). Moments rather than a latent sample are stored:
every epoch draws its own sample, as encoding anew would. The crop and flip are those of
epoch 0, fixed for the whole run: that is the price of encoding once.
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

FORMAT_VERSION = 1
METADATA = "cache.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
# One record a chunk: training reads pairs in random order, one at a time.
_WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_path(folder: str, index: int, count: int) -> str:
  return os.path.join(folder, f"pairs-{index:05d}-of-{count:05d}.array_record")


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


class ShardWriter:
  """Writes one host's share; its .json appears only when `close` completes it."""

  def __init__(self, folder: str, index: int, count: int):
    self._path = shard_path(folder, index, count)
    if os.path.exists(self._summary_path):  # An earlier cache's: this share is not done yet.
      os.remove(self._summary_path)
    self._writer = array_record_module.ArrayRecordWriter(self._path, _WRITER_OPTIONS)
    self.pairs = 0

  @property
  def _summary_path(self) -> str:
    return self._path.replace(".array_record", ".json")

  def write(self, pair: dict[str, np.ndarray]) -> None:
    self._writer.write(safetensors.numpy.save({k: np.require(v, requirements="C")
                                               for k, v in pair.items()}))
    self.pairs += 1

  def close(self, counts: dict[str, int]) -> None:
    self._writer.close()
    with open(self._summary_path, "w") as f:
      json.dump({"pairs": self.pairs, "counts": counts}, f)


def write_metadata(folder: str, metadata: dict, empty_prompt: dict[str, np.ndarray]) -> None:
  safetensors.numpy.save_file(empty_prompt, os.path.join(folder, EMPTY_PROMPT))
  with open(os.path.join(folder, METADATA), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, **metadata}, f, indent=2)


def read_metadata(folder: str) -> dict:
  """cache.json, plus `shards` (complete shard paths, in order) and their summed `counts`."""
  path = os.path.join(folder, METADATA)
  if not os.path.isfile(path):
    raise UserError(f"data.cache_dir={folder} holds no {METADATA}; write a cache there first "
                    "with python -m dpo_jax.prepare --output DIR")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path} is cache format {metadata.get('format_version')}, this dpo_jax "
                    f"reads {FORMAT_VERSION}; prepare the cache again")
  count = metadata["num_shards"]
  shards = [shard_path(folder, i, count) for i in range(count)]
  incomplete = [os.path.basename(p) for p in shards
                if not os.path.isfile(p.replace(".array_record", ".json"))]
  if incomplete:
    raise UserError(f"data.cache_dir={folder} is incomplete ({', '.join(incomplete[:3])} not "
                    "finished); run python -m dpo_jax.prepare again with the same hosts")
  summaries = []
  for shard in shards:
    with open(shard.replace(".array_record", ".json")) as f:
      summaries.append(json.load(f))
  counts = {}
  for summary in summaries:
    for kind, n in summary["counts"].items():
      counts[kind] = counts.get(kind, 0) + n
  return {**metadata, "shards": shards, "counts": counts,
          "pairs": sum(s["pairs"] for s in summaries)}


class LatentCacheSource:
  """A grain `RandomAccessDataSource`: position -> one cached pair's arrays (numpy).

  Positions run over the shards in order, so the pairs keep the source's order; `pair_ids`
  in each record is the source's id, which keys the pair's randomness.
  """

  def __init__(self, folder: str):
    self.metadata = read_metadata(folder)
    if not self.metadata["pairs"]:
      raise UserError(f"data.cache_dir={folder} holds no pairs; check the data it was "
                      "prepared from")
    self._records = grain.ArrayRecordDataSource(self.metadata["shards"])
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
    return safetensors.numpy.load(self._records[position])


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
