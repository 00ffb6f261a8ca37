"""Test-wide setup: JAX on the CPU with 8 fake devices (sharding tests), quiet oracles."""
import os
import tempfile

import subprocesses

# Must happen before JAX initialises its backends. The compile flags: see subprocesses.
os.environ.setdefault("XLA_FLAGS", " ".join(
    ["--xla_force_host_platform_device_count=8", subprocesses.compile_flags()]).strip())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU's backend (LLVM) at its lowest optimisation level: compiling the tests' tiny UNets
# dominates their time, and running them unoptimised does not. Only code generation changes
# (here and in the older fusion emitter of `subprocesses.compile_flags`);
# XLA's HLO passes (fusion, layouts, bfloat16 normalisation, buffer assignment) run as in a
# user's run, so the programs compute what a user's would (tests/subprocesses.py does the same
# for the command-line runs, except those run with `optimize=True`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs go to a disk cache that the xdist workers and the tests' subprocesses
# share: a test that compiles a train step a second time (a resumed run) reads it back
# instead. (The subprocesses run with other XLA_FLAGS, their own device counts, so they
# share entries among themselves, not with this process.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dpo_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
