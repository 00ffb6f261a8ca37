#!/usr/bin/env bash
# One prepared pass over the GPU path, for a lent single-GPU machine with a short lease:
# the SD1.5 DPO step at 512 px in bf16 (cuDNN and XLA attention, shared and separate
# reference passes), policy/reference agreement at full width, and the SDXL step at 1024 px.
# Each run is bounded; runs that would not finish before DEADLINE seconds are skipped.
# Results: one JSON line per run in $OUT/results.jsonl (logs in $OUT/bench.log).
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh            # on the GPU machine
#   SMOKE=1 OUT=/tmp/out bash benchmarks/gpu_check.sh    # the same runs, CPU-sized
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
START=$(date +%s)

python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

# run SECONDS NAME COMMAND...: skipped when fewer than SECONDS remain before the deadline.
run() {
  local budget=$1 name=$2; shift 2
  local left=$((DEADLINE - ($(date +%s) - START)))
  if (( left < budget )); then echo "skip $name: ${left}s left"; return; fi
  echo "== $name ($(($(date +%s) - START))s in)"
  timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(tail -c 1500 "$OUT/$name.log" | tail -n 1)"
  tail -n 1 "$OUT/$name.log" | grep '^{' | sed "s/^{/{\"run\": \"$name\", /" >> "$OUT/results.jsonl"
  tail -n 5 "$OUT/$name.log" >> "$OUT/bench.log"
}

if [[ -n "${SMOKE:-}" ]]; then
  SD15=(--config configs/synthetic.py --config.train.batch_pairs=2)
  SDXL=(--config configs/synthetic.py --config.train.batch_pairs=2 --config.model.remat=true)
  AGREE=(--preset sd15 --size 8 --width-divisor 10 --batches 1)
  CUDNN=()  # No cuDNN on a CPU: the runs keep XLA's attention.
else
  SD15=(--config configs/sd15.py --unet sd15 --config.train.batch_pairs=8
        --config.train.grad_accum=1)
  SDXL=(--config configs/sdxl.py --unet sdxl --config.train.batch_pairs=2
        --config.train.grad_accum=1 --config.mesh.fsdp=1)
  AGREE=(--preset sd15 --size 64 --pairs 2 --batches 2)
  CUDNN=(--config.model.attention_implementation=cudnn)
fi
BENCH=(python3 -m dpo_jax.bench --steps 5 --warmup 1)

run 300 sd15_cudnn_shared "${BENCH[@]}" "${SD15[@]}" "${CUDNN[@]}"
run 120 sd15_agreement python3 benchmarks/reference_agreement.py "${AGREE[@]}"
run 120 sd15_xla_shared "${BENCH[@]}" "${SD15[@]}"
run 120 sd15_cudnn_separate "${BENCH[@]}" "${SD15[@]}" \
    "${CUDNN[@]}" --config.dpo.reference_pass=separate
run 200 sdxl_cudnn_shared "${BENCH[@]}" "${SDXL[@]}" "${CUDNN[@]}"
echo "done in $(($(date +%s) - START))s"
