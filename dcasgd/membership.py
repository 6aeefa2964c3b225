"""Who the workers of a job are, and which of them have finished; no sockets.

Containers started by ``docker compose up --scale worker=N`` are alike: none knows its
index. Each asks shard 0 for an id under a name of its own (its container's host
name); :class:`Membership` hands out the lowest free id in ``[0, num_workers)`` and
gives the same name the same id again, so a restarted container keeps its id (and its
sequence numbers). An id that a worker uses without claiming it (one that ``DCASGD_WORKER_ID``,
``RANK`` or ``SLURM_PROCID`` gave) is recorded as held too, when the shard first sees a request
from it, so a claim never hands it out again: two workers with one id would lose each other's
pushes as duplicates. When a worker's command ends, its wrapper reports the exit status
(``done``); once every worker has, the job is over and a shard started with
``--exit-when-done`` exits.

Under CURVE each peer has a key (its public key, as the ZAP handler reports it), and a worker
id belongs to the key that first used it in the run, by a claim or by any request that names
it: a request with another key for that id is :class:`Forbidden`, claims and ``done`` included.
Without CURVE there are no keys, and any peer can act as any worker.
"""

from __future__ import annotations

from typing import Any


class NoFreeWorkerId(Exception):
    """Every id of the job is held by another name."""


class Forbidden(Exception):
    """A worker id is used with a client key other than the one that first used it."""


class Membership:
    """Worker ids by name, and the exit status each finished worker reported."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.names: dict[str, int] = {}  # name -> id, in claim order
        self.unnamed: set[int] = set()  # ids in use by workers that were given them, not claimed
        self._seen: set[int] = set()  # ids that seen() already looked at: every request calls it
        self.finished: dict[int, int] = {}  # id -> exit status (0..255)
        self.owners: dict[int, str] = {}  # id -> the client key (CURVE public key, Z85) that first used it

    def check_owner(self, worker: int, key: str | None) -> None:
        """Raise :class:`Forbidden` if ``worker`` belongs to a key other than ``key`` (None: no CURVE, no check)."""
        if key is None:
            return
        owner = self.owners.get(worker)
        if owner is not None and owner != key:
            raise Forbidden(
                f"worker id {worker} belongs to another client key in this run (the key that first used it); "
                "each worker id is used by one key: give this worker another id, or the key of that id's worker"
            )

    def _bind(self, worker: int, key: str | None) -> None:
        if key is not None:
            self.owners.setdefault(worker, key)

    def claim(self, name: str, key: str | None = None) -> int:
        """The id of worker ``name``: the one it had, else the lowest free one; it then belongs to ``key``.

        Raises :class:`NoFreeWorkerId` when all ``num_workers`` ids are held by other names, by
        workers that the environment gave their id (:meth:`seen`) or by other keys, and
        :class:`Forbidden` when ``name`` holds an id that belongs to another key.
        """
        if name in self.names:
            worker = self.names[name]
            self.check_owner(worker, key)
            self._bind(worker, key)
            return worker
        held = set(self.names.values()) | self.unnamed | set(self.owners)
        for worker in range(self.num_workers):
            if worker not in held:
                self.names[name] = worker
                self._bind(worker, key)
                return worker
        holders = ", ".join(sorted(self.names))
        if self.unnamed:
            ids = ", ".join(str(w) for w in sorted(self.unnamed))
            given = f"id{'s' if len(self.unnamed) > 1 else ''} {ids} given by DCASGD_WORKER_ID, RANK or SLURM_PROCID"
            holders = f"{holders}; {given}" if holders else given
        raise NoFreeWorkerId(
            f"all {self.num_workers} worker ids are taken (by {holders}); "
            f"the job was started for {self.num_workers} workers: start no more workers than that, "
            "or start the shards with a larger --num-workers"
        )

    def seen(self, worker: int, key: str | None = None) -> None:
        """A request came from worker id ``worker`` (with client ``key``, which :meth:`check_owner` let
        through): unless a name holds it, it is held by a worker without one; and it belongs to ``key``
        if no key had used it."""
        self._bind(worker, key)
        if worker in self._seen:
            return
        self._seen.add(worker)
        if worker not in self.names.values():
            self.unnamed.add(worker)

    def finish(self, worker: int, status: int) -> None:
        """Worker ``worker`` ended with exit ``status`` (0: success)."""
        self.finished[worker] = status

    def resume(self, worker: int) -> None:
        """Worker ``worker`` is at work again (a restart after it reported)."""
        self.finished.pop(worker, None)

    @property
    def all_done(self) -> bool:
        """True once every worker of the job has reported its end."""
        return len(self.finished) == self.num_workers

    @property
    def failed(self) -> dict[int, int]:
        """Finished workers whose status was not 0: id -> status."""
        return {w: s for w, s in sorted(self.finished.items()) if s != 0}

    def export_state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {
            "names": [[n, w] for n, w in self.names.items()],
            "unnamed": sorted(self.unnamed),
            "finished": sorted(self.finished.items()),
            "owners": sorted([w, k] for w, k in self.owners.items()),
        }

    @classmethod
    def from_state(cls, num_workers: int, state: dict[str, Any] | None) -> Membership:
        """The membership :meth:`export_state` described (None: a fresh one)."""
        m = cls(num_workers)
        if state:
            m.names = {str(n): int(w) for n, w in state["names"] if 0 <= int(w) < num_workers}
            # Checkpoints written before unnamed ids were recorded have none.
            m.unnamed = {int(w) for w in state.get("unnamed", ()) if 0 <= int(w) < num_workers}
            m.finished = {int(w): int(s) for w, s in state["finished"] if 0 <= int(w) < num_workers}
            # Checkpoints written before ids belonged to keys have no owners: the next key to use an id takes it.
            m.owners = {int(w): str(k) for w, k in state.get("owners", ()) if 0 <= int(w) < num_workers}
        return m
