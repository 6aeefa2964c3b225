"""The state of one shard and the mode logic; no sockets.

A :class:`ShardState` owns the slice ``[lo, hi)`` of the flat weight vector and
everything the rules need: one backup per worker (DC modes), the mean square
``ms`` (DC-ASGD-a), the momentum buffer, the sync round. The server feeds it
validated requests and sends back the :class:`Reply` objects it returns.

Replies that carry weights carry a :class:`Snapshot`: an immutable copy of the
weights at one version. Snapshots double as the workers' backups (workers that
received the same version share one buffer), and a snapshot's buffer is reused
only once no worker holds it as a backup and every send that uses it is done
(``Snapshot.hold``), so a buffer handed to the network is never changed in place.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from . import kernels, rules
from .layout import shard_ranges
from .membership import Forbidden, Membership, NoFreeWorkerId
from .protocol import (
    BAD_BASE,
    BAD_DTYPE,
    BAD_FINGERPRINT,
    BAD_OP,
    BAD_RANGE,
    BAD_SEQ,
    BAD_SIZE,
    FORBIDDEN,
    ITEMSIZE,
    NO_WEIGHTS,
    NO_WORKER_ID,
    NON_FINITE,
    NOT_INITIALIZED,
    WIRE_DTYPES,
    ProtocolError,
    Request,
)

log = logging.getLogger("dcasgd.shard")

DC_MODES = rules.DC_MODES
MS_MODES = frozenset({"dcasgd-a", "dcasgd-s"})  # modes with a mean square (ms)
EXACT_STALENESS = 256  # staleness values below this are counted one by one; above, in power-of-two buckets
# How far a push's seq may run ahead of the last one this shard applied from that worker. A worker
# numbers its pushes 1, 2, 3, ... from the largest last_seq its shards report, so here its seq is
# last_seq + 1 or a repeat, unless this shard lost pushes the others kept: resumed from a checkpoint
# older than their state, it is behind by the pushes since (with --checkpoint-every 60, a minute's
# worth: 60,000 at 1000 pushes a second). 2**20 is over 17 minutes at that rate; a stray seq (2**64 - 1
# would make every later push of that worker a duplicate) is refused before it is stored.
MAX_SEQ_AHEAD = 2**20


def staleness_bucket(staleness: int) -> int:
    """The histogram key of a staleness: itself below ``EXACT_STALENESS``, else the power of two at
    or below it (the bucket ``[2**k, 2**(k+1))``), so a histogram has at most 256 + 64 keys."""
    return staleness if staleness < EXACT_STALENESS else 1 << (staleness.bit_length() - 1)


class Completion(Protocol):
    """Anything that says when a send is over (``zmq.MessageTracker`` is one)."""

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True)
class ShardConfig:
    """Static configuration of one shard: its index, the job's size, the rules."""

    shard: int = 0
    num_shards: int = 1
    num_workers: int = 1
    rules: rules.RuleConfig = field(default_factory=rules.RuleConfig)
    sync_timeout: float = 60.0  # seconds a sync round waits for a live worker
    # "per-worker": the paper's backup of what each worker last received. "per-parameter":
    # the ablation that public implementations ship, one previous weight refreshed at every
    # update (so w - w_prev is the last update of anyone); for studies, not for training.
    compensation: str = "per-worker"
    # What a gradient with NaN or Inf gets: "refuse" (an error reply, counted; costs one read
    # of the gradient) or "apply" (no check).
    non_finite: str = "refuse"
    # What gradients and weights travel as (a job-wide choice): "float32", or "bfloat16" /
    # "float16" for half the bytes. Weights and state stay float32 on the shard; the backup
    # kept for a worker is the rounded weights it received, bit for bit.
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard {self.shard} is not in [0, {self.num_shards})")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not self.sync_timeout > 0:
            raise ValueError(f"sync_timeout must be > 0, got {self.sync_timeout}")
        if self.non_finite not in ("refuse", "apply"):
            raise ValueError(f"non_finite must be 'refuse' or 'apply', got {self.non_finite!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.compensation not in ("per-worker", "per-parameter"):
            raise ValueError(f"compensation must be 'per-worker' or 'per-parameter', got {self.compensation!r}")


class Snapshot:
    """The shard's weights at one ``version``; never written while referenced or in flight."""

    __slots__ = ("tensor", "version", "refs", "_holds")

    def __init__(self, tensor: Tensor, version: int) -> None:
        self.tensor = tensor
        self.version = version
        self.refs = 0  # backups and remembered answers that use it
        self._holds: list[Completion] = []

    def hold(self, completion: Completion) -> None:
        """Keep the buffer unchanged until ``completion.done`` (a send in flight)."""
        if not completion.done:
            self._holds.append(completion)

    @property
    def busy(self) -> bool:
        self._holds = [h for h in self._holds if not h.done]
        return bool(self._holds) or self.refs > 0


@dataclass
class Reply:
    """What to answer worker ``worker``: header fields and, maybe, weights."""

    worker: int
    fields: dict[str, Any]
    snapshot: Snapshot | None = None


@dataclass
class _Pending:
    key: tuple[int, str]  # (rid, op) of the push
    seq: int
    lr: float
    want_weights: bool
    staleness: int
    not_applied: bool = False  # a later push of a restarted worker, answered with the round


class ShardState:
    """Weights, backups and buffers of one shard, and the rule of its mode."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.mode = config.rules.mode
        m = config.num_workers
        self.initialized = False
        self.fp: str | None = None
        self.layout: list[list[Any]] | None = None  # names and shapes, if the initializing worker sent them
        self.n = 0  # length of the whole model vector
        self.lo = self.hi = 0
        self.version = 0
        self.w = torch.empty(0)
        # The newest weights sent to each worker (its backup in DC modes), and for a worker that
        # asked to keep two (overlapped steps: it computes on the weights before its newest),
        # the ones sent before them. A push names which one it was computed on (``base``).
        self.backup: list[Snapshot | None] = [None] * m
        self.previous: list[Snapshot | None] = [None] * m
        self.received_version: list[int | None] = [None] * m
        self.previous_version: list[int | None] = [None] * m
        self.wire_dtype = getattr(torch, config.wire_dtype)
        self._itemsize = WIRE_DTYPES[config.wire_dtype]
        self._grad32: Tensor | None = None  # a half-size wire's gradient, widened (the torch fallback only)
        self.last_seq = [0] * m
        self.updates = [0] * m
        self.last_staleness: list[int | None] = [None] * m  # per worker, of its latest applied push (status --watch)
        # Per worker, a coarse histogram (0, then power-of-two buckets: at most ~40 keys) for its quantiles.
        self.worker_staleness: list[Counter[int]] = [Counter() for _ in range(m)]
        self.staleness: Counter[int] = Counter()
        self.duplicates = 0
        self.non_finite = 0  # gradients refused for NaN or Inf
        self.members = Membership(m)  # worker ids by name (shard 0 hands them out), finished workers
        # Per worker, the last answer that carried weights, by (request id, op): a retried
        # request gets the very same answer, so the worker's backup stays the
        # snapshot it actually holds.
        self._answered: list[tuple[tuple[int, str], Reply] | None] = [None] * m
        self._ms: Tensor | None = None
        self._ring: rules.GradientRing | None = None  # dcasgd-s, curvature="fisher": the last gradients
        self._momentum: Tensor | None = None
        self._w_prev: Tensor | None = None  # per-parameter ablation only
        self._w_pre: Tensor | None = None
        self._scratch: list[Tensor] = []
        self._current: Snapshot | None = None
        self._retired: list[Snapshot] = []
        self._free: list[Tensor] = []
        # Seconds spent on the hot path, cumulative: the non-finite check, the rule (with the
        # snapshot a push_pull's reply carries: the fused kernel writes it in the same pass),
        # and snapshots written on their own (pulls, replies of the torch fallback's sync rounds).
        self.phase_seconds = {"check": 0.0, "rule": 0.0, "snapshot": 0.0}
        self.fused = False  # whether the last update ran the fused kernel (dcasgd/kernels.py)
        # The fused kernel compiles (or loads from numba's cache) in the background; the first
        # update waits for it, so that every update of this shard takes the same path.
        self._compiling = kernels.prepare(
            self.mode,
            self.wire_dtype,
            momentum=config.rules.momentum > 0,
            backup_float32=config.compensation == "per-parameter",
        )
        # sync mode
        self.live = set(range(m))
        self._round: dict[int, _Pending] = {}
        self._round_started: float | None = None
        self._grad_sum: Tensor | None = None
        self.rounds = 0
        self.round_seconds: list[float] = []
        self.left_out = 0

    @property
    def _fisher(self) -> bool:
        return self.mode == "dcasgd-f" or (self.mode == "dcasgd-s" and self.config.rules.curvature == "fisher")

    # --- checks done before any payload is read -----------------------------------

    @property
    def size(self) -> int:
        """Number of float32 elements this shard owns."""
        return self.hi - self.lo

    def check(self, req: Request, key: str | None = None) -> None:
        """Refuse a request that does not fit this shard's state. Raises ProtocolError.

        ``key``: the peer's CURVE public key (None without CURVE); a worker id belongs to the key
        that first used it (``forbidden`` for any other key; ``stats`` is for anyone).
        """
        if req.worker is not None and req.op != "stats":
            try:
                self.members.check_owner(req.worker, key)
            except Forbidden as exc:
                raise ProtocolError(FORBIDDEN, str(exc)) from None
        if req.op == "init":
            lo, hi = shard_ranges(req.n, self.config.num_shards)[self.config.shard]
            if (req.lo, req.hi) != (lo, hi):
                raise ProtocolError(
                    BAD_RANGE,
                    f"shard {self.config.shard} of {self.config.num_shards} owns [{lo}, {hi}) of {req.n}, "
                    f"not [{req.lo}, {req.hi})",
                )
            if req.nbytes != (hi - lo) * ITEMSIZE:
                raise ProtocolError(BAD_SIZE, f"init payload is {req.nbytes} bytes, expected {(hi - lo) * ITEMSIZE}")
            if self.initialized and (req.fp != self.fp or req.n != self.n):
                raise ProtocolError(
                    BAD_FINGERPRINT,
                    f"shard holds a model of {self.n} floats with fingerprint {self.fp}; "
                    f"init sent {req.n} floats with fingerprint {req.fp}",
                )
            return
        if req.op in ("hello", "stats", "done"):
            return
        if req.op == "weights":  # no fingerprint: an observer (dcasgd export) learns the job from the reply
            if not self.initialized:
                raise ProtocolError(NOT_INITIALIZED, f"shard {self.config.shard} has no weights yet (no init)")
            return
        if req.op == "claim":
            if self.config.shard != 0:
                raise ProtocolError(BAD_OP, f"this is shard {self.config.shard}: worker ids are claimed from shard 0")
            return
        if not self.initialized:
            raise ProtocolError(NOT_INITIALIZED, f"shard {self.config.shard} has no weights yet (no init)")
        if req.fp != self.fp:
            raise ProtocolError(BAD_FINGERPRINT, f"layout fingerprint {req.fp} does not match the job's {self.fp}")
        if req.op in ("push", "push_pull"):
            if req.dtype != self.config.wire_dtype:
                raise ProtocolError(
                    BAD_DTYPE,
                    f"this job's wire type is {self.config.wire_dtype}, worker {req.worker} sends {req.dtype}: "
                    f"give the worker wire_dtype={self.config.wire_dtype!r}",
                )
            if req.nbytes != self.size * self._itemsize:
                raise ProtocolError(
                    BAD_SIZE,
                    f"payload of {req.nbytes} bytes, shard {self.config.shard} expects {self.size * self._itemsize}",
                )
            if req.seq > self.last_seq[req.worker] + MAX_SEQ_AHEAD:
                raise ProtocolError(
                    BAD_SEQ,
                    f"seq {req.seq} of worker {req.worker} is more than {MAX_SEQ_AHEAD} ahead of the last one "
                    f"shard {self.config.shard} applied ({self.last_seq[req.worker]})",
                )
            if self.received_version[req.worker] is None:
                raise ProtocolError(NO_WEIGHTS, f"worker {req.worker} pushed before it ever received weights")
            kept = (self.received_version[req.worker], self.previous_version[req.worker])
            duplicate = req.seq is not None and req.seq <= self.last_seq[req.worker]  # answered, never applied
            if req.base is not None and req.base not in kept and not duplicate:
                raise ProtocolError(
                    BAD_BASE,
                    f"worker {req.worker} computed on version {req.base}, but shard {self.config.shard} keeps "
                    f"only versions {[v for v in kept if v is not None]} of what it sent that worker",
                )

    # --- ops ---------------------------------------------------------------------

    def hello(self, worker: int) -> dict[str, Any]:
        """What a worker learns when it (re)connects: job shape, model size, its last seq."""
        self._remember(worker, None)  # a new session: its request ids start afresh
        return {
            **self._identity(),
            "non_finite": self.config.non_finite,
            "initialized": self.initialized,
            "last_seq": self.last_seq[worker],
        }

    def weights(self, worker: int | None) -> Reply:
        """The float32 weights now, with the job's identity, for an observer (``dcasgd export``).

        Read-only: no backup, received version or remembered answer moves. The payload is a fresh
        float32 copy of ``w``, not a snapshot: snapshots are in the wire type (rounded, over a
        bfloat16 wire) and may be a worker's backup. An export is rare, so one new buffer each time.
        """
        fields = {**self._identity(), "compensation": self.config.compensation, "dtype": "float32"}
        return Reply(worker, fields, Snapshot(self.w.clone(), self.version))

    def _identity(self) -> dict[str, Any]:
        """The job and this shard's part of it, as hello and weights report them."""
        return {
            "shard": self.config.shard,
            "num_shards": self.config.num_shards,
            "num_workers": self.config.num_workers,
            "mode": self.mode,
            "wire_dtype": self.config.wire_dtype,
            "fp": self.fp,
            "layout": self.layout,
            "n": self.n,
            "lo": self.lo,
            "hi": self.hi,
            "version": self.version,
        }

    def claim(self, name: str, key: str | None = None) -> dict[str, Any]:
        """A worker id for the worker called ``name`` (the same one again for the same name).

        ``key``: the claimer's CURVE public key (None without CURVE); the id then belongs to it.
        """
        try:
            worker = self.members.claim(name, key)
        except NoFreeWorkerId as exc:
            raise ProtocolError(NO_WORKER_ID, str(exc)) from None
        except Forbidden as exc:
            raise ProtocolError(FORBIDDEN, f"{exc} (name {name!r} has that id)") from None
        log.info("shard %d: worker id %d is %r", self.config.shard, worker, name)
        return {"worker": worker, "name": name, "num_workers": self.config.num_workers}

    def done(self, worker: int, status: int, now: float) -> list[Reply]:
        """Worker ``worker`` ended with exit ``status``; a sync round stops waiting for it.

        Returns its answer first, then those of a sync round that this completes.
        """
        self.members.finish(worker, status)
        self.live.discard(worker)
        log.log(
            logging.INFO if status == 0 else logging.WARNING,
            "shard %d: worker %d finished with status %d (%d of %d finished)",
            self.config.shard,
            worker,
            status,
            len(self.members.finished),
            self.config.num_workers,
        )
        replies = [Reply(worker, {"finished": len(self.members.finished), "num_workers": self.config.num_workers})]
        if self._round and self.live <= set(self._round):
            replies += self._close_round(now)
        return replies

    def restart_if_finished(self) -> bool:
        """If every worker had reported its end, start a new run from these weights: ids are handed
        out afresh (new containers have new names) and no worker counts as finished. True if so.

        For a shard resumed from a checkpoint; a job resumed in mid-run keeps its members.
        """
        if not self.members.all_done:
            return False
        self.members = Membership(self.config.num_workers)
        self.live = set(range(self.config.num_workers))
        return True

    def init(self, req: Request, weights: Tensor) -> Reply:
        """Take ``weights`` (this shard's slice, float32) unless already initialized."""
        if not self.initialized:
            self.n, self.lo, self.hi, self.fp, self.layout = req.n, req.lo, req.hi, req.fp, req.layout
            self.w = weights.detach().to(torch.float32).clone()
            size = self.size
            self._scratch = [torch.empty(size), torch.empty(size)]
            if self.mode in MS_MODES:
                self._ms = torch.zeros(size)
            if self._fisher:
                self._ring = rules.GradientRing(self.config.rules.fisher_rank, size, gram=self.mode == "dcasgd-f")
            if self.config.rules.momentum > 0:
                self._momentum = torch.zeros(size)
            if self.mode == "sync":
                self._grad_sum = torch.zeros(size)
            if self.config.compensation == "per-parameter":
                self._w_prev = self.w.clone()
                self._w_pre = torch.empty(size)
            self.initialized = True
            log.info(
                "shard %d initialized by worker %d: [%d, %d) of %d",
                self.config.shard,
                req.worker,
                self.lo,
                self.hi,
                self.n,
            )
        return Reply(req.worker, {"version": self.version, "initialized": True})

    def pull(self, worker: int, rid: int, keep: int = 1) -> Reply:
        """The current weights for ``worker``; they become its backup.

        ``keep``: 2 keeps the weights sent before as well (a worker with overlapped steps
        still computes on them). A repeat of request ``rid`` gets the same answer as the first time.
        """
        self.live.add(worker)
        self.members.resume(worker)  # a restarted worker pulls first: it is at work again
        repeat = self._repeat(worker, (rid, "pull"))
        if repeat is not None:
            return repeat
        return self._remember(worker, (rid, "pull"), self._weights_reply(worker, {}, keep))

    def push(self, req: Request, grad: Tensor, now: float) -> list[Reply]:
        """Apply (or, in sync mode, collect) ``grad`` from ``req.worker``.

        ``grad`` is this shard's slice of the worker's gradient (float32, read
        only). Returns the replies to send now: none while a sync round waits,
        one per member when it completes, one in async modes. A push whose seq
        was already applied is answered again and not applied twice.
        """
        worker, want = req.worker, req.op == "push_pull"
        lr = req.lr if req.lr is not None else self.config.rules.lr
        if req.seq <= self.last_seq[worker]:
            pending = self._round.get(worker)
            if pending is not None and pending.seq == req.seq:
                pending.want_weights = pending.want_weights or want
                return []  # answered when the round completes
            self.duplicates += 1
            repeat = self._repeat(worker, (req.rid, req.op))
            if repeat is not None:
                return [repeat]
            fields = {"duplicate": True, "applied_seq": self.last_seq[worker]}
            # This answer replaces one the worker may never have received: the weights it computes
            # on next are still the ones it had before, so they stay kept (keep == 2).
            reply = self._push_reply(worker, want, fields, req.keep, replaces=True)
            return [self._remember(worker, (req.rid, req.op), reply)]
        if self.config.non_finite == "refuse":
            t0 = time.perf_counter()
            # In DC modes also a gradient whose square would overflow: the weights must never turn non-finite.
            limit = kernels.GRADIENT_LIMIT if self.mode in DC_MODES else None
            finite = kernels.finite(grad, limit)
            self.phase_seconds["check"] += time.perf_counter() - t0
            if not finite:
                self.non_finite += 1
                beyond = f" or values beyond {limit:g} (their squares overflow float32)" if limit else ""
                raise ProtocolError(
                    NON_FINITE, f"gradient from worker {worker} has NaN or Inf values{beyond}: refused, nothing applied"
                )
        if self.mode == "sync":
            return self._sync_push(req, lr, want, grad, now)
        base = req.base if req.base is not None else self.received_version[worker]
        staleness = self._record(worker, req.seq, base)
        w_bak = None
        if self.mode in DC_MODES:  # exactly the weights behind this gradient (check() saw base is kept)
            w_bak = (self.backup if base == self.received_version[worker] else self.previous)[worker].tensor
        if self.config.compensation == "per-parameter" and self.mode in DC_MODES:
            w_bak = self._w_prev  # the weights before the last update, whoever made it
            self._w_pre.copy_(self.w)
        self._update(grad, lr, w_bak, want, staleness=staleness)
        if self.config.compensation == "per-parameter" and self.mode in DC_MODES:
            self._w_prev, self._w_pre = self._w_pre, self._w_prev
        reply = self._push_reply(worker, want, {"staleness": staleness}, req.keep)
        return [self._remember(worker, (req.rid, req.op), reply)]

    def expire(self, now: float) -> list[Reply]:
        """Close a sync round whose deadline passed, leaving out the workers that did not push."""
        if self._round_started is None or now - self._round_started < self.config.sync_timeout:
            return []
        missing = sorted(self.live - set(self._round))
        self.live -= set(missing)
        self.left_out += len(missing)
        log.warning(
            "shard %d: sync round %d closed after %.1f s without workers %s; they rejoin when they push or pull",
            self.config.shard,
            self.rounds,
            self.config.sync_timeout,
            missing,
        )
        return self._close_round(now)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` must next be called (same clock as ``now``), or None."""
        if self._round_started is None:
            return None
        return self._round_started + self.config.sync_timeout

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: version, updates per worker, staleness histogram."""
        return {
            "shard": self.config.shard,
            "num_shards": self.config.num_shards,
            "num_workers": self.config.num_workers,
            "mode": self.mode,
            "wire_dtype": self.config.wire_dtype,
            "initialized": self.initialized,
            "n": self.n,
            "lo": self.lo,
            "hi": self.hi,
            "version": self.version,
            "updates": list(self.updates),
            "last_seq": list(self.last_seq),
            "last_staleness": list(self.last_staleness),
            "worker_staleness": [sorted(h.items()) for h in self.worker_staleness],
            "staleness": sorted(self.staleness.items()),
            "duplicates": self.duplicates,
            "non_finite": self.non_finite,
            "rounds": self.rounds,
            "left_out": self.left_out,
            "last_round_seconds": self.round_seconds[-1] if self.round_seconds else None,
            "live": sorted(self.live),
            "finished": sorted(self.members.finished.items()),
            "snapshots": 1 + len(self._retired) + len(self._free) if self._current else 0,
            "phase_seconds": dict(self.phase_seconds),
            "fused": self.fused,
        }

    # --- internals ---------------------------------------------------------------

    def _record(self, worker: int, seq: int, base: int | None = None) -> int:
        self.members.resume(worker)
        self.last_seq[worker] = seq
        self.updates[worker] += 1
        staleness = self.version - (self.received_version[worker] if base is None else base)
        self.staleness[staleness_bucket(staleness)] += 1
        self.last_staleness[worker] = staleness
        self.worker_staleness[worker][0 if staleness <= 0 else 1 << (staleness.bit_length() - 1)] += 1
        return staleness

    def _update(
        self, grad: Tensor, lr: float, w_bak: Tensor | None, want_weights: bool, count: int = 1, staleness: int = 0
    ) -> None:
        """Apply the rule (one pass when fused) and move to the next version; with
        ``want_weights``, the same pass writes that version's snapshot. ``staleness``: the
        push's (dcasgd-s reads it)."""
        if self._compiling is not None:
            self._compiling.join()  # once: then every update takes the same path (same numbers)
            self._compiling = None
        # A buffer that no backup holds and no send uses (see _acquire): nothing else reads it.
        buf = self._acquire() if want_weights else None
        if self._grad32 is None and grad.dtype != torch.float32:
            self._grad32 = torch.empty(self.size)
        t0 = time.perf_counter()
        try:
            self.fused = kernels.update(
                self.mode,
                self.w,
                grad,
                config=self.config.rules,
                lr=lr,
                w_bak=w_bak,
                ms=self._ms,
                momentum_buf=self._momentum,
                count=count,
                snapshot=buf,
                scratch=self._scratch,
                g32=self._grad32,
                staleness=staleness,
                ring=self._ring,
            )
        except BaseException:
            if buf is not None:
                self._free.append(buf)
            raise
        self.phase_seconds["rule"] += time.perf_counter() - t0
        self.version += 1
        if buf is not None:
            self._install(Snapshot(buf, self.version))

    def _sync_push(self, req: Request, lr: float, want: bool, grad: Tensor, now: float) -> list[Reply]:
        worker = req.worker
        pending = self._round.get(worker)
        if pending is not None:
            # A restarted worker (a new process with the same id goes on with the seq numbers) pushes
            # again while its push from before the crash waits in the round. That one stands for it
            # in this round; this one is answered when the round closes, and not applied.
            self.last_seq[worker] = req.seq
            pending.key, pending.seq = (req.rid, req.op), req.seq
            pending.want_weights, pending.not_applied = pending.want_weights or want, True
            log.info(
                "shard %d: worker %d pushed again in round %d (restarted?)", self.config.shard, worker, self.rounds
            )
            return []
        self.live.add(worker)
        staleness = self._record(worker, req.seq)
        self._grad_sum.add_(grad)
        self._round[worker] = _Pending((req.rid, req.op), req.seq, lr, want, staleness)
        if self._round_started is None:
            self._round_started = now
        if self.live <= set(self._round):
            return self._close_round(now)
        return []

    def _close_round(self, now: float) -> list[Reply]:
        members = self._round
        lr = next(reversed(members.values())).lr  # the most recent push's lr
        want = any(p.want_weights for p in members.values())
        self._update(self._grad_sum, lr, None, want, count=len(members))  # zeroes the sum
        self.rounds += 1
        self.round_seconds.append(now - self._round_started)
        del self.round_seconds[:-1000]
        self._round = {}
        self._round_started = None
        replies = []
        for m, p in members.items():
            fields = {"staleness": p.staleness, "round_size": len(members)}
            if p.not_applied:
                fields["not_applied"] = True
            replies.append(self._remember(m, p.key, self._push_reply(m, p.want_weights, fields)))
        return replies

    def _repeat(self, worker: int, key: tuple[int, str]) -> Reply | None:
        """The answer already given to request ``key`` = (rid, op) of ``worker``, marked as a duplicate."""
        answered = self._answered[worker]
        if answered is None or answered[0] != key:
            return None
        first = answered[1]
        return Reply(worker, {**first.fields, "duplicate": True}, first.snapshot)

    def _remember(self, worker: int, key: tuple[int, str] | None, reply: Reply | None = None) -> Reply | None:
        """Keep ``reply`` as the answer to ``key`` (None forgets); its snapshot stays unchanged meanwhile."""
        old = self._answered[worker]
        if reply is not None and reply.snapshot is not None:
            reply.snapshot.refs += 1
            self._answered[worker] = (key, reply)
        else:
            self._answered[worker] = None
        if old is not None and old[1].snapshot is not None:
            old[1].snapshot.refs -= 1
        return reply

    def _push_reply(
        self, worker: int, want_weights: bool, fields: dict[str, Any], keep: int = 1, replaces: bool = False
    ) -> Reply:
        if want_weights:
            return self._weights_reply(worker, fields, keep, replaces)
        return Reply(worker, {"version": self.version, **fields})

    def _weights_reply(self, worker: int, fields: dict[str, Any], keep: int = 1, replaces: bool = False) -> Reply:
        """The current weights for ``worker``; they become its newest backup.

        ``keep == 2``: the newest backup so far becomes the previous one (the worker computes
        its next gradient on it), unless this answer ``replaces`` an answer the worker may have
        lost; then the previous one stays.
        """
        snap = self._snapshot()
        newest = self.backup[worker]
        shift = self.received_version[worker] != snap.version or keep == 1
        if shift and not (keep == 2 and replaces):
            # keep == 2: the weights sent last become the previous ones; keep == 1 lets them go.
            moved = keep == 2 and self.received_version[worker] is not None
            self._set_previous(worker, newest if moved else None)
            self.previous_version[worker] = self.received_version[worker] if moved else None
        self.received_version[worker] = snap.version
        if self.mode in DC_MODES and newest is not snap:
            snap.refs += 1
            self.backup[worker] = snap
            if newest is not None:
                newest.refs -= 1
        return Reply(worker, {"version": snap.version, "dtype": self.config.wire_dtype, **fields}, snap)

    def _set_previous(self, worker: int, snap: Snapshot | None) -> None:
        if self.mode not in DC_MODES:
            return
        old = self.previous[worker]
        if snap is not None:
            snap.refs += 1
        self.previous[worker] = snap
        if old is not None:
            old.refs -= 1

    def _snapshot(self) -> Snapshot:
        cur = self._current
        if cur is not None and cur.version == self.version:
            return cur
        t0 = time.perf_counter()
        snap = Snapshot(self._acquire(), self.version)
        snap.tensor.copy_(self.w)  # rounded to the wire type: the backup is what the worker gets
        self.phase_seconds["snapshot"] += time.perf_counter() - t0
        self._install(snap)
        return snap

    def _install(self, snap: Snapshot) -> None:
        """Make ``snap`` (the weights at the current version) the one replies carry."""
        if self._current is not None:
            self._retired.append(self._current)
        self._current = snap

    def _acquire(self) -> Tensor:
        """A buffer for a new snapshot: a released one if any, else a new one."""
        still = []
        for s in self._retired:
            if s.busy:
                still.append(s)
            else:
                self._free.append(s.tensor)
        self._retired = still
        del self._free[2:]  # keep a couple for reuse, let the rest go
        return self._free.pop() if self._free else torch.empty(self.size, dtype=self.wire_dtype)

    # --- checkpoints (dcasgd/checkpoint.py writes and reads the files) -------------------

    def export_state(self) -> dict[str, Any]:
        """Everything a restarted shard needs, as plain values and the live tensors (write them out at once).

        Distinct backups appear once in ``snapshots`` (``(version, tensor)``); ``backup_index``
        says which one each worker holds. A sync round in progress is left out: its members'
        ``last_seq``/``updates``/``staleness`` are rolled back, so that their retried pushes
        are applied after a restart. Remembered answers are not kept either, nor dcasgd-s's
        gradient ring (curvature="fisher": it starts empty and refills within fisher_rank pushes).
        """
        last_seq, updates, staleness = list(self.last_seq), list(self.updates), Counter(self.staleness)
        for worker, p in self._round.items():
            last_seq[worker] = p.seq - 1
            updates[worker] -= 1
            staleness[staleness_bucket(p.staleness)] -= 1
        snapshots: list[Snapshot] = []
        index: dict[int, int] = {}  # id(snapshot) -> its place in snapshots

        def place(snap: Snapshot | None) -> int | None:
            if snap is not None and id(snap) not in index:
                index[id(snap)] = len(snapshots)
                snapshots.append(snap)
            return None if snap is None else index[id(snap)]

        backup_index = [place(snap) for snap in self.backup]
        previous_index = [place(snap) for snap in self.previous]
        return {
            "initialized": self.initialized,
            "fp": self.fp,
            "layout": self.layout,
            "n": self.n,
            "lo": self.lo,
            "hi": self.hi,
            "version": self.version,
            "last_seq": last_seq,
            "updates": updates,
            "received_version": list(self.received_version),
            "previous_version": list(self.previous_version),
            "staleness": sorted((k, v) for k, v in staleness.items() if v > 0),
            "duplicates": self.duplicates,
            "non_finite": self.non_finite,
            "rounds": self.rounds,
            "left_out": self.left_out,
            "live": sorted(self.live),
            "members": self.members.export_state(),
            "w": self.w,
            "ms": self._ms,
            "momentum": self._momentum,
            "w_prev": self._w_prev,
            "snapshots": [(s.version, s.tensor) for s in snapshots],
            "backup_index": backup_index,
            "previous_index": previous_index,
        }

    @classmethod
    def from_state(cls, config: ShardConfig, state: dict[str, Any]) -> ShardState:
        """A shard with the state :meth:`export_state` returned (tensors are taken, not copied).

        Buffers that ``config`` needs and ``state`` lacks (say, momentum turned on) start at zero.
        """
        self = cls(config)
        self.members = Membership.from_state(config.num_workers, state.get("members"))
        if not state["initialized"]:
            return self
        self.initialized = True
        self.fp, self.layout = state["fp"], state["layout"]
        self.n, self.lo, self.hi = state["n"], state["lo"], state["hi"]
        self.version = state["version"]
        self.last_seq = list(state["last_seq"])
        self.updates = list(state["updates"])
        self.received_version = list(state["received_version"])
        self.previous_version = list(state.get("previous_version") or [None] * config.num_workers)
        self.staleness = Counter()
        for value, count in state["staleness"]:  # checkpoints from before the buckets may hold any value
            self.staleness[staleness_bucket(value)] += count
        self.duplicates, self.non_finite = state["duplicates"], state.get("non_finite", 0)
        self.rounds, self.left_out, self.live = state["rounds"], state["left_out"], set(state["live"])
        self.w = state["w"]
        size = self.size
        self._scratch = [torch.empty(size), torch.empty(size)]
        if self.mode in MS_MODES:
            self._ms = state["ms"] if state["ms"] is not None else torch.zeros(size)
        if self._fisher:  # not checkpointed: a short-lived estimate, refilled by the next fisher_rank pushes
            self._ring = rules.GradientRing(config.rules.fisher_rank, size, gram=self.mode == "dcasgd-f")
        if config.rules.momentum > 0:
            self._momentum = state["momentum"] if state["momentum"] is not None else torch.zeros(size)
        if self.mode == "sync":
            self._grad_sum = torch.zeros(size)
        if config.compensation == "per-parameter":
            self._w_prev = state["w_prev"] if state["w_prev"] is not None else self.w.clone()
            self._w_pre = torch.empty(size)
        snapshots = [Snapshot(t, v) for v, t in state["snapshots"]]
        if self.mode in DC_MODES:
            previous_index = state.get("previous_index") or [None] * config.num_workers
            for held, indices in ((self.backup, state["backup_index"]), (self.previous, previous_index)):
                for worker, i in enumerate(indices):
                    if i is not None:
                        snapshots[i].refs += 1
                        held[worker] = snapshots[i]
        self._retired = snapshots  # their buffers are reused once no backup holds them
        return self
