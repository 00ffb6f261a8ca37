#!/usr/bin/env bash
# A stand-in for the gcloud CLI, for tests (tests/test_launch.py): records each call's
# arguments, NUL-separated, in $FAKE_GCLOUD_LOG/N.args (N counts from 0), and keeps the file
# that a `compute tpus tpu-vm scp FILE DEST` call would copy as $FAKE_GCLOUD_LOG/N.scp.
set -euo pipefail

log=${FAKE_GCLOUD_LOG:?set FAKE_GCLOUD_LOG to a folder}
call=$(find "$log" -name '*.args' | wc -l)
printf '%s\0' "$@" > "$log/$call.args"
if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm scp" ]]; then
  cp "$5" "$log/$call.scp"
fi
