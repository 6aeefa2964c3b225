"""``dcasgd worker -- COMMAND``: run a training command as one worker of a job.

What a container of a scaled service needs around its training script:

1. an id: the one the environment gives (``DCASGD_WORKER_ID``, ``RANK``, ``SLURM_PROCID``),
   else one claimed from shard 0 under this worker's name (``--name``,
   ``DCASGD_WORKER_NAME``, else ``<host name>-<pid>``; the worker image's entry script
   uses the container's host name, which is unique per container and survives a
   restart of it, so a restarted container gets its id back);
2. the command, run with ``DCASGD_WORKER_ID`` (and ``DCASGD_NUM_WORKERS``) set, in its own
   process group: SIGTERM, SIGINT and SIGHUP are passed on to the group, and on Linux
   the command is killed if this process dies;
3. its end, reported to every shard (``done`` with the exit status), so that a sync round
   stops waiting for it and shards run with ``--exit-when-done`` exit once every worker
   has finished; then this process exits with the command's status (a signal N: 128 + N).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from . import env as job_env
from .client import Client, DcasgdError, ServerError, claim_worker_id, wait_for_shard
from .processes import die_with_parent, exit_code, killpg_quietly
from .protocol import NO_WORKER_ID
from .security import SecurityError

NAME = "DCASGD_WORKER_NAME"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def default_name() -> str:
    """``DCASGD_WORKER_NAME``, else ``<host name>-<pid>`` (unique among the live processes of a host)."""
    return os.environ.get(NAME, "").strip() or f"{socket.gethostname()}-{os.getpid()}"


def _first_set(names: Sequence[str]) -> str | None:
    return next((n for n in names if os.environ.get(n, "").strip()), None)


def assign_id(servers: Sequence[str], name: str, timeout: float) -> tuple[int, dict[str, str]]:
    """This worker's id and the variables to add to the command's environment.

    Waits up to ``timeout`` s for shard 0. Raises :class:`dcasgd.env.JobConfigError` or
    :class:`dcasgd.client.DcasgdError` with a message that says what to fix.
    """
    worker = job_env.worker_id_from_environment()  # the launcher chose (torchrun, SLURM, an Indexed Job)
    if worker is None:
        reply = claim_worker_id(servers[0], name, timeout=timeout)
        worker, total = reply["worker"], reply["num_workers"]
    else:
        total = wait_for_shard(servers[0], timeout=timeout)["num_workers"]
        if worker >= total:
            variable = _first_set(job_env.WORKER_ID)
            raise job_env.JobConfigError(
                f"worker id {worker} (from {variable}) is not in [0, {total}): the shards run a job of {total} workers"
            )
    declared = _first_set(job_env.NUM_WORKERS)
    if declared is not None and os.environ[declared].strip() != str(total):
        raise job_env.JobConfigError(
            f"{declared}={os.environ[declared].strip()}, but the shards run a job of {total} workers"
        )
    return worker, {"DCASGD_WORKER_ID": str(worker), "DCASGD_NUM_WORKERS": str(total)}


def report_done(servers: Sequence[str], worker: int, status: int, timeout: float) -> str:
    """Tell every shard that ``worker`` ended with ``status``; returns what happened, for the log."""
    try:
        with Client(servers, worker, timeout=timeout, retries=1, reconnect_timeout=0) as client:
            replies = client.done(status)
    except (DcasgdError, SecurityError) as exc:
        return f"could not report the end to the shards: {exc}"
    return f"reported to {len(replies)} shards ({replies[0]['finished']} of {replies[0]['num_workers']} finished)"


def run_worker(
    command: Sequence[str],
    *,
    name: str | None = None,
    claim_timeout: float = 120.0,
    report_timeout: float = 3.0,
) -> int:
    """Run ``command`` as a worker of the job in ``DCASGD_SERVERS``; returns its exit code.

    ``claim_timeout``: seconds to wait for shard 0 to hand out an id (or, for an id that the
    environment gives, to answer at all: the id is checked against the job's size).
    ``report_timeout``: seconds per try (two tries) to report the end to the shards; if they
    do not answer, a message says so and the command's status is returned all the same.
    """
    name = name or default_name()
    try:
        servers = job_env.parse_servers(None, or_else=None)  # the command has no option for them
        worker, extra = assign_id(servers, name, claim_timeout)
    except (job_env.JobConfigError, SecurityError) as exc:
        print(f"dcasgd worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except DcasgdError as exc:
        print(f"dcasgd worker: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ServerError) and exc.code == NO_WORKER_ID else 1
    how = "from the environment" if job_env.worker_id_from_environment() is not None else f"claimed as {name!r}"
    print(f"dcasgd worker: worker id {worker} ({how})", file=sys.stderr, flush=True)
    try:
        child = subprocess.Popen(
            list(command), env={**os.environ, **extra}, start_new_session=True, preexec_fn=die_with_parent()
        )
    except OSError as exc:
        print(f"dcasgd worker: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        status = 127
    else:

        def forward(signum: int, _frame: Any) -> None:
            killpg_quietly(child.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
        try:
            if hasattr(os, "WNOWAIT"):  # wait, but leave the child a zombie: its group id cannot be reused yet
                os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            killpg_quietly(child.pid, signal.SIGKILL)  # what the command left behind in its group
            status = exit_code(child.wait())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print(
        f"dcasgd worker: worker {worker} exited with status {status}; "
        f"{report_done(servers, worker, status, report_timeout)}",
        file=sys.stderr,
        flush=True,
    )
    return status
