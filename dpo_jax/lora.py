"""LoRA for the UNet as a transformation of its params: no change to the model code.

Adapters are a pytree that mirrors the UNet params' nesting (whose paths are diffusers'
state_dict keys, models/weights.py): for each targeted layer `.../attn1/to_q`, the two
factors `.../attn1/to_q/lora_A/kernel` and `.../lora_B/kernel` in Flax layouts, so that
`weights.params_to_state_dict(adapters)` already holds PEFT's key names and PyTorch layouts.

- Dense (kernel [in, out]): A [in, r], B [r, out].
- Conv (kernel [kh, kw, in, out]), as PEFT's conv LoRA: A is a conv with the layer's kernel
  size (and stride) and r output channels, [kh, kw, in, r]; B a 1x1 conv, [1, 1, r, out].

`merge(base, adapters)` = base + (alpha/rank)·A·B at every target, the policy whose
reference is `base` itself: in training only the adapters carry gradients and optimiser
state. B starts at zero, so at init the policy IS the reference, bit for bit.
"""
import dataclasses
import fnmatch
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from dpo_jax.errors import UserError
from dpo_jax.models import weights

# The diffusers DPO-LoRA example's (and most diffusers LoRA scripts') targets: every
# attention projection.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INITS = ("kaiming", "gaussian")
A, B = "lora_A", "lora_B"  # PEFT's names for the down and up factors.


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `lora.*` keys, checked and resolved (alpha unset = rank)."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  init: str


def parse_targets(spec: str) -> tuple[str, ...]:
  """`lora.targets`: comma-separated patterns, e.g. 'to_q,to_k,to_v,to_out.0,conv1,ff.net.*'."""
  return tuple(t.strip() for t in (spec or "").split(",") if t.strip())


def settings(config: ml_collections.ConfigDict) -> Settings:
  """The run's LoRA settings from `config.lora`, or one-line UserErrors for bad values."""
  lora = config.lora
  if not (isinstance(lora.rank, int) and lora.rank > 0):
    raise UserError(f"lora.rank must be a positive integer, got {lora.rank!r}; set "
                    "--config.lora.rank (the diffusers DPO example uses 8)")
  alpha = float(lora.rank if lora.alpha is None else lora.alpha)
  if not alpha > 0:
    raise UserError(f"lora.alpha must be > 0, got {lora.alpha}; unset it for alpha = rank")
  targets = parse_targets(lora.targets)
  if not targets:
    raise UserError("lora.targets is empty; name the layers to adapt, e.g. "
                    f"--config.lora.targets={','.join(DEFAULT_TARGETS)}")
  if lora.init not in INITS:
    raise UserError(f"lora.init={lora.init!r} is not supported; use one of {', '.join(INITS)}")
  return Settings(lora.rank, alpha, targets, lora.init)


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses bad `lora.*` values in one line, before anything loads (when LoRA is on)."""
  if config.lora.enabled:
    settings(config)


def _matches(module: str, pattern: str) -> bool:
  # PEFT's rule for a list of names (a module matches its full path or any '.'-suffix of
  # it), with fnmatch wildcards: 'to_q' is every attention's to_q, 'ff.net.*' both FF layers.
  return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, "*." + pattern)


def target_modules(base_params, targets) -> list[tuple[str, ...]]:
  """The module paths (sorted) of the Dense and Conv layers of `base_params` that `targets`
  name. Works on arrays or jax.ShapeDtypeStructs.

  Raises:
    UserError: a pattern names no Dense or Conv layer (a typo would silently adapt nothing).
  """
  kernels = [path[:-1] for path, leaf in traverse_util.flatten_dict(base_params).items()
             if path[-1] == "kernel" and len(leaf.shape) in (2, 4)]
  names = {path: ".".join(path) for path in kernels}
  for pattern in targets:
    if not any(_matches(name, pattern) for name in names.values()):
      raise UserError(f"lora.targets entry {pattern!r} matches no Dense or Conv layer of the "
                      "UNet; give a diffusers module name or pattern such as to_q, to_out.0, "
                      "conv1, proj_in, ff.net.* or down_blocks.*.resnets.*.conv2")
  return sorted(path for path, name in names.items()
                if any(_matches(name, pattern) for pattern in targets))


def init_adapters(base_params, *, rank: int, targets=DEFAULT_TARGETS, key: jax.Array,
                  init: str = "kaiming"):
  """Float32 adapters for every layer of `base_params` that `targets` name, as host numpy
  arrays (as load_unet's params): A random, B zero.

  `init` is PEFT's for lora_A: 'kaiming' (its default: torch's kaiming_uniform_(a=√5), i.e.
  U(±1/√fan_in) with fan_in = in × kh × kw, as nn.Linear's and nn.Conv2d's own init) or
  'gaussian' (N(0, 1/rank²), the diffusers DPO example's).
  """
  if init not in INITS:
    raise UserError(f"lora.init={init!r} is not supported; use one of {', '.join(INITS)}")
  flat = traverse_util.flatten_dict(base_params)
  modules = target_modules(base_params, targets)
  a_shapes = [(*flat[m + ("kernel",)].shape[:-1], rank) for m in modules]
  sizes = [int(np.prod(shape)) for shape in a_shapes]
  # One draw for all layers, split on the host: XLA compiles a program of a hundred slices
  # (or of a hundred draws) for many seconds.
  draw = jax.random.normal if init == "gaussian" else functools.partial(
      jax.random.uniform, minval=-1.0, maxval=1.0)
  values = np.asarray(draw(key, (sum(sizes),), jnp.float32))
  adapters = {}
  for module, shape, part in zip(modules, a_shapes, np.split(values, np.cumsum(sizes)[:-1])):
    scale = 1.0 / rank if init == "gaussian" else 1.0 / np.sqrt(np.prod(shape[:-1]))
    adapters[module + (A, "kernel")] = (part * np.float32(scale)).reshape(shape)
    out = flat[module + ("kernel",)].shape[-1]
    adapters[module + (B, "kernel")] = np.zeros((*(1,) * (len(shape) - 2), rank, out),
                                                np.float32)
  return traverse_util.unflatten_dict(adapters)


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """A·B in the base kernel's layout: [in, out], or [kh, kw, in, out] for a conv (each tap
  of A times B's 1x1 kernel, as PEFT's conv delta). HIGHEST precision: a GPU's or TPU's
  default float32 matmul rounds inputs to TF32/bfloat16, and the product is tiny anyway."""
  return jnp.einsum("...ir,ro->...io", a, b.reshape(b.shape[-2:]),
                    precision=jax.lax.Precision.HIGHEST)


def merge(base_params, adapters, *, alpha: float, rank: int):
  """`base_params` with (alpha/rank)·A·B added to every adapted kernel: pure, jit-friendly,
  differentiable w.r.t. `adapters`. Other leaves are returned as they are.

  An adapted kernel comes out in the promotion of its base and adapter dtypes: float32 from
  a bfloat16 base and float32 adapters, so a small update is not rounded away.

  Raises:
    UserError: the adapters do not fit `base_params` (another model's, or another rank).
  """
  flat = dict(traverse_util.flatten_dict(base_params))
  factors = traverse_util.flatten_dict(adapters)
  for module in sorted({path[:-2] for path in factors}):
    a, b = factors[module + (A, "kernel")], factors[module + (B, "kernel")]
    kernel = flat.get(module + ("kernel",))
    where = ".".join(module)
    if kernel is None:
      raise UserError(f"LoRA adapter for '{where}' has no such layer in the base UNet; use "
                      "the base model the adapters were trained on")
    if a.shape[-1] != rank or b.shape[-2] != rank:
      raise UserError(f"LoRA adapter for '{where}' has rank {a.shape[-1]}, not "
                      f"lora.rank={rank}; set lora.rank to the adapters' rank")
    if a.shape[:-1] != kernel.shape[:-1] or b.shape[-1] != kernel.shape[-1]:
      raise UserError(f"LoRA adapter for '{where}' does not fit the base kernel of shape "
                      f"{tuple(kernel.shape)}; use the base model the adapters were trained on")
    flat[module + ("kernel",)] = kernel + (alpha / rank) * delta(a, b)
  return traverse_util.unflatten_dict(flat)


def lora_to_diffusers(adapters, *, alpha: float, rank: int,
                      prefix: str = "unet") -> tuple[dict[str, np.ndarray], dict]:
  """The diffusers (PEFT) LoRA state_dict and adapter metadata of `adapters`.

  Keys are `unet.<module path>.lora_A.weight` / `lora_B.weight` in PyTorch layouts, as
  `StableDiffusionLoraLoaderMixin.save_lora_weights` writes them. The metadata is the
  `peft.LoraConfig` kwargs, keys prefixed with `prefix.`: diffusers reads alpha only from
  there (a PEFT-format file without it loads at alpha = rank) and builds the LoraConfig
  from it, so target_modules lists every adapted module's full path.
  """
  state = {f"{prefix}.{key}": value.astype(np.float32)
           for key, value in weights.params_to_state_dict(adapters).items()}
  modules = sorted({key[len(prefix) + 1:].rsplit(".", 2)[0] for key in state})
  config = {"r": rank, "lora_alpha": alpha, "target_modules": modules, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "lora_bias": False}
  return state, {f"{prefix}.{key}": value for key, value in config.items()}
