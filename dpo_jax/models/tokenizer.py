"""CLIP tokenization through transformers' own tokenizer (BPE is not ours to reimplement)."""
from collections.abc import Sequence
import os

import numpy as np
import transformers

from dpo_jax.errors import UserError


def load_tokenizer(folder: str) -> transformers.CLIPTokenizer:
  """The CLIP tokenizer of a hub-layout folder (e.g. a pipeline's `tokenizer/`).

  The folder's tokenizer_config.json / special_tokens_map.json are honoured: SD 2.x and SDXL's
  second tokenizer pad with '!' rather than the EOS token, and the text encoders saw that.
  """
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  # Hub folders hold vocab.json + merges.txt; pipelines saved with transformers >= 5 hold
  # only tokenizer.json, which has both inside.
  if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
    raise UserError(f"{folder} has no tokenizer.json or vocab.json + merges.txt; point at a "
                    "CLIP tokenizer folder (the 'tokenizer' or 'tokenizer_2' folder of a "
                    "diffusers pipeline)")
  return transformers.CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer: transformers.CLIPTokenizer, prompts: Sequence[str],
             max_length: int = 77) -> np.ndarray:
  """int32 ids (len(prompts), max_length): BOS, tokens, EOS, padding; long prompts truncated."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)
