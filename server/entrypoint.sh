#!/bin/sh
# Entry point of the shard image: runs its arguments (`dcasgd server ...`) with two additions:
#  - --resume when --checkpoint-dir already holds a checkpoint of this --shard (a restarted container
#    or pod); the first start has none, and `dcasgd server --resume` with none would exit 2. The server
#    then continues the job whose checkpoints are there (the job id in their headers) and refuses, exit
#    2, a directory holding checkpoints of two jobs: the same rule as `dcasgd server` run by hand;
#  - --curve-secret-key/--curve-clients from DCASGD_CURVE_SECRET_KEY/DCASGD_CURVE_CLIENTS when set.
set -eu
dir="" shard=0 prev=""
for arg in "$@"; do
    case "$prev" in
        --checkpoint-dir) dir=$arg ;;
        --shard) shard=$arg ;;
    esac
    case "$arg" in
        --checkpoint-dir=*) dir=${arg#*=} ;;
        --shard=*) shard=${arg#*=} ;;
    esac
    prev=$arg
done
if [ -n "$dir" ] && ls "$dir"/shard"$shard"-v*.ckpt > /dev/null 2>&1; then
    echo "dcasgd-entrypoint: checkpoint of shard $shard found in $dir: resuming" >&2
    set -- "$@" --resume
fi
key=${DCASGD_CURVE_SECRET_KEY:-} clients=${DCASGD_CURVE_CLIENTS:-}
if [ -n "$key" ] && [ -n "$clients" ]; then
    set -- "$@" --curve-secret-key "$key" --curve-clients "$clients"
elif [ -n "$key$clients" ]; then
    echo "dcasgd-entrypoint: set both DCASGD_CURVE_SECRET_KEY and DCASGD_CURVE_CLIENTS, or neither" >&2
    exit 2
fi
exec "$@"
