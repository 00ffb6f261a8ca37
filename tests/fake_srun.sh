#!/usr/bin/env bash
# A stand-in for SLURM's srun inside an allocation, for tests (tests/test_launch.py): starts
# SLURM_NTASKS copies of the command on this machine, one node named by SLURM_NODELIST, each
# with the variables srun gives a task (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST, ...),
# and fails as `srun --kill-on-bad-exit=1` does: the first failing task stops the others.
set -uo pipefail

while [[ ${1:-} == -* ]]; do
  case $1 in
    --kill-on-bad-exit=1) shift ;;
    *) echo "fake srun: option $1 is not simulated" >&2; exit 2 ;;
  esac
done
tasks=${SLURM_NTASKS:?the allocation (sbatch) sets SLURM_NTASKS}
export SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_NODEID=0 SLURM_STEP_NUM_NODES=1
export SLURM_STEP_NODELIST=$SLURM_NODELIST SLURMD_NODENAME=$SLURM_NODELIST
export SLURM_STEP_NUM_TASKS=$tasks SLURM_STEP_TASKS_PER_NODE=$tasks
export SLURM_LAUNCH_NODE_IPADDR=127.0.0.1

pids=()
for ((task = 0; task < tasks; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
  pids+=($!)
done
status=0
while (( ${#pids[@]} )) && (( status == 0 )); do
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      wait "${pids[i]}" || status=$?
      unset 'pids[i]'
    fi
  done
  sleep 0.5
done
(( ${#pids[@]} )) && kill "${pids[@]}" 2>/dev/null
wait
exit "$status"
