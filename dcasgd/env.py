"""Where a worker learns its job: arguments first, then the usual environment variables.

The same training script runs under ``dcasgd launch``, docker compose, torchrun,
SLURM or Kubernetes because each of them sets one of these variables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

SERVERS = "DCASGD_SERVERS"
_EXAMPLE = "tcp://10.0.0.1:5555,tcp://10.0.0.2:5555"
WORKER_ID = ("DCASGD_WORKER_ID", "RANK", "SLURM_PROCID")
NUM_WORKERS = ("DCASGD_NUM_WORKERS", "WORLD_SIZE", "SLURM_NTASKS")
IPC_PATH_MAX = 107  # bytes in an ipc:// path: a Unix socket address (sun_path) holds 108 with the final NUL


class JobConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable to set."""


@dataclass(frozen=True)
class WorkerEnv:
    """This worker's place in the job."""

    servers: tuple[str, ...]
    worker_id: int
    num_workers: int


def _int_from(names: Sequence[str], what: str) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            try:
                return int(value)
            except ValueError:
                raise JobConfigError(f"{name}={value!r} is not an integer ({what})") from None
    raise JobConfigError(f"{what} is not set: pass it as an argument or set {', '.join(names[:-1])} or {names[-1]}")


def parse_servers(
    servers: str | Sequence[str] | None, *, or_else: str | None = "pass servers=[...]"
) -> tuple[str, ...]:
    """Shard endpoints in shard order, from ``servers`` or ``DCASGD_SERVERS`` (comma-separated).

    ``or_else``: the other way to give them, for the message when neither is there (None: there is none,
    as for ``dcasgd worker``, which reads the environment only).
    """
    if servers is None:
        servers = os.environ.get(SERVERS, "")
        if not servers.strip():
            how = f"set {SERVERS} to the shards' endpoints in shard order, comma-separated (e.g. {_EXAMPLE})"
            raise JobConfigError(f"no servers: {how}" + (f", or {or_else}" if or_else else ""))
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    servers = tuple(servers)
    if not servers:
        raise JobConfigError("the list of servers is empty")
    for endpoint in servers:
        check_endpoint(endpoint)
    return servers


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint; None for other transports and Linux's abstract ``ipc://@name``."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return endpoint[len("ipc://") :]


def check_endpoint(endpoint: str) -> str:
    """``endpoint``, or a JobConfigError for one ZeroMQ would refuse with a bare errno (a too-long ipc path)."""
    path = ipc_path(endpoint)
    if path is not None and len(os.fsencode(path)) > IPC_PATH_MAX:
        raise JobConfigError(
            f"{endpoint}: an ipc:// path may be at most {IPC_PATH_MAX} bytes (the limit of a Unix socket "
            f"address), this one has {len(os.fsencode(path))}; put the socket in a shorter directory"
        )
    return endpoint


def worker_id_from_environment() -> int | None:
    """The worker id that ``DCASGD_WORKER_ID``, ``RANK`` or ``SLURM_PROCID`` gives (the first set), or None."""
    if not any(os.environ.get(name, "").strip() for name in WORKER_ID):
        return None
    wid = _int_from(WORKER_ID, "the worker id")
    if wid < 0:
        raise JobConfigError(f"worker id {wid} is negative")
    return wid


def resolve(
    servers: str | Sequence[str] | None = None, worker_id: int | None = None, num_workers: int | None = None
) -> WorkerEnv:
    """Fill what the caller did not give from the environment; raise JobConfigError naming what is missing."""
    servers = parse_servers(servers)
    wid = worker_id if worker_id is not None else _int_from(WORKER_ID, "the worker id")
    n = num_workers if num_workers is not None else _int_from(NUM_WORKERS, "the number of workers")
    if n < 1:
        raise JobConfigError(f"the number of workers must be >= 1, got {n}")
    if not 0 <= wid < n:
        raise JobConfigError(f"worker id {wid} is not in [0, {n})")
    return WorkerEnv(servers, wid, n)
