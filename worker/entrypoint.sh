#!/bin/sh
# Entry point of the worker image: runs its arguments (the training command). The worker id comes from
# DCASGD_WORKER_ID (docker compose sets it per service), else from a Kubernetes Indexed Job's
# JOB_COMPLETION_INDEX, else RANK/SLURM_PROCID as dcasgd reads them itself.
set -eu
if [ -z "${DCASGD_WORKER_ID:-}" ] && [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
    DCASGD_WORKER_ID=$JOB_COMPLETION_INDEX
    export DCASGD_WORKER_ID
fi
exec "$@"
