"""Where a UNet's CPU time goes, op by op, against PyTorch: XLA:CPU (jit, NHWC, the Flax
modules the model uses) against diffusers (eager, NCHW, the torch modules it uses).

  python benchmarks/cpu_ops.py                           # every section, the mid-size UNet
  python benchmarks/cpu_ops.py --sections unet,breakdown --repeats 5
  python benchmarks/cpu_ops.py --tiny --repeats 1        # seconds: a smoke run

The UNet is configs/synthetic.py's at `--channels` (default 64,128,256: cross-attention at
every level but the last, as SD1.5), on `--batch` images (default 4, a 2-pair DPO step) of
`--latent`² latents. Sections:

  ops        every distinct op the UNet runs (conv, group norm, layer norm, attention block,
             dense, SiLU), found by tracing it, timed alone at its shape, forward and forward
             + backward (gradients of the input and the op's params), JAX and PyTorch; the
             per-class totals weight each shape by how often the UNet runs it.
  unet       the whole UNet, forward and forward + backward (params' gradients of an MSE).
  breakdown  one UNet forward + backward by op class: JAX from a jax.profiler trace (each
             XLA thunk classed by the HLO it runs), PyTorch from torch.profiler (self time of
             each aten op).
  step       `dpo_jax.bench`'s DPO step on batch/2 pairs, per `dpo.reference_pass`, against
             the UNet passes it holds: the policy's forward + backward and the reference's
             forward, on all the step's images.

Timings are the best of `--repeats` samples of at least `--seconds` each, the JAX and
PyTorch samples interleaved so that both see the same load; PyTorch runs `--threads` threads
(default: all cores, as XLA). The last line is one JSON object.
"""
import argparse
import collections
import dataclasses
import glob
import importlib.util
import json
import math
import os
import platform
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import bench
from dpo_jax.models import layers, unet as unet_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("ops", "unet", "breakdown", "step")
CLASSES = ("convolution", "group norm", "layer norm", "attention", "matmul", "silu",
           "transpose/copy", "elementwise/other")
CONTEXT_LENGTH = 77
# HLO ops that only move data: a fusion of these alone is a layout change or a copy.
_LAYOUT_OPS = {"parameter", "transpose", "copy", "bitcast", "reverse", "reshape", "broadcast",
               "concatenate", "slice", "pad", "tuple", "get-tuple-element", "constant"}
# Flax modules by the op class their own computations belong to.
_MODULE_CLASSES = {"Conv": "convolution", "GroupNorm": "group norm", "LayerNorm": "layer norm",
                   "Attention": "attention", "Dense": "matmul"}


def unet_config(channels: tuple[int, ...]) -> dict:
  """configs/synthetic.py's UNet at these channels: cross-attention at every level but the
  last (SD1.5's layout), the rest as the synthetic config."""
  spec = importlib.util.spec_from_file_location("synthetic",
                                                os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
  up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
  return {**module.SYNTHETIC_UNET, "block_out_channels": tuple(channels),
          "down_block_types": down, "up_block_types": up}


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def interleaved_best(fns: dict, repeats: int, seconds: float) -> dict:
  """Best seconds per call of each of `fns` (synchronous callables), over `repeats` rounds
  that each time every fn for >= `seconds` in turn: a load change hits all of them alike."""
  calls = {}
  for name, fn in fns.items():
    fn()  # Warm: compiled, caches filled.
    started = time.perf_counter()
    fn()
    calls[name] = max(1, math.ceil(seconds / max(time.perf_counter() - started, 1e-6)))
  best = dict.fromkeys(fns, math.inf)
  for _ in range(repeats):
    for name, fn in fns.items():
      started = time.perf_counter()
      for _ in range(calls[name]):
        fn()
      best[name] = min(best[name], (time.perf_counter() - started) / calls[name])
  return best


def synced(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


# ---------------------------------------------------------------------------------------------
# The UNet, JAX and PyTorch.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unets:
  """The same UNet config in both frameworks (random weights each) and one batch."""
  config: dict
  model: unet_lib.UNet2DConditionModel
  params: dict
  inputs: tuple  # NHWC sample, timesteps, context, target.
  torch_model: object
  torch_inputs: tuple  # NCHW.


def make_unets(config: dict, batch: int, latent: int) -> Unets:
  import torch
  from diffusers import UNet2DConditionModel
  model = unet_lib.build_unet(config)
  params = jax.device_put(bench.host_random_params(model, 0))
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  sample, target = normal(batch, latent, latent, 4), normal(batch, latent, latent, 4)
  context = normal(batch, CONTEXT_LENGTH, model.config.cross_attention_dim[0])
  timesteps = rng.integers(0, 1000, batch).astype(np.int32)
  torch.manual_seed(0)
  torch_model = UNet2DConditionModel.from_config(config).train()
  nchw = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  return Unets(config, model, params, tuple(map(jnp.asarray, (sample, timesteps, context,
                                                              target))),
               torch_model, (nchw(sample), torch.from_numpy(timesteps).long(),
                             torch.from_numpy(context), nchw(target)))


def unet_functions(unets: Unets) -> tuple[dict, object]:
  """Synchronous callables, {jax,torch} x {forward, forward+backward}, and JAX's compiled
  forward+backward."""
  import torch
  model, (sample, timesteps, context, target) = unets.model, unets.inputs

  def unet_forward(params, sample, timesteps, context):
    return model.apply({"params": params}, sample, timesteps, context)

  def unet_forward_backward(params, sample, timesteps, context, target):
    return jax.grad(lambda p: jnp.mean(jnp.square(unet_forward(p, sample, timesteps, context)
                                                  - target)))(params)

  # Compiled ahead of time, so that `breakdown` reads the very HLO that runs.
  forward = jax.jit(unet_forward).lower(unets.params, sample, timesteps, context).compile()
  forward_backward = jax.jit(unet_forward_backward).lower(
      unets.params, sample, timesteps, context, target).compile()
  torch_model, torch_inputs = unets.torch_model, unets.torch_inputs

  def torch_forward():
    with torch.no_grad():
      torch_model(*torch_inputs[:3])

  def torch_forward_backward():
    prediction = torch_model(*torch_inputs[:3]).sample
    torch.nn.functional.mse_loss(prediction, torch_inputs[3]).backward()
    torch_model.zero_grad(set_to_none=True)

  return {"jax forward": synced(forward, unets.params, sample, timesteps, context),
          "torch forward": torch_forward,
          "jax forward+backward": synced(forward_backward, unets.params, sample, timesteps,
                                         context, target),
          "torch forward+backward": torch_forward_backward}, forward_backward


# ---------------------------------------------------------------------------------------------
# Section ops: the UNet's ops one at a time.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
  """One distinct op of the UNet: a Flax module (unbound, no parent) or SiLU (None) on inputs
  of these shapes."""
  kind: str
  module: nn.Module | None
  shapes: tuple


def _op_kind(module: nn.Module, shapes: tuple) -> str:
  if isinstance(module, nn.Conv):
    return f"conv {'x'.join(map(str, module.kernel_size))}"
  if isinstance(module, layers.Attention):
    return "attention (cross)" if len(shapes) > 1 else "attention (self)"
  return {"GroupNorm": "group norm", "LayerNorm": "layer norm", "Dense": "dense"}[
      type(module).__name__]


def unet_ops(unets: Unets) -> collections.Counter:
  """Counter of `Op`s over one forward pass: each Conv, GroupNorm, LayerNorm, Attention and
  Dense call (a Dense inside an Attention is the block's) and each SiLU, with its shapes."""
  ops = collections.Counter()
  depth = [0]  # Attention blocks being called.

  def record(next_fn, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module).__name__ not in _MODULE_CLASSES:
      return next_fn(*args, **kwargs)
    shapes = tuple(tuple(a.shape) for a in args if a is not None)
    if depth[0] == 0:
      ops[Op(_op_kind(module, shapes), module.clone(parent=None, name=None), shapes)] += 1
    attention = isinstance(module, layers.Attention)
    depth[0] += attention
    try:
      return next_fn(*args, **kwargs)
    finally:
      depth[0] -= attention

  sample, timesteps, context, _ = unets.inputs
  forward = lambda params: unets.model.apply({"params": params}, sample, timesteps, context)
  with nn.intercept_methods(record):
    jaxpr = jax.make_jaxpr(forward)(unets.params)
  for shape in _silu_shapes(jaxpr.jaxpr):
    ops[Op("silu", None, (shape,))] += 1
  return ops


def _silu_shapes(jaxpr) -> list:
  """Input shapes of every jax.nn.silu call (a `jit` named silu) in a jaxpr, nested ones too."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == "silu":
      shapes.append(tuple(eqn.invars[0].aval.shape))
      continue
    for value in eqn.params.values():
      for inner in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          shapes.extend(_silu_shapes(inner))
  return shapes


def _torch_op(op: Op):
  """(module or None, inputs as torch wants them) for `op`: NCHW for convs and group norms."""
  import torch
  from diffusers.models.attention_processor import Attention
  nchw = lambda shape: (shape[0], shape[-1], *shape[1:-1])
  shapes = [nchw(op.shapes[0]) if op.kind.startswith(("conv", "group")) else op.shapes[0],
            *op.shapes[1:]]
  module, channels = op.module, op.shapes[0][-1]
  if isinstance(module, nn.Conv):
    padding = module.padding
    padding = (0 if padding in ("SAME", "VALID") and module.kernel_size == (1, 1) else
               padding if isinstance(padding, int) else padding[0][0])
    torch_module = torch.nn.Conv2d(channels, module.features, module.kernel_size,
                                   module.strides or 1, padding)
  elif isinstance(module, nn.GroupNorm):
    torch_module = torch.nn.GroupNorm(module.num_groups, channels, module.epsilon)
  elif isinstance(module, nn.LayerNorm):
    torch_module = torch.nn.LayerNorm(channels, module.epsilon)
  elif isinstance(module, nn.Dense):
    torch_module = torch.nn.Linear(channels, module.features, bias=module.use_bias)
  elif isinstance(module, layers.Attention):
    torch_module = Attention(channels, op.shapes[1][-1] if len(op.shapes) > 1 else None,
                             heads=module.heads, dim_head=module.head_dim, bias=module.qkv_bias,
                             out_dim=module.out_features)
  else:
    torch_module = None
  generator = torch.Generator().manual_seed(0)
  return torch_module, [torch.randn(shape, generator=generator) for shape in shapes]


def op_functions(op: Op) -> dict:
  """Synchronous callables for `op`: {jax,torch} x {forward, forward+backward}; backward
  gives the first input's and the params' gradients (a UNet needs both)."""
  import torch
  rng = np.random.default_rng(0)
  inputs = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in op.shapes]
  if op.module is None:
    apply, variables = (lambda variables, *xs: jax.nn.silu(xs[0])), {}
  else:
    apply, variables = op.module.apply, jax.jit(op.module.init)(jax.random.key(0), *inputs)
  cotangent = jnp.asarray(rng.standard_normal(
      jax.eval_shape(apply, variables, *inputs).shape, dtype=np.float32))
  backward = jax.jit(jax.grad(lambda v, x, *rest: jnp.vdot(apply(v, x, *rest), cotangent),
                              argnums=(0, 1)))

  torch_module, torch_inputs = _torch_op(op)
  call = torch.nn.functional.silu if torch_module is None else torch_module
  torch_cotangent = torch.randn(call(*torch_inputs).shape)
  first = torch_inputs[0].requires_grad_(True)

  def torch_forward():
    with torch.no_grad():
      call(*torch_inputs)

  def torch_forward_backward():
    call(*torch_inputs).backward(torch_cotangent)
    first.grad = None
    if torch_module is not None:
      torch_module.zero_grad(set_to_none=True)

  return {"jax forward": synced(jax.jit(apply), variables, *inputs),
          "torch forward": torch_forward,
          "jax forward+backward": synced(backward, variables, *inputs),
          "torch forward+backward": torch_forward_backward}


def op_class(kind: str) -> str:
  return ("convolution" if kind.startswith("conv") else "attention"
          if kind.startswith("attention") else "matmul" if kind == "dense" else kind)


def section_ops(unets: Unets, args) -> dict:
  rows, totals = [], collections.defaultdict(lambda: collections.defaultdict(float))
  ops = {op: count for op, count in unet_ops(unets).items()
         if not args.op_kinds or op.kind.startswith(tuple(args.op_kinds.split(",")))}
  for op, count in sorted(ops.items(), key=lambda item: (item[0].kind, item[0].shapes)):
    times = interleaved_best(op_functions(op), args.repeats, args.seconds)
    rows.append({"op": op.kind, "shapes": op.shapes, "count": count, **times})
    for key, seconds in times.items():
      totals[op_class(op.kind)][key] += count * seconds
    print(_row(f"{_label(op)} ×{count}", times), flush=True)
  print("per class, × count:")
  for name, times in totals.items():
    print(_row(f"  {name}", times))
  print(_row("  all ops", {key: sum(t[key] for t in totals.values())
                           for key in next(iter(totals.values()))}), flush=True)
  return {"ops": rows, "op_class_totals": {k: dict(v) for k, v in totals.items()}}


def _label(op: Op) -> str:
  """'conv 3x3 4x32x32x64->128/2': the kind, input shapes, output features, stride."""
  shapes = "+".join("x".join(map(str, shape)) for shape in op.shapes)
  features = getattr(op.module, "features", None)
  stride = np.max(getattr(op.module, "strides", None) or 1)
  return (f"{op.kind} {shapes}" + (f"->{features}" if features else "")
          + (f"/{stride}" if stride > 1 else "")
          + (f" eps {op.module.epsilon:g}" if isinstance(op.module, nn.GroupNorm) else ""))


def _row(label: str, times: dict) -> str:
  """label, then ms of JAX and PyTorch forward and forward+backward and JAX/PyTorch ratios."""
  ms = lambda key: f"{1e3 * times[key]:9.3f}"
  ratio = lambda mode: f"{times[f'jax {mode}'] / times[f'torch {mode}']:6.2f}"
  return (f"{label:58s} fwd {ms('jax forward')} {ms('torch forward')} ({ratio('forward')}x)  "
          f"fwd+bwd {ms('jax forward+backward')} {ms('torch forward+backward')} "
          f"({ratio('forward+backward')}x)")


# ---------------------------------------------------------------------------------------------
# Section breakdown: one UNet forward + backward by op class.
# ---------------------------------------------------------------------------------------------


def hlo_instructions(hlo_text: str) -> dict:
  """{instruction name: (opcodes, op_names)} of an optimised HLO module's text, where an
  instruction that calls computations (a fusion, a loop) holds the opcodes and op_names of
  everything it calls, its own opcode first."""
  computations, body, own = {}, None, {}
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%(\S+) .*\{$", line)
    if header:
      body = computations.setdefault(header.group(1), [])
      continue
    match = re.match(r"\s*(?:ROOT )?%(\S+) = .*?\s([a-z][\w-]*)\(", line)
    if body is None or not match:
      continue
    name, opcode = match.groups()
    body.append(name)
    own[name] = (opcode, re.findall(r'op_name="([^"]*)"', line),
                 re.findall(r"(?:calls|to_apply|body|condition)=%([\w.-]+)", line))

  def contents(name, seen):
    opcode, op_names, called = own[name]
    opcodes, names = [opcode], list(op_names)
    for computation in called:
      if computation in seen:
        continue
      seen.add(computation)
      for inner in computations.get(computation, ()):
        inner_opcodes, inner_names = contents(inner, seen)
        opcodes += inner_opcodes
        names += inner_names
    return opcodes, names

  return {name: contents(name, set()) for name in own}


def module_classes(unets: Unets) -> dict:
  """{module path as in HLO op_names ('down_blocks.0.resnets.0/norm1'): op class} of the
  UNet's Conv, GroupNorm, LayerNorm, Attention and Dense modules."""
  classes = {}

  def record(next_fn, args, kwargs, context):
    name = type(context.module).__name__
    if context.method_name == "__call__" and name in _MODULE_CLASSES:
      classes["/".join(context.module.path)] = _MODULE_CLASSES[name]
    return next_fn(*args, **kwargs)

  sample, timesteps, context, _ = unets.inputs
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: unets.model.apply({"params": p}, sample, timesteps, context),
                   unets.params)
  return classes


def classify_instruction(opcodes: list, op_names: list, modules: dict) -> str | None:
  """The op class of one HLO instruction (with what it calls): convolutions and dots first,
  then pure data movement, then by the Flax module its op_names come from. None for a loop
  or a call: the instructions inside run (and are traced) as thunks of their own."""
  if opcodes[0] in ("while", "conditional", "call"):
    return None
  opcodes = set(opcodes)
  owners = set()
  for op_name in op_names:
    for one in op_name.split(";"):
      # 'jit(f)/transpose(jvp(UNet2DConditionModel))/down_blocks.0.resnets.0/norm1/mul'
      path = re.split(r"UNet2DConditionModel\)*/", one)[-1].split("/")
      prefixes = ("/".join(path[:i]) for i in range(len(path) - 1, 0, -1))
      owners.add(next((modules[p] for p in prefixes if p in modules), None))
  if "convolution" in opcodes:
    return "convolution"
  if "dot" in opcodes:
    return "attention" if "attention" in owners else "matmul"
  if opcodes <= _LAYOUT_OPS:
    return "transpose/copy"
  for name in ("group norm", "layer norm", "attention"):
    if name in owners:
      return name
  if "logistic" in opcodes:
    return "silu"
  return "elementwise/other"


def _trace_events(function, calls: int) -> dict:
  """{HLO instruction: total ns} of `calls` runs of a compiled function, from a trace."""
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(calls):
        function()
    (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  totals = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          totals[stats["hlo_op"]] += event.duration_ns
  return totals


def torch_class(name: str) -> str:
  """The op class of an aten op, by name."""
  name = name.lower()
  for needle, kind in (("conv", "convolution"), ("group_norm", "group norm"),
                       ("layer_norm", "layer norm"), ("scaled_dot_product", "attention"),
                       ("flash_attention", "attention"), ("softmax", "attention"),
                       ("baddbmm", "attention"), ("silu", "silu"), ("addmm", "matmul"),
                       ("::mm", "matmul"), ("bmm", "matmul"), ("matmul", "matmul"),
                       ("linear", "matmul"), ("copy", "transpose/copy"),
                       ("clone", "transpose/copy"), ("contiguous", "transpose/copy"),
                       ("cat", "transpose/copy")):
    if needle in name:
      return kind
  return "elementwise/other"


def section_breakdown(unets: Unets, functions: dict, compiled, args) -> dict:
  import torch
  calls = max(2, args.repeats)
  instructions = hlo_instructions(compiled.as_text())
  modules = module_classes(unets)
  functions["jax forward+backward"]()
  events = _trace_events(functions["jax forward+backward"], calls)
  jax_classes, top = collections.Counter(), []
  for name, nanoseconds in events.items():
    opcodes, op_names = instructions.get(name, (["?"], []))
    kind = classify_instruction(opcodes, op_names, modules)
    if kind is None:
      continue
    jax_classes[kind] += nanoseconds / calls / 1e9
    top.append((nanoseconds / calls / 1e9, name, kind, op_names[-1] if op_names else ""))

  functions["torch forward+backward"]()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(calls):
      functions["torch forward+backward"]()
  torch_classes = collections.Counter()
  for event in profile.key_averages():
    torch_classes[torch_class(event.key)] += event.self_cpu_time_total / calls / 1e6
  print(f"one UNet forward+backward by op class (ms; JAX from a trace, PyTorch's aten self "
        f"time), mean of {calls} runs:")
  for kind in CLASSES:
    print(f"  {kind:20s} jax {1e3 * jax_classes[kind]:9.2f}  torch "
          f"{1e3 * torch_classes[kind]:9.2f}")
  print(f"  {'sum':20s} jax {1e3 * sum(jax_classes.values()):9.2f}  torch "
        f"{1e3 * sum(torch_classes.values()):9.2f}")
  print("JAX's 12 costliest HLO instructions (ms, class, op_name):")
  for seconds, name, kind, op_name in sorted(top, reverse=True)[:12]:
    print(f"  {1e3 * seconds:8.2f} {name:32s} {kind:18s} {op_name[-90:]}")
  return {"breakdown_jax": dict(jax_classes), "breakdown_torch": dict(torch_classes),
          "breakdown_jax_top": [t[:3] for t in sorted(top, reverse=True)[:20]]}


# ---------------------------------------------------------------------------------------------
# Section step: the DPO step against its own UNet passes.
# ---------------------------------------------------------------------------------------------


def section_step(unets: Unets, unet_times: dict, args) -> dict:
  spec = importlib.util.spec_from_file_location("synthetic",
                                                os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = {}
  passes = unet_times["jax forward+backward"] + unet_times["jax forward"]
  for reference_pass in ("shared", "separate"):
    config = module.get_config()
    config.model.unet = unets.config
    config.data.resolution = 8 * args.latent
    config.train.batch_pairs = args.batch // 2
    config.dpo.reference_pass = reference_pass
    result = bench.bench(config, steps=args.steps, warmup=1)
    results[reference_pass] = {"step_seconds": result["step_seconds"],
                               "step_over_unet_passes": result["step_seconds"] / passes}
    print(f"DPO step, reference_pass={reference_pass}: {1e3 * result['step_seconds']:.1f} ms; "
          f"its UNet passes (forward+backward + forward, batch {args.batch}): "
          f"{1e3 * passes:.1f} ms; ratio {result['step_seconds'] / passes:.3f}", flush=True)
  return {"step": results, "unet_passes_seconds": passes}


# ---------------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--channels", default="64,128,256")
  parser.add_argument("--latent", type=int, default=32)
  parser.add_argument("--batch", type=int, default=4, help="images (a DPO step: 2 × pairs)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=0.3, help="least time of one sample")
  parser.add_argument("--steps", type=int, default=5, help="timed DPO steps (section step)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--tiny", action="store_true", help="channels 32,64 and 8x8 latents")
  parser.add_argument("--op-kinds", default="",
                      help="section ops: only these kinds, e.g. 'group norm,conv 3x3'")
  parser.add_argument("--jax-only", action="store_true",
                      help="section unet without PyTorch (to compare XLA_FLAGS settings)")
  args = parser.parse_args()
  if args.tiny:
    args.channels, args.latent, args.seconds = "32,64", 8, 0.01
  sections = args.sections.split(",")
  if set(sections) - set(SECTIONS):
    parser.error(f"--sections: one or more of {','.join(SECTIONS)}")

  import torch
  torch.set_num_threads(args.threads)
  unets = make_unets(unet_config(tuple(int(c) for c in args.channels.split(","))), args.batch,
                     args.latent)
  result = {"channels": args.channels, "latent": args.latent, "batch": args.batch,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
            "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()[0]}
  if "ops" in sections:
    result.update(section_ops(unets, args))
  functions, compiled = unet_functions(unets)
  if {"unet", "step"} & set(sections):
    times = interleaved_best({k: f for k, f in functions.items()
                              if not (args.jax_only and k.startswith("torch"))},
                             args.repeats, args.seconds)
    print(f"UNet, batch {args.batch}, {args.latent}x{args.latent} latents (ms): " + ", ".join(
        f"{key} {1e3 * seconds:.1f}" for key, seconds in times.items()), flush=True)
    result["unet"] = times
  if "breakdown" in sections:
    result.update(section_breakdown(unets, functions, compiled, args))
  if "step" in sections:
    result.update(section_step(unets, result["unet"], args))
  result["loadavg_end"] = os.getloadavg()[0]
  print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
  main()
