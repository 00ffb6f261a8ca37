"""Every pair source and batch iterator keeps the written-down interfaces (data/interfaces.py),
and no data class shares mutable state through a class attribute."""
import importlib
import inspect
import json
import pickle
import pkgutil

import ml_collections
from PIL import Image

import tiny_models
from dpo_jax import data as data_package
from dpo_jax.data import interfaces, loader, subset, synthetic


def _jsonl_config(tmp_path) -> ml_collections.ConfigDict:
  lines = []
  for i in range(3):
    for side in ("chosen", "rejected"):
      Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / f"{i}-{side}.png")
    lines.append(json.dumps({"prompt": f"p{i}", "chosen": f"{i}-chosen.png",
                             "rejected": f"{i}-rejected.png"}))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
  return ml_collections.ConfigDict({
      "data": dict(format="jsonl", train_files=str(tmp_path / "pairs.jsonl"), resolution=16,
                   random_crop=False, random_flip=False, empty_prompt_prob=0.0, workers=0),
      "train": {"batch_pairs": 2, "seed": 0}})


def test_sources_are_pair_sources_that_pickle(tmp_path):
  source = loader.make_source(_jsonl_config(tmp_path).data)
  for candidate in (source, subset.RandomSubset(source, 2, seed=0)):
    assert isinstance(candidate, interfaces.PairSource)
    assert candidate.skipped_at_start == {"line": 1}
    assert pickle.loads(pickle.dumps(candidate))[0]["pair_ids"] == candidate[0]["pair_ids"]


def test_batch_iterators_keep_the_interface(tmp_path):
  config = _jsonl_config(tmp_path)
  tokenizers = [tiny_models.make_clip_tokenizer(model_max_length=8)]
  iterators = [
      loader.make_train_iterator(config, tokenizers, process_index=0, process_count=1),
      synthetic.SyntheticIterator(batch_pairs=2, host_slice=slice(0, 2), seed=0,
                                  latent_size=2, channels=4, context_length=3, context_dim=8)]
  for iterator in iterators:
    assert isinstance(iterator, interfaces.BatchIterator)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # JSON-ready, as checkpoints save it.
    expected = next(iterator)["pair_ids"]
    iterator.set_state(state)
    assert (next(iterator)["pair_ids"] == expected).all()
    assert iterator.counts["kept"] == 4


def test_no_data_class_holds_mutable_class_attributes():
  """A dict on the class is shared by every instance: one run's counts would leak into
  another's (the synthetic iterator and the TFDS source once had `skipped_at_start = {}`)."""
  shared = []
  for module_info in pkgutil.iter_modules(data_package.__path__):
    module = importlib.import_module(f"dpo_jax.data.{module_info.name}")
    for name, cls in inspect.getmembers(module, inspect.isclass):
      if cls.__module__ != module.__name__ or issubclass(cls, BaseException):
        continue
      shared += [f"{name}.{attr}" for attr, value in vars(cls).items()
                 if not attr.startswith("__") and isinstance(value, (dict, list, set))]
  assert not shared, shared
