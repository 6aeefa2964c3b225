"""A worker's connection to every shard of a job.

:class:`Client` is the low-level public API (after ps-lite's ``KVWorker``):
``init``, ``pull``, ``push``, ``push_pull`` and ``stats`` on the whole flat
float32 vector. It splits the vector into the shards' contiguous slices, sends
to all shards at once and waits for all of them, so one call is one round trip.
Every wait has a deadline; a request that times out is sent again with the same
seq (pushes are exactly-once on the shard), and after the last try the error
names the shard that did not answer.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
import zmq
from torch import Tensor
from zmq.utils import monitor as zmq_monitor

from . import protocol, shm
from .env import WORKER_ID, JobConfigError, parse_servers, worker_id_from_environment
from .kernels import GRADIENT_LIMIT
from .layout import flat_fingerprint, shard_ranges
from .memory import keep_freed_memory
from .rules import DC_MODES
from .security import ENV_KEY, ENV_SERVER_KEY, client_keys

log = logging.getLogger("dcasgd.client")

_MAX_REPLY_HEADER = 1 << 24  # bytes; a stats reply lists every worker: about 20 bytes each
_COPY_THRESHOLD = 64 * 1024  # below this ZeroMQ copies anyway, and tracking costs more than it saves
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED


class DcasgdError(RuntimeError):
    """Base class of the errors this client raises."""


class ShardTimeout(DcasgdError):
    """A shard did not answer within the deadline, after all retries."""


class HandshakeError(ShardTimeout):
    """A shard did not answer because the connection's security handshake failed (CURVE keys).

    A :class:`ShardTimeout`, raised at the same deadline, whose message names the likely
    cause and the settings to check.
    """


class NonFiniteGradient(DcasgdError, ValueError):
    """A gradient holds NaN or Inf (or overflows a float16 wire): refused before anything was sent."""


class ServerError(DcasgdError):
    """A shard answered a request with an error reply (``code``, ``message``)."""

    def __init__(self, shard: int, endpoint: str, code: str, message: str) -> None:
        super().__init__(f"shard {shard} ({endpoint}) refused the request: {code}: {message}")
        self.shard = shard
        self.endpoint = endpoint
        self.code = code
        self.message = message


class Client:
    """A worker's connection to all shards.

    ``servers``: endpoints in shard order (shard ``s`` at ``servers[s]``), or a
    comma-separated string, or None for ``DCASGD_SERVERS``. ``worker_id``: this
    worker's id in ``[0, num_workers)``, or None for ``DCASGD_WORKER_ID`` (``RANK``,
    ``SLURM_PROCID``). ``timeout``: seconds to wait for one
    shard's answer to one try; ``retries``: extra tries after a timeout.
    ``curve_key``: this worker's ``.key_secret`` file and ``server_key``: the shards'
    public ``.key`` file (or its Z85 text), for shards that run with CURVE; by default
    ``DCASGD_CURVE_KEY`` and ``DCASGD_CURVE_SERVER_KEY``; neither set: no encryption.
    ``io_threads``: ZeroMQ I/O threads of the client's own context (None: one per
    shard, at most 4; ignored when ``context`` is given). Endpoints may be ``tcp://``
    or, for shards on the same host, ``ipc:///path/to/socket``.
    ``wire_dtype``: what gradients and weights travel as, the job's choice
    (``dcasgd server --wire-dtype``): ``"float32"``, or ``"bfloat16"`` / ``"float16"`` for
    half the bytes (weights arrive rounded to that type, then widened to float32).
    None (default) takes the job's; another value than the job's is refused.
    ``tune_malloc``: keep freed multi-MB buffers mapped (glibc ``mallopt``, see
    :mod:`dcasgd.memory`), which changes malloc for the whole process; off unless True or
    ``DCASGD_MALLOC_TUNING=1`` (shard processes always tune, unless it is ``0``).
    ``shared_memory``: hand payloads to shards on this host in shared memory instead of
    frames (:mod:`dcasgd.shm`: one region per shard, twice the slice in the wire type, in
    this process). None (default): for ``ipc://`` and loopback ``tcp://`` endpoints whose
    shard offers it, unless ``DCASGD_SHARED_MEMORY=0``; True: for every shard that offers
    it (a shard that cannot open the region refuses, and frames go instead); False: never.

    Usage::

        c = Client(["tcp://127.0.0.1:5555"], worker_id=0)
        c.init(w)                  # first init wins
        w = c.pull()
        w = c.push_pull(g, lr=0.1)

    Vectors are 1-D float32 CPU tensors of the whole model. Tensors passed in are
    only read, and only until the call returns.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        worker_id: int | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        reconnect_timeout: float = 120.0,
        fingerprint: str | None = None,
        context: zmq.Context | None = None,
        io_threads: int | None = None,
        curve_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
        wire_dtype: str | None = None,
        tune_malloc: bool | None = None,
        shared_memory: bool | None = None,
    ) -> None:
        if wire_dtype is not None and wire_dtype not in protocol.WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(protocol.WIRE_DTYPES)}, got {wire_dtype!r}")
        self._wire_asked = wire_dtype
        self.wire_dtype = wire_dtype or "float32"  # the job's, once hello has told it
        self._wire = getattr(torch, self.wire_dtype)
        self._send_buf: Tensor | None = None  # the gradient in the wire type, when it is not float32
        self.versions: list[int] = []  # per shard, the version of the weights received last
        self.received_from: list[str | None] = []  # per shard, the instance that sent those weights
        self.servers = list(parse_servers(servers))
        if shared_memory is None and os.environ.get(shm.ENV, "auto") in ("0", "1"):
            shared_memory = os.environ[shm.ENV] == "1"
        # Per shard: whether to name a region (the shard must offer it too, see hello), the region, and
        # the refusals in a row (two: frames from then on).
        self._shm_wanted = [
            shm.available() and shared_memory is not False and (shared_memory or _same_host(ep)) for ep in self.servers
        ]
        self._shm_use = [False] * len(self.servers)
        self._regions: list[shm.Region | None] = [None] * len(self.servers)
        self._shm_refusals = [0] * len(self.servers)
        if tune_malloc or (tune_malloc is None and os.environ.get("DCASGD_MALLOC_TUNING") == "1"):
            keep_freed_memory()  # process-wide: only when asked (the optimizer reuses its buffers anyway)
        if worker_id is None:
            worker_id = worker_id_from_environment()
            if worker_id is None:
                raise JobConfigError(f"no worker id: pass worker_id= or set {', '.join(WORKER_ID)}")
        if worker_id < 0:
            raise ValueError(f"worker_id must be >= 0, got {worker_id}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if io_threads is None:
            io_threads = max(1, min(4, len(self.servers)))
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self.worker_id = worker_id
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.reconnect_timeout = float(reconnect_timeout)
        self.fingerprint = fingerprint
        self._curve = client_keys(curve_key, server_key)  # None: plain sockets
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=io_threads)
        if self._own_ctx:
            # Every socket of this context (the monitors' too) drops what is unsent when closed, so
            # a client that is garbage collected unclosed never blocks in the context's term().
            self._ctx.setsockopt(zmq.LINGER, 0)
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
        self._handshakes: dict[zmq.Socket, _Handshakes] = {}
        self._socks = [self._connect(ep) for ep in self.servers]
        # Request ids start at random so that a restarted worker never repeats one the shard remembers.
        self._rids = itertools.count(random.getrandbits(48))
        self._trash = bytearray()
        self.n: int | None = None
        self.ranges: list[tuple[int, int]] = []
        self.shard_info: list[dict[str, Any]] = []
        try:
            self.hello()
        except BaseException:
            self.close()  # no half-made client keeps sockets and a context alive
            raise
        self._seq = max(info["last_seq"] for info in self.shard_info)

    # --- public API ------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    @property
    def num_workers(self) -> int:
        """The job's worker count, as the shards report it."""
        return self.shard_info[0]["num_workers"]

    @property
    def mode(self) -> str:
        return self.shard_info[0]["mode"]

    def hello(self) -> list[dict[str, Any]]:
        """Ask every shard who it is; checks that the servers list matches the job."""
        replies = self._call_all("hello", [{}] * self.num_shards)
        for s, info in enumerate(replies):
            if info["shard"] != s or info["num_shards"] != self.num_shards:
                raise DcasgdError(
                    f"{self.servers[s]} is shard {info['shard']} of {info['num_shards']}, but was listed as "
                    f"shard {s} of {self.num_shards}: list servers in shard order"
                )
            if self.worker_id >= info["num_workers"]:
                raise DcasgdError(
                    f"worker_id {self.worker_id} is out of range for a job of {info['num_workers']} workers"
                )
            job_wire = info.get("wire_dtype", "float32")
            if self._wire_asked not in (None, job_wire):
                raise DcasgdError(
                    f"this job's wire type is {job_wire} (dcasgd server --wire-dtype), this worker's is "
                    f"{self._wire_asked}: pass wire_dtype={job_wire!r}, or None to take the job's"
                )
        self.shard_info = replies
        self.wire_dtype = replies[0].get("wire_dtype", "float32")
        self._wire = getattr(torch, self.wire_dtype)
        self._instances = [info.get("instance") for info in replies]
        self._shm_use = [w and bool(info.get("shared_memory")) and r < 2 for w, info, r in zip(
            self._shm_wanted, replies, self._shm_refusals, strict=True)]  # fmt: skip
        if all(info["initialized"] for info in replies):
            self._adopt(replies[0]["n"], replies[0]["fp"])
        return replies

    def init(self, w: Tensor, layout: list[tuple[str, Sequence[int]]] | None = None) -> None:
        """Offer ``w`` (1-D float32, the whole model) as the job's initial weights.

        The first init a shard sees wins; later ones with the same layout are
        no-ops, and one with another layout is refused (:class:`ServerError`).
        ``layout``: optional ``(name, shape)`` pairs the shards keep, so that a
        worker with another model can be told how it differs.
        """
        w = _flat(w, "w")
        fp = self.fingerprint or flat_fingerprint(w.numel())
        ranges = shard_ranges(w.numel(), self.num_shards)
        extra = {"layout": [[name, list(shape)] for name, shape in layout]} if layout is not None else {}
        headers = [{"fp": fp, "n": w.numel(), "lo": lo, "hi": hi, **extra} for lo, hi in ranges]
        self._call_all("init", headers, payload=w, ranges=ranges)
        self._adopt(w.numel(), fp)

    def wait_initialized(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every shard has weights (some worker's init)."""
        deadline = time.monotonic() + timeout
        while not all(info["initialized"] for info in self.hello()):
            if time.monotonic() > deadline:
                missing = [s for s, info in enumerate(self.shard_info) if not info["initialized"]]
                raise ShardTimeout(
                    f"shards {missing} still had no weights after {timeout:.1f} s: did worker 0 call init?"
                )
            time.sleep(0.05)  # polling a remote condition; each hello has its own deadline

    def pull(self, out: Tensor | None = None, *, keep: int = 1) -> Tensor:
        """The current weights of every shard (1-D float32). Written into ``out`` if given.

        ``keep``: 2 asks the shards to keep the weights they sent before as well, because
        this worker still computes a gradient on them (overlapped steps); see ``base``.
        """
        self._need_layout()
        out = self._out(out)
        self._weights_call("pull", {"fp": self.fingerprint, "keep": keep}, None, out)
        return out

    def push(
        self,
        g: Tensor,
        lr: float | None = None,
        *,
        base: Sequence[int] | None = None,
        base_from: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Apply gradient ``g`` (1-D float32, whole model) with learning rate ``lr`` (>= 0).

        ``g`` may also be in the job's wire type already (bfloat16/float16; what the optimizer
        does): it is then sent as it is, with no float32 copy narrowed on the way.

        ``base``: per shard, the version of the weights ``g`` was computed on (one of the
        last two that shard sent, see :attr:`versions`); None: the newest it sent.
        ``base_from``: per shard, the instance that sent those weights (:attr:`received_from`
        when they were received), so a shard restarted since can tell they are gone.
        Returns each shard's reply (``version``, ``staleness``). In sync mode it
        returns when the round completes.
        """
        return self._push("push", g, lr, None, base, base_from, 1)

    def push_pull(
        self,
        g: Tensor,
        lr: float | None = None,
        out: Tensor | None = None,
        *,
        base: Sequence[int] | None = None,
        base_from: Sequence[str | None] | None = None,
        keep: int = 1,
    ) -> Tensor:
        """Apply ``g`` and return the fresh weights in one round trip (into ``out`` if given).

        ``base`` as for :meth:`push`, ``keep`` as for :meth:`pull`. The versions of the
        weights returned are in :attr:`versions` afterwards.
        """
        self._need_layout()
        out = self._out(out)
        self._push("push_pull", g, lr, out, base, base_from, keep)
        return out

    def stats(self) -> list[dict[str, Any]]:
        """One dict per shard: version, mode, updates per worker, staleness histogram, bytes."""
        return self._call_all("stats", [{}] * self.num_shards)

    def done(self, status: int) -> list[dict[str, Any]]:
        """Tell every shard that this worker's command ended with exit ``status`` (0..255).

        A sync round stops waiting for this worker; a shard run with ``--exit-when-done``
        exits once every worker of the job has said it. Returns each shard's answer
        (``finished``: how many workers have, ``num_workers``).
        """
        if not 0 <= status <= 255:
            raise ValueError(f"status must be an exit status in [0, 255], got {status}")
        return self._call_all("done", [{"status": int(status)}] * self.num_shards)

    @property
    def shared_memory(self) -> list[bool]:
        """Per shard, whether requests hand payloads over in shared memory (known after the first hello)."""
        return list(self._shm_use)

    def close(self) -> None:
        """Close the sockets (and the ZeroMQ context if this client made it)."""
        for s in range(len(self._regions)):
            self._drop_region(s)
        for s in self._socks:
            self._close_socket(s)
        self._socks = []
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------

    def _connect(self, endpoint: str) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.apply(s)
        # A request in flight when a shard dies is lost with it; ZeroMQ reconnects by itself, and
        # this monitor says when (a second handshake), so the request goes again at once instead
        # of after the timeout. It also says why a handshake failed (CURVE keys), for the error.
        self._monitors[s] = s.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._handshakes[s] = _Handshakes()
        s.connect(endpoint)
        return s

    def _close_socket(self, sock: zmq.Socket) -> None:
        # disable_monitor first: the monitor's inproc name is derived from the socket's fd,
        # which the next socket may reuse at once.
        sock.disable_monitor()
        self._monitors.pop(sock).close(linger=0)
        self._handshakes.pop(sock)
        sock.close(linger=0)

    def _reset(self, s: int) -> None:
        """Replace shard ``s``'s socket, discarding what is still queued for it (and its region: see _call_all)."""
        self._close_socket(self._socks[s])
        self._socks[s] = self._connect(self.servers[s])
        self._drop_region(s)

    # --- shared memory (dcasgd/shm.py) -----------------------------------------------

    def _region(self, s: int) -> shm.Region | None:
        """Shard ``s``'s region for this job's slice and wire type, made when first needed; None: frames."""
        if not self._shm_use[s] or self.n is None:
            return None
        lo, hi = self.ranges[s]
        region = self._regions[s]
        if region is not None and (region.numel != hi - lo or region.dtype != self._wire):
            self._drop_region(s)
            region = None
        if region is None:
            try:
                region = self._regions[s] = shm.Region.create(hi - lo, self._wire)
            except OSError as exc:
                log.info("worker %d: no shared memory for shard %d (%s): frames", self.worker_id, s, exc)
                self._shm_wanted[s] = self._shm_use[s] = False
        return region

    def _drop_region(self, s: int) -> None:
        """Stop using shard ``s``'s region; the next request makes a new one, with a new token.

        Whatever a shard may still write into the old one (an answer to a request given up on)
        lands where no later answer is read from.
        """
        region, self._regions[s] = self._regions[s], None
        if region is not None:
            region.close()

    def _shm_refused(self, exc: ServerError) -> None:
        """A shard could not use the region: a new one next time; after two refusals in a row, frames."""
        s = exc.shard
        self._drop_region(s)
        self._shm_refusals[s] += 1
        if self._shm_refusals[s] >= 2:
            self._shm_use[s] = False
            log.info("worker %d: shard %d cannot use shared memory (%s): frames", self.worker_id, s, exc.message)

    def _adopt(self, n: int, fp: str) -> None:
        self.n = n
        self.ranges = shard_ranges(n, self.num_shards)
        if self.fingerprint is None:
            self.fingerprint = fp

    def _need_layout(self) -> None:
        if self.n is None:
            self.hello()
        if self.n is None:
            raise DcasgdError("the shards have no weights yet: call init(w) first (worker 0 usually does)")

    def _out(self, out: Tensor | None) -> Tensor:
        if out is None:
            return torch.empty(self.n, dtype=torch.float32)
        if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != self.n or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous 1-D float32 tensor of {self.n} elements")
        if out.device.type != "cpu":
            raise ValueError("out must be a CPU tensor")
        return out

    def _push(
        self,
        op: str,
        g: Tensor,
        lr: float | None,
        out: Tensor | None,
        base: Sequence[int] | None,
        base_from: Sequence[str | None] | None,
        keep: int,
    ) -> list[dict[str, Any]]:
        self._need_layout()
        g = _flat(g, "g", self._wire)
        if g.numel() != self.n:
            raise ValueError(f"gradient has {g.numel()} elements, the model has {self.n}")
        if lr is not None and not lr >= 0:  # lr = 0 is a zero step (a warm-up from 0), as in torch.optim.SGD
            raise ValueError(f"Invalid learning rate: {lr}")
        if base is not None and len(base) != self.num_shards:
            raise ValueError(f"base needs one version per shard ({self.num_shards}), got {len(base)}")
        if self.shard_info[0].get("non_finite", "refuse") == "refuse":
            # All or nothing: no shard gets a part of it. DC modes also refuse what would overflow squared.
            _check_finite(g, self.wire_dtype, GRADIENT_LIMIT if self.mode in DC_MODES else None)
        payload = g
        if g.dtype != self._wire:
            if self._send_buf is None:
                self._send_buf = torch.empty(self.n, dtype=self._wire)
            payload = self._send_buf.copy_(g)  # rounded to the wire type (in range: checked above)
        self._seq += 1
        header = {"fp": self.fingerprint, "seq": self._seq}
        if lr is not None:
            header["lr"] = float(lr)
        if op == "push_pull":
            header["keep"] = keep
        if base is None and len(self.versions) == self.num_shards:
            base, base_from = self.versions, self.received_from  # what this worker holds
        per_shard = None
        if base is not None:
            # With the instance that sent them: a shard resumed from a checkpoint numbers versions
            # anew from the checkpoint's, so a version alone could name other weights there.
            froms = base_from if base_from is not None else [None] * len(base)
            per_shard = [
                {"base": int(v), **({"base_instance": i} if i else {})} for v, i in zip(base, froms, strict=True)
            ]
        if out is None:
            return self._recovering(op, header, payload=payload, per_shard=per_shard)
        return self._weights_call(op, header, payload, out, per_shard)

    def _weights_call(
        self,
        op: str,
        header: dict[str, Any],
        payload: Tensor | None,
        out: Tensor,
        per_shard: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """``op`` with weights in the reply: they land in ``out``, widened frame by frame over a narrow wire."""
        replies = self._recovering(op, header, payload=payload, out=out, per_shard=per_shard)
        self.versions = [r["version"] for r in replies]
        self.received_from = list(self._instances)
        return replies

    def _recovering(
        self, op: str, header: dict[str, Any], per_shard: list[dict[str, Any]] | None = None, **kw: Any
    ) -> list[dict[str, Any]]:
        """``op`` on every shard, riding through a shard that restarts.

        A shard that stops answering is asked again (hello, with backoff) for up to
        ``reconnect_timeout`` seconds. Requests name the shard instance they mean; a
        restarted shard refuses them (``restarted``), and then this worker says hello and
        sends the same request again, same seq and same ``base``: shards that already
        applied it answer it as a duplicate, and a shard resumed from a checkpoint
        compensates against the backup the checkpoint recorded for this worker. If that
        checkpoint does not hold the weights the gradient was computed on (``bad_base``,
        ``no_weights``), the gradient cannot be compensated: it is dropped (logged), and the
        worker pulls fresh weights instead.
        """
        deadline = time.monotonic() + self.reconnect_timeout
        recovered = False
        while True:
            headers = [
                {**header, **(per_shard[s] if per_shard else {}), **({"instance": inst} if inst else {})}
                for s, inst in enumerate(self._instances)
            ]
            try:
                return self._call_all(op, headers, **kw)
            except (ShardTimeout, ServerError) as exc:
                if isinstance(exc, ServerError) and exc.code == protocol.SHM_REFUSED:
                    self._shm_refused(exc)  # the same request again (same seq: applied at most once)
                    continue
                lost = (protocol.BAD_BASE, protocol.NO_WEIGHTS)
                restarted = recovered or any(  # the weights it was computed on came from an earlier instance
                    fields.get("base_instance") not in (None, self._instances[s])
                    for s, fields in enumerate(per_shard or [])
                )
                if restarted and isinstance(exc, ServerError) and exc.code in lost and op in protocol.PUSH_OPS:
                    return self._drop_after_restart(exc.shard, exc.code, header.get("keep", 1), kw)
                if isinstance(exc, ServerError) and exc.code not in (protocol.RESTARTED, protocol.NOT_INITIALIZED):
                    raise
                if time.monotonic() > deadline:
                    raise
                self._await_shards(deadline)
                recovered = True

    def _drop_after_restart(self, shard: int, why: str, keep: int, kw: dict[str, Any]) -> list[dict[str, Any]]:
        """A restarted shard cannot compensate this gradient: pull fresh weights instead of pushing it."""
        log.warning(
            "worker %d: shard %d restarted from a checkpoint without the weights this gradient was computed on "
            "(%s); the gradient is dropped and fresh weights are pulled",
            self.worker_id,
            shard,
            why,
        )
        out = kw.get("out")
        into = out if out is not None else torch.empty(self.n, dtype=self._wire)  # rare: once per restart
        headers = [{"fp": self.fingerprint, "keep": keep, "instance": i} for i in self._instances]
        replies = self._call_all("pull", headers, out=into)
        return [{**r, "dropped": True} for r in replies]

    def _await_shards(self, deadline: float) -> None:
        """Say hello until every shard answers with weights, backing off up to 2 s between tries."""
        pause = 0.1
        while True:
            try:
                if all(info["initialized"] for info in self.hello()):
                    return
                last = DcasgdError("a shard restarted without its weights: start it with --resume")
            except (ShardTimeout, ServerError) as exc:
                last = exc
            if time.monotonic() + pause > deadline:
                raise last
            time.sleep(pause)  # waiting for a restarting process; every hello has its own deadline
            pause = min(2.0, pause * 2)

    def _call_all(
        self,
        op: str,
        headers: list[dict[str, Any]],
        *,
        payload: Tensor | None = None,
        ranges: list[tuple[int, int]] | None = None,
        out: Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Send ``op`` to every shard at once and wait for every answer.

        ``payload``: the whole vector, sliced by ``ranges``; ``out``: where the
        weights of a reply land, sliced the same way (received in place).
        """
        ranges = ranges or self.ranges
        rid = next(self._rids)
        # Per shard, the region this call names (None: frames). A request is sent through its region
        # once: a resend (a timeout, a new connection) carries frames, and the region is replaced after
        # the call, so that an answer the shard writes late never lands where a later answer is read.
        regions = [self._region(s) if op in protocol.SHM_OPS else None for s in range(self.num_shards)]
        stale: set[int] = set()

        def message(s: int, region: shm.Region | None) -> list[Any]:
            h = {"v": protocol.PROTOCOL_VERSION, "op": op, "rid": rid, "worker": self.worker_id, **headers[s]}
            frames: list[Any] = []
            if region is not None:
                h["shm"] = region.describe()
            if payload is not None:
                lo, hi = ranges[s]
                h["dtype"] = str(payload.dtype).removeprefix("torch.")
                h["nbytes"] = (hi - lo) * payload.element_size()
                if region is None:
                    frames.append(payload[lo:hi].view(torch.uint8).numpy())  # raw bytes (numpy has no bfloat16)
                else:
                    region.grad.copy_(payload[lo:hi])
            return [protocol.pack(h), *frames]

        msgs = [message(s, regions[s]) for s in range(self.num_shards)]
        replies: list[dict[str, Any] | None] = [None] * self.num_shards
        trackers: list[zmq.MessageTracker] = []
        tries = [0] * self.num_shards
        deadline = [0.0] * self.num_shards
        unsent: set[int] = set()  # no connection to queue on yet (e.g. a failed handshake)
        poller = zmq.Poller()

        def send(s: int, retry: bool = True) -> None:
            if retry:  # a resend on reconnection is not a try: the deadline stands
                tries[s] += 1
                deadline[s] = time.monotonic() + self.timeout
            resend = tries[s] > 1 or (not retry and s not in unsent)  # unsent: it never left
            if resend and regions[s] is not None and s not in stale:
                stale.add(s)
                msgs[s] = message(s, None)
            # Never block: a DEALER whose handshake failed has no pipe, and a blocking send
            # would wait for one forever. The message waits for POLLOUT under the deadline.
            *head, last = msgs[s]
            sock = self._socks[s]
            try:
                for i, f in enumerate(head):
                    # Once the first frame is queued ZeroMQ takes the rest of the message.
                    sock.send(f, zmq.SNDMORE | (zmq.NOBLOCK if i == 0 else 0))
                big = not isinstance(last, bytes) and last.nbytes >= _COPY_THRESHOLD
                t = sock.send(last, copy=not big, track=big, flags=zmq.NOBLOCK if not head else 0)
            except zmq.Again:
                if s not in unsent:
                    unsent.add(s)
                    poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
                return
            if s in unsent:
                unsent.discard(s)
                poller.modify(sock, zmq.POLLIN)
            if big:
                trackers.append(t)

        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
            poller.register(self._monitors[sock], zmq.POLLIN)
        shard_of_monitor = {self._monitors[sock]: s for s, sock in enumerate(self._socks)}
        errors: list[ServerError] = []
        try:
            for s in range(self.num_shards):
                send(s)
            while any(r is None for r in replies):
                now = time.monotonic()
                for s in range(self.num_shards):
                    if replies[s] is None and now >= deadline[s]:
                        if tries[s] > self.retries:
                            raise self._timeout(s, op, tries[s])
                        send(s)  # same rid and seq: the shard applies a push at most once
                wait = min(deadline[s] for s in range(self.num_shards) if replies[s] is None) - time.monotonic()
                for sock, events in poller.poll(max(0, int(wait * 1000)) + 1):
                    if sock in shard_of_monitor:
                        s = shard_of_monitor[sock]
                        reconnected = self._handshakes[self._socks[s]].read(sock)
                        if reconnected and replies[s] is None and s not in unsent:
                            send(s, retry=False)  # what was in flight on the old connection may be lost
                        continue
                    s = self._socks.index(sock)
                    if events & zmq.POLLOUT and s in unsent:
                        send(s, retry=False)
                    if not events & zmq.POLLIN:
                        continue
                    reply = self._receive(s, rid, out if replies[s] is None else None, ranges, regions[s])
                    if reply is None or replies[s] is not None:
                        continue
                    replies[s] = reply
                    if not reply["ok"]:
                        errors.append(ServerError(s, self.servers[s], reply.get("code", "?"), reply.get("msg", "")))
        except BaseException:
            # Unanswered requests may still sit in ZeroMQ's queues and reference the caller's
            # tensor: drop them, so nothing is sent later from a buffer the caller reuses.
            for s in range(self.num_shards):
                if replies[s] is None:
                    self._reset(s)
            raise
        finally:
            for t in trackers:  # the caller may reuse its tensor once we return
                if not t.done:
                    t.wait(self.timeout)
            for s in stale:
                self._drop_region(s)
        if errors:
            raise errors[0]
        return replies  # type: ignore[return-value]

    def _timeout(self, s: int, op: str, tries: int) -> ShardTimeout:
        """The error for shard ``s`` not answering ``op``: why, when a handshake failure says so."""
        text = (
            f"shard {s} ({self.servers[s]}) did not answer {op} from worker {self.worker_id} "
            f"within {self.timeout:.1f} s ({tries} tries)"
        )
        failure = self._handshakes[self._socks[s]].failure
        if failure is None:
            return ShardTimeout(text)
        return HandshakeError(f"{text}: {handshake_hint(*failure, curve=self._curve is not None)}")

    def _receive(
        self,
        s: int,
        rid: int,
        out: Tensor | None,
        ranges: list[tuple[int, int]],
        region: shm.Region | None = None,
    ) -> dict[str, Any] | None:
        """Read one message from shard ``s``; None when it answers an older request.

        ``region``: the one this request named, where an answer with ``shm`` has put the weights.
        """
        sock = self._socks[s]
        h = protocol.unpack(sock.recv(), max_bytes=_MAX_REPLY_HEADER, max_items=_MAX_REPLY_HEADER)
        more = sock.getsockopt(zmq.RCVMORE)
        if h.get("rid") != rid:
            while more:  # a late answer to a request we gave up on
                sock.recv_into(self._trash)
                more = sock.getsockopt(zmq.RCVMORE)
            return None
        if h.get("shm") and h.get("ok"):
            if region is None or more:
                raise DcasgdError(f"shard {s} answered in shared memory a request that named no region")
            self._shm_refusals[s] = 0
            if out is not None:
                lo, hi = ranges[s]
                out[lo:hi].copy_(region.weights)  # written before the answer was sent; widened if narrow
        elif more and out is None:  # weights we already have (a repeated answer): skip them
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv_into(self._trash)
        elif more:
            lo, hi = ranges[s]
            part = out[lo:hi]
            if part.dtype == self._wire:
                got, want = self._receive_into(sock, part), part.nbytes
            else:
                got, want = receive_widened(sock, part, self._wire, s), (hi - lo) * self._wire.itemsize
            if got != want:
                raise DcasgdError(f"shard {s} sent {got} bytes of weights, expected {want}")
        elif h.get("ok") and out is not None:
            raise DcasgdError(f"shard {s} answered {h.get('op')} without weights")
        return h

    def _receive_into(self, sock: zmq.Socket, part: Tensor) -> int:
        """The weight frames of a reply copied into ``part`` (the wire type); returns the bytes sent."""
        view = part.view(torch.uint8).numpy()
        got, more = 0, True  # the weights come in frames of at most REPLY_FRAME_BYTES, in order
        while more:  # recv_into returns a frame's whole size, also when it truncates it
            got += sock.recv_into(view[got:] if got < view.nbytes else self._trash)
            more = sock.getsockopt(zmq.RCVMORE)
        return got


def receive_widened(sock: zmq.Socket, part: Tensor, wire: torch.dtype, shard: int) -> int:
    """The weight frames of one reply, in ``wire`` type, widened straight into ``part`` (float32).

    Reads the frames left of the message on ``sock`` (all of them, so that the next message
    starts at its header). One pass per element, read from ZeroMQ's own frame (no staging copy
    in the wire type), while its I/O thread already receives the next frame. Widening is exact:
    ``part`` holds bit for bit the rounded weights the shard keeps as this worker's backup.
    Returns the bytes sent (more than ``part`` holds: the surplus is not written); raises
    :class:`DcasgdError` naming ``shard`` when a frame splits a value.
    """
    size = wire.itemsize
    got, at, more = 0, 0, True  # ``at``: elements written
    split: int | None = None  # the size of the first frame that splits a value
    while more:
        frame = sock.recv(copy=False)
        more = frame.more
        nbytes = len(frame)
        if nbytes % size and split is None:
            split = nbytes
        got += nbytes
        if nbytes and split is None and got <= part.numel() * size:
            count = nbytes // size
            part[at : at + count].copy_(torch.frombuffer(frame.buffer, dtype=wire))
            at += count
    if split is not None:
        name = str(wire).removeprefix("torch.")
        raise DcasgdError(f"shard {shard} sent a weights frame of {split} bytes: not whole {name} values")
    return got


def fetch_stats(
    endpoint: str,
    timeout: float = 5.0,
    context: zmq.Context | None = None,
    curve_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """One shard's stats, asked by an observer that is not a worker (``dcasgd status``, ``dcasgd demo``).

    ``curve_key`` / ``server_key``: as for :class:`Client`, but given explicitly (no environment).
    Raises :class:`ShardTimeout` after ``timeout`` seconds, :class:`ServerError` on an error reply.
    """
    keys = client_keys(curve_key, server_key) if curve_key is not None or server_key is not None else None
    return _ask(endpoint, {"op": "stats"}, timeout, keys, context)


def fetch_weights(
    endpoint: str,
    timeout: float = 30.0,
    context: zmq.Context | None = None,
    curve_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """One shard's float32 weights and the job's identity, asked by an observer (``dcasgd export``).

    Read-only on the shard (the ``weights`` op: no worker id, no worker's backup moves). Returns the
    reply header (``shard, num_shards, mode, fp, layout, n, lo, hi, version, ...``) and a new 1-D
    float32 tensor of the slice ``[lo, hi)`` at ``version``. Keys and errors as for :func:`fetch_stats`.
    """
    keys = client_keys(curve_key, server_key) if curve_key is not None or server_key is not None else None
    h, frames = _ask_frames(endpoint, {"op": "weights"}, timeout, keys, context)
    want = (h.get("hi", 0) - h.get("lo", 0)) * protocol.ITEMSIZE
    data = bytearray(b"".join(frames))  # frames of at most REPLY_FRAME_BYTES, in order
    if h.get("dtype") != "float32" or not frames or len(data) != want:
        got = [len(f) for f in frames]
        raise DcasgdError(f"{endpoint} answered weights with frames of {got} bytes, expected {want} in all (float32)")
    return h, torch.frombuffer(data, dtype=torch.float32)


def claim_worker_id(
    endpoint: str,
    name: str,
    *,
    timeout: float = 120.0,
    context: zmq.Context | None = None,
    curve_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Ask shard 0 at ``endpoint`` for a worker id for the worker called ``name``.

    The same name gets the same id again (a restarted container keeps its id); a new
    name gets the lowest free id. Waits up to ``timeout`` seconds for the shard to
    answer (it may still be starting). Returns ``worker`` and ``num_workers``. Raises
    :class:`ServerError` (``no_worker_id`` when every id is taken) or :class:`ShardTimeout`.
    CURVE keys: as for :class:`Client` (arguments, else the environment).
    """
    keys = client_keys(curve_key, server_key)
    # A claim is idempotent by name: asking again after a timeout is safe.
    return _ask_until(endpoint, {"op": "claim", "name": name}, timeout, keys, context, "gave no worker id")


def wait_for_shard(
    endpoint: str,
    *,
    timeout: float = 120.0,
    context: zmq.Context | None = None,
    curve_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """A shard's stats (``num_workers``, ``mode``, ...), waiting up to ``timeout`` s for it to answer.

    For a worker that is about to start; CURVE keys as for :class:`Client`.
    """
    keys = client_keys(curve_key, server_key)
    return _ask_until(endpoint, {"op": "stats"}, timeout, keys, context, "did not answer")


def _ask_until(
    endpoint: str, header: dict[str, Any], timeout: float, keys: Any, context: zmq.Context | None, failed: str
) -> dict[str, Any]:
    """:func:`_ask` again after each timeout (5 s at most per try), up to ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _ask(endpoint, header, max(0.1, min(5.0, deadline - time.monotonic())), keys, context)
        except ShardTimeout:
            if time.monotonic() >= deadline:
                raise ShardTimeout(f"{endpoint} {failed} within {timeout:.1f} s") from None


def _ask(
    endpoint: str, header: dict[str, Any], timeout: float, keys: Any, context: zmq.Context | None
) -> dict[str, Any]:
    """One request without a worker id on a fresh socket; the reply header, or an error."""
    return _ask_frames(endpoint, header, timeout, keys, context)[0]


def _ask_frames(
    endpoint: str, header: dict[str, Any], timeout: float, keys: Any, context: zmq.Context | None
) -> tuple[dict[str, Any], list[bytes]]:
    """:func:`_ask`, and the reply's payload frames."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Handshakes: why one failed (for the error), and a reconnection (a shard that binds again after its
    # first init, or restarted), after which the request goes again: what the old connection held may be lost.
    monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    handshakes = _Handshakes()
    deadline = time.monotonic() + timeout
    try:
        if keys is not None:
            keys.apply(sock)
        sock.connect(endpoint)
        request = protocol.pack({"v": protocol.PROTOCOL_VERSION, "rid": 1, **header})
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN | zmq.POLLOUT)
        poller.register(monitor, zmq.POLLIN)
        sent, h, payload = False, None, []
        while h is None:
            wait = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(wait * 1000)))) if wait > 0 else {}
            if not ready:
                failure = handshakes.failure
                hint = f": {handshake_hint(*failure, curve=keys is not None)}" if failure else ""
                error = HandshakeError if failure else ShardTimeout
                raise error(f"{endpoint} did not answer {header['op']} within {timeout:.1f} s{hint}")
            if monitor in ready and handshakes.read(monitor) and sent:
                sent = False  # stats, weights and claim (by name) are safe to ask twice
                poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
            if not sent and ready.get(sock, 0) & zmq.POLLOUT:
                sock.send(request, zmq.NOBLOCK)  # writable: never blocks, a failed handshake leaves no pipe
                sent = True
                poller.modify(sock, zmq.POLLIN)
            if ready.get(sock, 0) & zmq.POLLIN:
                first, *payload = sock.recv_multipart()
                h = protocol.unpack(first, max_bytes=_MAX_REPLY_HEADER, max_items=_MAX_REPLY_HEADER)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
    if not h.get("ok"):
        raise ServerError(h.get("shard", -1), endpoint, h.get("code", "?"), h.get("msg", ""))
    return h, payload


class _Handshakes:
    """What one socket's monitor said: handshakes that succeeded, and the last one that failed."""

    def __init__(self) -> None:
        self.succeeded = 0
        self.failure: tuple[int, int] | None = None  # (event, value) of the last failed handshake

    def read(self, monitor: zmq.Socket) -> bool:
        """Read one monitor event; True when it is a reconnection (a handshake after the first)."""
        event = zmq_monitor.recv_monitor_message(monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.succeeded += 1
            self.failure = None
            return self.succeeded > 1
        self.failure = (event["event"], event["value"])
        return False


def handshake_hint(event: int, value: int, curve: bool) -> str:
    """Say in words why a handshake with a shard failed, and which settings to check.

    ``event``, ``value``: a ZeroMQ monitor event and its value; ``curve``: whether this
    side used CURVE keys.
    """
    keys = f"{ENV_KEY} / {ENV_SERVER_KEY} (or curve_key= / server_key=, --curve-key / --curve-server-key)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the shard refused this worker's CURVE key (ZAP status {value}): its public .key file is not "
            f"in the shard's --curve-clients directory (add it and restart the shard), or {ENV_KEY} "
            "names another key"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or not curve:
        if curve:
            return f"the security handshake failed: the shard does not run with CURVE, or {keys} are wrong"
        return f"the security handshake failed: the shard runs with CURVE and this worker has no keys: set {keys}"
    return (
        f"the CURVE handshake failed: {ENV_SERVER_KEY} (server_key=) is probably not the shard's public key "
        "(the .key file of the pair given to the shard with --curve-secret-key)"
    )


def _check_finite(g: Tensor, wire_dtype: str, limit: float | None = None) -> None:
    """Raise :class:`NonFiniteGradient` unless every value of ``g`` is finite in ``wire_dtype``.

    ``g``: float32, or already in the wire type (a value it could not hold became Inf then).

    One min/max pass (NaN propagates through it; 3 ms for 25M floats here, where
    ``isfinite(g).all()`` takes 360 ms); the element count runs only for the message.
    """
    wire_max = torch.finfo(getattr(torch, wire_dtype)).max
    limit = wire_max if limit is None else min(limit, wire_max)
    lo, hi = torch.aminmax(g)
    if -limit <= float(lo) and float(hi) <= limit:  # False for NaN
        return
    bad = (~(g.abs() <= limit)).nonzero()  # NaN, Inf, or beyond what the wire type holds
    first = int(bad[0]) if len(bad) else -1
    why = ""
    if limit < wire_max:
        why = f" (this job's rule squares the gradient: at most {limit:g} in magnitude)"
    elif wire_dtype != "float32":
        why = f" ({wire_dtype} holds at most {limit:.6g} in magnitude: scale the loss down)"
    raise NonFiniteGradient(
        f"the gradient has {len(bad)} NaN or Inf value(s) in the {wire_dtype} wire type, the first at flat index "
        f"{first}{why}: nothing was sent"
    )


def _flat(t: Tensor, name: str, wire: torch.dtype = torch.float32) -> Tensor:
    """``t`` as a contiguous 1-D CPU tensor, float32 or (a gradient already narrowed) the wire type."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.float32, wire):
        also = "" if wire == torch.float32 else f" or {str(wire).removeprefix('torch.')} (the wire type)"
        raise ValueError(f"{name} must be a 1-D float32{also} tensor")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the optimizer stages GPU tensors through pinned memory)")
    return t.contiguous()


def _same_host(endpoint: str) -> bool:
    """Whether ``endpoint`` is on this host: ``ipc://``, or ``tcp://`` to a loopback address or localhost."""
    if endpoint.startswith("ipc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
