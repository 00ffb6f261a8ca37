#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM pod slice: the same command on every worker at once.
#
#   launch/tpu_pod.sh --setup TPU_NAME ZONE      # once: this checkout, installed on every worker
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/sdxl.py /mnt/shared/runs/sdxl \
#            --config.data.train_files='/mnt/shared/pickapic_v2/train-*.parquet'
#
# --setup copies this checkout's files (tracked and untracked, less what git ignores) to
# REPO_DIR (default ~/dpo_jax) on every worker and installs it there with the TPU extra
# (jax[tpu]) into REPO_DIR/.venv, made by SETUP_PYTHON (default python3; current jax needs
# Python 3.11+), which runs then use; rerun it after changing the code. It does not start
# the TPU, so it may run while another program holds it.
# Without --setup, the repository must be at REPO_DIR on every worker with its dependencies
# installed for PYTHON (default: REPO_DIR/.venv/bin/python if present, else python3), and
# WORKDIR and the data on a filesystem all workers share at the same path (Filestore, or a
# GCS bucket mounted with Cloud Storage FUSE): every host writes its part of one orbax
# checkpoint and reads its own share of the data. Re-running the command resumes the run.
# MODULE=dpo_jax.prepare writes the latent cache instead, each worker its share, with WORKDIR
# as its --output.
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  echo "       $0 --setup TPU_NAME ZONE" >&2
  exit 2
}

repo_dir=${REPO_DIR:-'~/dpo_jax'}  # Quoted: ~ expands on the workers, not here.
setup_python=${SETUP_PYTHON:-python3}  # The workers' interpreter for the venv.

setup() {
  local tpu_name=$1 zone=$2 checkout archive
  checkout=$(dirname "$0")/..
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' EXIT
  archive=$staging/dpo_jax_source.tar.gz
  git -C "$checkout" ls-files -z --cached --others --exclude-standard \
    | tar -C "$checkout" --null -T - -czf "$archive"
  gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:dpo_jax_source.tar.gz" --zone="$zone" \
    --worker=all
  gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all --command="set -e
    mkdir -p $repo_dir && tar -xzf ~/dpo_jax_source.tar.gz -C $repo_dir && rm ~/dpo_jax_source.tar.gz
    cd $repo_dir && $setup_python -m venv .venv && .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[tpu]'
    .venv/bin/python -c 'import dpo_jax, jax, libtpu; print(\"installed: jax\", jax.__version__)'"
}

if [[ ${1:-} == --setup ]]; then
  (( $# == 3 )) || usage
  setup "$2" "$3"
  exit 0
fi
(( $# >= 4 )) || usage
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
module=${MODULE:-dpo_jax.main}
folder_flag=--workdir
[[ $module == dpo_jax.prepare ]] && folder_flag=--output
# Resolved on each worker: PYTHON, else the venv --setup made, else python3.
python=${PYTHON:-'$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)'}

# Quoted once here so globs and spaces in the arguments reach the workers' shell intact.
args=$(printf '%q ' --config="$config" "$folder_flag=$workdir" "$@")
# multi_process=true: a pod's topology lives in the TPU metadata server rather than in the
# environment, so tell dpo_jax to call jax.distributed.initialize(), which reads it.
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="cd $repo_dir && $python -m $module $args --config.distributed.multi_process=true"
