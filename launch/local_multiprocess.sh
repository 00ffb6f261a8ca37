#!/usr/bin/env bash
# Simulates a multi-host run on this one machine: N processes of dpo_jax.main joined by
# jax.distributed through a coordinator on 127.0.0.1, each driving its own CPU device(s).
# It exercises what only multi-host runs do (per-host data slices, cross-process collectives,
# process-0-only logging, coordinated checkpoints) without a cluster.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/local_multiprocess.sh 2 configs/demo.py /tmp/run --config.train.steps=4
#
# Every process gets the same WORKDIR, as hosts sharing a filesystem would. More devices per
# process: XLA_FLAGS=--xla_force_host_platform_device_count=4. PORT picks the coordinator port,
# PYTHON the interpreter (default: python3 on PATH, e.g. an activated .venv). MODULE=
# dpo_jax.prepare writes the latent cache instead, with WORKDIR as its --output.
set -euo pipefail

if (( $# < 3 )); then
  echo "usage: $0 N CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
num_processes=$1 config=$2 workdir=$3
shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python3}
module=${MODULE:-dpo_jax.main}
folder_flag=--workdir
[[ $module == dpo_jax.prepare ]] && folder_flag=--output

# CPU by default: on a GPU machine every process would otherwise claim every GPU.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# Cross-process collectives on CPU need an implementation; gloo is JAX's (0.10) default, made
# explicit so older or differently configured installs behave the same.
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}

pids=()
for ((i = 0; i < num_processes; i++)); do
  "$python" -m "$module" --config="$config" "$folder_flag=$workdir" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$i" "$@" &
  pids+=($!)
done

# Poll rather than `wait` in order: the survivors of a failed process would block in a
# collective until JAX's heartbeat timeout, so stop them at the first failure.
status=0
while (( ${#pids[@]} )); do
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      wait "${pids[i]}" || status=$?
      unset 'pids[i]'
    fi
  done
  if (( status )); then
    echo "$0: a process failed (exit $status); stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait || true
exit "$status"
