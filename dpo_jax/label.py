"""`python -m dpo_jax.label --scorer KIND=FOLDER --input PAIRS --output DIR`: AI feedback
(the paper's §5.4): relabel a pair dataset by a scorer, the winner being the image it scores
higher against the caption, keeping both scores.

Input: Pick-a-Pic parquet files or a JSONL of {"prompt", "chosen", "rejected"} (a glob or
comma-separated list). Output: DIR/part-00000.parquet, ... in Pick-a-Pic's schema (caption,
jpg_0, jpg_1, label_0, label_1, ...) plus `score_0`, `score_1` and `source_pair_id`, which
the trainer reads as it is: `--config.data.train_files='DIR/*.parquet'`. Both images of a
pair keep their order, and `label_0` says which won (a tie: ½ each, which training skips).

Batched and split over the host's devices (the scorer's batch sharding). Resumable: the
pairs are written in parts of `--part_pairs`; a part already on disk is
skipped, so the same command continues an interrupted run. Several hosts (the training
launchers) each take every process_count-th part. Unusable pairs (unreadable images) are
skipped and counted.
"""
import os

import numpy as np
from absl import flags

from dpo_jax import cli
from dpo_jax.errors import UserError

DEFAULT_PART_PAIRS = 1024


def _images(record: dict) -> list[np.ndarray] | None:
  from dpo_jax.data import transforms
  try:
    return [np.asarray(transforms.decode_image(record[side])) for side in ("winner", "loser")]
  except (OSError, ValueError, SyntaxError):
    return None


def _write_part(rows: dict, path: str) -> None:
  """Atomically: a part on disk is complete."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  partial = f"{path}.partial"
  pq.write_table(pa.table(rows), partial)
  os.replace(partial, path)


def label_pairs(scorer, source, output: str, *, batch: int = 16,
                part_pairs: int = DEFAULT_PART_PAIRS, process_index: int = 0,
                process_count: int = 1) -> dict[str, int]:
  """Scores every pair of `source` (a `data.interfaces.PairSource`) with `scorer`; writes
  this process's parts to `output`; returns {'written', 'skipped', 'parts_done_before'}."""
  os.makedirs(output, exist_ok=True)
  batch = -(-batch // scorer.devices) * scorer.devices  # Split over the host's devices.
  parts = -(-len(source) // part_pairs)
  counts = {"written": 0, "skipped": 0, "parts_done_before": 0}
  for part in range(process_index, parts, process_count):
    path = os.path.join(output, f"part-{part:05d}.parquet")
    if os.path.exists(path):
      counts["parts_done_before"] += 1
      continue
    records = []
    for pair_id in range(part * part_pairs, min((part + 1) * part_pairs, len(source))):
      record = source[pair_id]
      images = None if "skip" in record else _images(record)
      if images is None:
        counts["skipped"] += 1
        continue
      records.append((record, images))
    scores = np.zeros((len(records), 2), np.float32)
    for start in range(0, len(records), batch):
      chunk = records[start:start + batch]
      padded = chunk + [chunk[-1]] * (batch - len(chunk))  # One compiled batch size.
      for side in (0, 1):
        scores[start:start + len(chunk), side] = scorer(
            [images[side] for _, images in padded],
            [record["caption"] for record, _ in padded])[:len(chunk)]
    label_0 = np.where(scores[:, 0] == scores[:, 1], 0.5, (scores[:, 0] > scores[:, 1]) * 1.0)
    _write_part({
        "caption": [record["caption"] for record, _ in records],
        "jpg_0": [record["winner"] for record, _ in records],
        "jpg_1": [record["loser"] for record, _ in records],
        "label_0": label_0.tolist(), "label_1": (1 - label_0).tolist(),
        "score_0": scores[:, 0].tolist(), "score_1": scores[:, 1].tolist(),
        "has_label": [True] * len(records), "are_different": [True] * len(records),
        "model_0": [""] * len(records), "model_1": [""] * len(records),
        "best_image_uid": [""] * len(records),
        "source_pair_id": [int(record["pair_ids"]) for record, _ in records]}, path)
    counts["written"] += len(records)
  return counts


def run() -> None:
  scorer_spec = flags.DEFINE_string("scorer", None, "KIND=FOLDER[,processor=FOLDER][,mlp=FILE]"
                                    " (see dpo_jax.evaluate).")
  input_files = flags.DEFINE_string("input", None, "Pairs: Pick-a-Pic parquet or a JSONL.")
  output = flags.DEFINE_string("output", None, "Folder for the relabelled parquet parts.")
  batch = flags.DEFINE_integer("batch", 16, "Images per scorer call.")
  part_pairs = flags.DEFINE_integer("part_pairs", DEFAULT_PART_PAIRS, "Pairs per output part.")

  def command(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected argument {argv[1]!r}; run with --help for the options")
    if not (scorer_spec.value and input_files.value and output.value):
      raise UserError("--scorer, --input and --output are all required")
    import jax
    import ml_collections

    from dpo_jax import evaluate
    from dpo_jax.data import loader
    (kind, scorer), = evaluate.load_scorers([scorer_spec.value]).items()
    source = loader.make_source(ml_collections.ConfigDict(
        {"format": evaluate.data_format(input_files.value), "train_files": input_files.value}))
    counts = label_pairs(scorer, source, output.value, batch=batch.value,
                         part_pairs=part_pairs.value, process_index=jax.process_index(),
                         process_count=jax.process_count())
    print(f"{output.value}: {counts['written']} pairs relabelled by {kind}, "
          f"{counts['skipped']} skipped, {counts['parts_done_before']} parts already done")

  cli.run(command)


if __name__ == "__main__":
  run()
