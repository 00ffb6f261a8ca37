"""Row-group reads and host-side pairs/s of Pick-a-Pic parquet: full shuffle vs windowed order.

Writes one synthetic shard in the published schema: `--groups` row groups of
`--rows_per_group` pairs, each image a distinct JPEG of `--image_size` pixels (random fields,
quality 90), stored without dictionary encoding or compression, so a row group costs its
JPEG bytes to read, as in the published shards. Then, for data.shuffle_window_groups = 0
(the full shuffle) and each `--windows` value, times in this process:
  reads    one host's pairs of `--epochs` epochs through the loader's source (its cache
           sized by `loader.make_source`), order and host slice, without decoding: row
           groups read per epoch per host (`PickapicSource.row_group_reads`), and pairs/s;
           for 1 and `--hosts` hosts (each host's reads; the hosts run one after another);
  loader   `loader.make_train_iterator` end to end (reads, JPEG decode, resize, crop, flip,
           tokenize, batch; data.workers=0) for `--loader_epochs` epochs after one warm-up
           batch: pairs/s, and row groups read per epoch (counted at
           `pyarrow.parquet.ParquetFile.read_row_group`; the pipeline reads up to 2 batches
           ahead, so a window's first group may count in the epoch before).
Each row is a Markdown table row; rates are per wall second and per CPU second of this
process (its threads included). Run from the repository root:

  python benchmarks/parquet_locality.py [--groups 24 --rows_per_group 32 --image_size 256]
"""
import argparse
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpo_jax import default_config, parallel  # noqa: E402
from dpo_jax.data import loader, order  # noqa: E402

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "tree", "city", "at", "night")


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return f"{names[0] if names else platform.processor()}, {os.cpu_count()} logical CPUs"


def jpeg(rng: np.random.Generator, size: int) -> bytes:
  """A distinct image of some structure (a coarse random field, upsampled, plus noise)."""
  field = rng.normal(128, 60, (size // 16, size // 16, 3)).clip(0, 255).astype(np.uint8)
  image = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC),
                     np.float32) + rng.normal(0, 12, (size, size, 3))
  buffer = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_shard(path: str, groups: int, rows: int, size: int, seed: int) -> int:
  """The shard's bytes on disk."""
  rng = np.random.default_rng(seed)
  n = groups * rows
  label_0 = rng.integers(2, size=n).astype(np.float64)
  table = pa.table({
      "caption": [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)],
      "jpg_0": [jpeg(rng, size) for _ in range(n)], "jpg_1": [jpeg(rng, size) for _ in range(n)],
      "label_0": label_0, "label_1": 1 - label_0,
      "model_0": ["synthetic"] * n, "model_1": ["synthetic"] * n, "has_label": [True] * n})
  # As the published shards: JPEG bytes stored as they are, so a read costs them.
  pq.write_table(table, path, row_group_size=rows, use_dictionary=False, compression="none")
  return os.path.getsize(path)


class AsRead:
  """A prepare step that leaves the record as the source gave it (the reads alone)."""

  def map(self, record: dict) -> dict:
    return record


def host_reads(config, host: int, hosts: int, epochs: int) -> tuple[float, float, float]:
  """(row-group reads per epoch, pairs per wall second, pairs per CPU second) of one host."""
  source = loader.make_source(config.data)
  the_order = order.make_order(len(source), config.train.seed, source.group_starts,
                               config.data.shuffle_window_groups)
  share = parallel.host_slice(config.train.batch_pairs, host, hosts)
  pairs = loader._HostPairs(source, the_order, AsRead(), (), 0,
                            batch_pairs=config.train.batch_pairs, host=share)
  end = epochs * len(source)
  wall, cpu, element = time.perf_counter(), time.process_time(), 0
  while order.host_position(0, element, batch_pairs=config.train.batch_pairs, host=share) < end:
    pairs(element)
    element += 1
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return source.row_group_reads / epochs, element / wall, element / cpu


def loader_epochs(config, tokenizer, epochs: int) -> tuple[float, float, float]:
  """(row groups read per epoch, pairs per wall second, pairs per CPU second) of `epochs`
  epochs of batches."""
  reads = []
  real_read = pq.ParquetFile.read_row_group

  def counted(self, *args, **kwargs):
    reads.append(args[0])
    return real_read(self, *args, **kwargs)

  pq.ParquetFile.read_row_group = counted
  try:
    iterator = loader.make_train_iterator(config, [tokenizer], process_index=0, process_count=1)
    batches = epochs * len(loader.make_source(config.data)) // config.train.batch_pairs
    next(iterator)  # Warm-up: the first batch starts the pipeline's thread.
    del reads[:]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  finally:
    pq.ParquetFile.read_row_group = real_read
  pairs = batches * config.train.batch_pairs
  return len(reads) / epochs, pairs / wall, pairs / cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--groups", type=int, default=24)
  parser.add_argument("--rows_per_group", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--windows", default="4,8", help="shuffle_window_groups values, besides 0")
  parser.add_argument("--epochs", type=int, default=2, help="epochs of the reads rows")
  parser.add_argument("--loader_epochs", type=int, default=3, help="epochs of the loader rows")
  parser.add_argument("--hosts", type=int, default=4)
  parser.add_argument("--batch_pairs", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=256, help="loader rows' data.resolution")
  parser.add_argument("--skip_loader", action="store_true")
  args = parser.parse_args()

  print(f"Machine: {platform.node()}, {cpu_model()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "train-00000-of-00001.parquet")
    size = write_shard(path, args.groups, args.rows_per_group, args.image_size, seed=0)
    group_mb = size / args.groups / 1e6
    print(f"Data: {args.groups} row groups x {args.rows_per_group} pairs, {args.image_size} px "
          f"JPEGs, {size / 1e6:.0f} MB ({group_mb:.2f} MB per group)")
    config = default_config.get_config()
    config.data.train_files = path
    config.data.resolution = args.resolution
    config.data.random_crop = True
    config.train.batch_pairs = args.batch_pairs
    windows = [0] + [int(w) for w in args.windows.split(",") if w]

    print("\n| order | hosts | row-group reads per epoch, per host | MB read per epoch, per host "
          "| pairs/s (wall) | pairs per CPU-second |")
    print("| --- | --- | --- | --- | --- | --- |")
    for window in windows:
      config.data.shuffle_window_groups = window
      name = f"windowed, {window} groups" if window else "full shuffle"
      for hosts in sorted({1, args.hosts}):
        results = [host_reads(config, host, hosts, args.epochs) for host in range(hosts)]
        reads, wall, cpu = (np.mean(column) for column in zip(*results))
        print(f"| {name} | {hosts} | {reads:.1f} | {reads * group_mb:.0f} | {wall:.0f} | "
              f"{cpu:.0f} |", flush=True)

    if args.skip_loader:
      return
    from tests import tiny_models  # The tests' tiny CLIP BPE: a caption costs little.
    tokenizer = tiny_models.make_clip_tokenizer()
    print(f"\n| order | `make_train_iterator` at {args.resolution} px, workers=0: row-group "
          "reads per epoch | pairs/s (wall) | pairs per CPU-second |")
    print("| --- | --- | --- | --- |")
    for window in windows:
      config.data.shuffle_window_groups = window
      name = f"windowed, {window} groups" if window else "full shuffle"
      reads, wall, cpu = loader_epochs(config, tokenizer, args.loader_epochs)
      print(f"| {name} | {reads:.1f} | {wall:.0f} | {cpu:.0f} |", flush=True)


if __name__ == "__main__":
  main()
