"""Prompt lists for sampling and evaluation, from the files they are published as.

- `*.parquet`: Pick-a-Pic's (e.g. `validation_unique`): the distinct captions.
- `*.tsv`: PartiPrompts (`PartiPrompts.tsv`): the `Prompt` column.
- `*.json`: a list of strings (an HPSv2 benchmark style file, e.g. `anime.json`), or an
  object whose values are such lists (all styles, in key order).
- `*.jsonl`: one object per line with a `prompt` (or `caption`) field.
- anything else: plain text, one prompt per non-empty line.
"""
import csv
import json
import os

from dpo_jax.errors import UserError


def read_prompts(path: str) -> list[str]:
  """The prompts of `path`, in file order; a UserError for a missing, empty or bad file."""
  if not os.path.isfile(path):
    raise UserError(f"prompts file {path} does not exist; pass --prompts with a .txt (one "
                    "prompt a line), .jsonl, .json, .tsv (PartiPrompts) or .parquet file")
  suffix = os.path.splitext(path)[1].lower()
  try:
    prompts = _READERS.get(suffix, _text)(path)
  except (ValueError, KeyError, TypeError) as error:
    raise UserError(f"{path}: cannot read prompts ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]})") from None
  prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
  if not prompts:
    raise UserError(f"{path} holds no prompts")
  return prompts


def _text(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def _jsonl(path: str) -> list[str]:
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        record = json.loads(line)
        if "prompt" not in record and "caption" not in record:
          raise KeyError(f"line {number} has no 'prompt' or 'caption' field")
        prompts.append(record.get("prompt", record.get("caption")))
  return prompts


def _json(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if isinstance(data, dict):
    return [prompt for values in data.values() for prompt in values]
  if not isinstance(data, list):
    raise TypeError("expected a list of prompts or an object of such lists")
  return data


def _tsv(path: str) -> list[str]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = csv.DictReader(f, delimiter="\t")
    if "Prompt" not in (rows.fieldnames or ()):
      raise KeyError("no 'Prompt' column (PartiPrompts.tsv has one)")
    return [row["Prompt"] for row in rows]


def _parquet(path: str) -> list[str]:
  from dpo_jax.data import pickapic
  return pickapic.read_captions([path])


_READERS = {".jsonl": _jsonl, ".json": _json, ".tsv": _tsv, ".parquet": _parquet}
