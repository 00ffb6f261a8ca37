"""Reading and writing model folders in the diffusers / transformers on-disk layout.

Only safetensors is ever read: pickled `.bin` / `.ckpt` files can run arbitrary code, so a
folder holding only those gets a one-line error with the conversion command instead.
"""
import glob
import json
import os

import jax
import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from dpo_jax.errors import UserError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
DEFAULT_MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' and transformers' default max_shard_size
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def resolve_pretrained(name_or_path: str, key: str = "model.pretrained",
                       revision: str | None = None) -> str:
  """A local folder for `name_or_path`: the folder itself, or a hub snapshot (of `revision`,
  default the main branch) when online. `key` is the config key that named it, for errors.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise UserError(f"{key} '{name_or_path}' is a file; point it at a diffusers folder (the "
                    "one holding model_index.json or config.json)")
  if name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".", "~")):
    raise UserError(f"{key} '{name_or_path}' does not exist; give a local diffusers "
                    "folder or a hub id like 'org/name'")
  import huggingface_hub  # Imported lazily: only hub ids need it.
  try:
    return huggingface_hub.snapshot_download(
        name_or_path, revision=revision,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as error:  # The hub client raises many types; all mean "not reachable".
    raise UserError(
        f"cannot fetch '{name_or_path}' ({key}) from the Hugging Face hub "
        f"({type(error).__name__}); on a machine with network run `hf download "
        f"{name_or_path} --local-dir DIR` and set {key}=DIR") from None


def _with_variant(filename: str, variant: str | None) -> str:
  """diffusers' naming: 'x.safetensors' + 'fp16' -> 'x.fp16.safetensors'."""
  if not variant:
    return filename
  stem, ext = filename.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def _weight_files(folder: str, weights_name: str, variant: str | None) -> list[str]:
  single = os.path.join(folder, _with_variant(f"{weights_name}.safetensors", variant))
  index = os.path.join(folder, _with_variant(f"{weights_name}.safetensors.index.json", variant))
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
      raise UserError(f"{index} lists shard '{missing[0]}' which is not in {folder}; "
                      "download the missing shards")
    return [os.path.join(folder, s) for s in shards]
  if any(f.endswith(_PICKLE_SUFFIXES) for f in os.listdir(folder)):
    raise UserError(
        f"{folder} holds only pickled weights (.bin/.ckpt), which we never load; convert them "
        "with `python -c \"from diffusers import AutoModel as M; "
        f"M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"`")
  wanted = os.path.basename(single)
  raise UserError(f"no {wanted} (or sharded index) in {folder}"
                  + (f"; is variant '{variant}' right?" if variant else ""))


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except TypeError:
    # numpy has no bfloat16: read through the flax API on the CPU, then view as ml_dtypes.
    with jax.default_device(jax.devices("cpu")[0]):
      return {k: np.asarray(v) for k, v in safetensors.flax.load_file(path).items()}
  except safetensors.SafetensorError as error:
    raise UserError(f"cannot read {path} ({error}); the file is corrupt, download it "
                    "again") from None


def read_state_dict(folder: str, weights_name: str = DIFFUSERS_WEIGHTS,
                    variant: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a model folder (single file or sharded) as numpy arrays."""
  if not os.path.isdir(folder):
    raise UserError(f"model folder {folder} does not exist; check the path")
  state = {}
  for path in _weight_files(folder, weights_name, variant):
    state.update(_load_safetensors(path))
  return state


def read_config(folder: str, filename: str = "config.json") -> dict:
  path = os.path.join(folder, filename)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; a model folder needs its {filename}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as error:
      raise UserError(f"{path} is not valid JSON ({error}); restore it from the original") from None


def _save(tensors: dict[str, np.ndarray], path: str) -> None:
  metadata = {"format": "pt"}  # What PyTorch loaders expect to find.
  if any(v.dtype.name == "bfloat16" for v in tensors.values()):
    safetensors.flax.save_file({k: jax.numpy.asarray(v) for k, v in tensors.items()}, path,
                               metadata)
  else:
    safetensors.numpy.save_file(tensors, path, metadata)


def write_state_dict(state: dict[str, np.ndarray], folder: str,
                     weights_name: str = DIFFUSERS_WEIGHTS,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes tensors as one safetensors file, or as shards plus the index both libraries read."""
  os.makedirs(folder, exist_ok=True)
  # A previous export with another shard count would leave files a loader might pick up.
  for old in glob.glob(os.path.join(folder, f"{weights_name}*.safetensors*")):
    os.remove(old)
  shards, current, current_bytes = [], {}, 0
  for key in sorted(state):
    size = state[key].nbytes
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = {}, 0
    current[key] = state[key]
    current_bytes += size
  shards.append(current)
  if len(shards) == 1:
    _save(shards[0], os.path.join(folder, f"{weights_name}.safetensors"))
    return
  weight_map = {}
  for i, shard in enumerate(shards, start=1):
    name = f"{weights_name}-{i:05d}-of-{len(shards):05d}.safetensors"
    _save(shard, os.path.join(folder, name))
    weight_map.update({key: name for key in shard})
  index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
           "weight_map": weight_map}
  with open(os.path.join(folder, f"{weights_name}.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)


def write_config(config: dict, folder: str, filename: str = "config.json") -> None:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, filename), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)

