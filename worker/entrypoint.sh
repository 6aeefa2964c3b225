#!/bin/sh
# Entry point of the worker image: runs its arguments (the training command) under `dcasgd worker`,
# which gives the worker an id, passes signals on, and reports the command's exit status to the shards
# before exiting with it.
# The id: DCASGD_WORKER_ID (or RANK, SLURM_PROCID) when set; else a Kubernetes Indexed Job's
# JOB_COMPLETION_INDEX; else claimed from shard 0 under DCASGD_WORKER_NAME, by default this container's
# host name (unique per container, and kept when the container restarts: so is its id).
set -eu
if [ -z "${DCASGD_WORKER_ID:-}" ] && [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
    DCASGD_WORKER_ID=$JOB_COMPLETION_INDEX
    export DCASGD_WORKER_ID
fi
DCASGD_WORKER_NAME=${DCASGD_WORKER_NAME:-$(uname -n)}
export DCASGD_WORKER_NAME
exec dcasgd worker -- "$@"
