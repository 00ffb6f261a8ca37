#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM pod slice: the same command on every worker at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/sdxl.py /mnt/shared/runs/sdxl \
#            --config.data.train_files='/mnt/shared/pickapic_v2/train-*.parquet'
#
# Needs this repository at the same path on every worker (REPO_DIR, default ~/dpo_jax) with its
# dependencies installed for PYTHON (default python3; e.g. PYTHON=~/venv/bin/python), and
# WORKDIR and the data on a filesystem all workers share (Filestore or a GCS FUSE mount): every
# host writes its part of one orbax checkpoint. Re-running the command resumes the run.
# MODULE=dpo_jax.prepare writes the latent cache instead, each worker its share, with WORKDIR
# as its --output.
set -euo pipefail

if (( $# < 4 )); then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo_dir=${REPO_DIR:-'~/dpo_jax'}  # Quoted: ~ expands on the workers, not here.
python=${PYTHON:-python3}
module=${MODULE:-dpo_jax.main}
folder_flag=--workdir
[[ $module == dpo_jax.prepare ]] && folder_flag=--output

# Quoted once here so globs and spaces in the arguments reach the workers' shell intact.
args=$(printf '%q ' --config="$config" "$folder_flag=$workdir" "$@")
# multi_process=true: a pod's topology lives in the TPU metadata server rather than in the
# environment, so tell dpo_jax to call jax.distributed.initialize(), which reads it.
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="cd $repo_dir && $python -m $module $args --config.distributed.multi_process=true"
