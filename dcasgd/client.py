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

import itertools
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
import zmq
from torch import Tensor
from zmq.utils import monitor as zmq_monitor

from . import protocol
from .env import parse_servers
from .layout import flat_fingerprint, shard_ranges
from .memory import keep_freed_memory
from .security import client_keys

_COPY_THRESHOLD = 64 * 1024  # below this ZeroMQ copies anyway, and tracking costs more than it saves


class DcasgdError(RuntimeError):
    """Base class of the errors this client raises."""


class ShardTimeout(DcasgdError):
    """A shard did not answer within the deadline, after all retries."""


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
    worker's id in ``[0, num_workers)``. ``timeout``: seconds to wait for one
    shard's answer to one try; ``retries``: extra tries after a timeout.
    ``curve_key``: this worker's ``.key_secret`` file and ``server_key``: the shards'
    public ``.key`` file (or its Z85 text), for shards that run with CURVE; by default
    ``DCASGD_CURVE_KEY`` and ``DCASGD_CURVE_SERVER_KEY``; neither set: no encryption.

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
        servers: str | Sequence[str] | None,
        worker_id: int,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        reconnect_timeout: float = 120.0,
        fingerprint: str | None = None,
        context: zmq.Context | None = None,
        curve_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.servers = list(parse_servers(servers))
        keep_freed_memory()  # each reply would otherwise land in freshly faulted pages
        if worker_id < 0:
            raise ValueError(f"worker_id must be >= 0, got {worker_id}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.worker_id = worker_id
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.reconnect_timeout = float(reconnect_timeout)
        self.fingerprint = fingerprint
        self._curve = client_keys(curve_key, server_key)  # None: plain sockets
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=max(1, min(4, len(self.servers))))
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
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
        self.shard_info = replies
        self._instances = [info.get("instance") for info in replies]
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

    def pull(self, out: Tensor | None = None) -> Tensor:
        """The current weights of every shard (1-D float32). Written into ``out`` if given."""
        self._need_layout()
        out = self._out(out)
        self._recovering("pull", {"fp": self.fingerprint}, out=out)
        return out

    def push(self, g: Tensor, lr: float | None = None) -> list[dict[str, Any]]:
        """Apply gradient ``g`` (1-D float32, whole model) with learning rate ``lr``.

        Returns each shard's reply (``version``, ``staleness``). In sync mode it
        returns when the round completes.
        """
        return self._push("push", g, lr, None)

    def push_pull(self, g: Tensor, lr: float | None = None, out: Tensor | None = None) -> Tensor:
        """Apply ``g`` and return the fresh weights in one round trip (into ``out`` if given)."""
        self._need_layout()
        out = self._out(out)
        self._push("push_pull", g, lr, out)
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

    def close(self) -> None:
        """Close the sockets (and the ZeroMQ context if this client made it)."""
        for s in self._socks:
            self._monitors.pop(s).close(linger=0)
            s.close(linger=0)
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
        # this monitor says when, so the request goes again at once instead of after the timeout.
        self._monitors[s] = s.get_monitor_socket(zmq.EVENT_CONNECTED)
        s.connect(endpoint)
        return s

    def _reset(self, s: int) -> None:
        """Replace shard ``s``'s socket, discarding what is still queued for it."""
        old = self._socks[s]
        self._monitors.pop(old).close(linger=0)
        old.close(linger=0)
        self._socks[s] = self._connect(self.servers[s])

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

    def _push(self, op: str, g: Tensor, lr: float | None, out: Tensor | None) -> list[dict[str, Any]]:
        self._need_layout()
        g = _flat(g, "g")
        if g.numel() != self.n:
            raise ValueError(f"gradient has {g.numel()} elements, the model has {self.n}")
        if lr is not None and not lr >= 0:  # lr = 0 is a zero step (a warm-up from 0), as in torch.optim.SGD
            raise ValueError(f"Invalid learning rate: {lr}")
        self._seq += 1
        header = {"fp": self.fingerprint, "seq": self._seq}
        if lr is not None:
            header["lr"] = float(lr)
        return self._recovering(op, header, payload=g, out=out)

    def _recovering(self, op: str, header: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
        """``op`` on every shard, riding through a shard that restarts.

        A shard that stops answering is asked again (hello, with backoff) for up to
        ``reconnect_timeout`` seconds. Requests name the shard instance they mean; a
        restarted shard refuses them (``restarted``), and then this worker says hello,
        pulls (so the shard's backup is what the worker holds) and sends the same
        request again, same seq: shards that already applied it answer it as a duplicate.
        """
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            headers = [{**header, "instance": inst} if inst else header for inst in self._instances]
            try:
                return self._call_all(op, headers, **kw)
            except (ShardTimeout, ServerError) as exc:
                if isinstance(exc, ServerError) and exc.code not in (protocol.RESTARTED, protocol.NOT_INITIALIZED):
                    raise
                if time.monotonic() > deadline:
                    raise
                self._await_shards(deadline)
                if op != "pull":
                    scratch = torch.empty(self.n, dtype=torch.float32)  # rare: one model-size buffer per restart
                    self._call_all("pull", [{"fp": self.fingerprint, "instance": i} for i in self._instances],
                                   out=scratch)  # fmt: skip

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
        msgs = []
        for s, extra in enumerate(headers):
            h = {"v": protocol.PROTOCOL_VERSION, "op": op, "rid": rid, "worker": self.worker_id, **extra}
            frames: list[Any] = []
            if payload is not None:
                lo, hi = ranges[s]
                h["dtype"] = protocol.DTYPE
                h["nbytes"] = (hi - lo) * protocol.ITEMSIZE
                frames.append(payload[lo:hi].numpy())
            msgs.append([protocol.pack(h), *frames])
        replies: list[dict[str, Any] | None] = [None] * self.num_shards
        trackers: list[zmq.MessageTracker] = []
        tries = [0] * self.num_shards
        deadline = [0.0] * self.num_shards

        def send(s: int, retry: bool = True) -> None:
            if retry:  # a resend on reconnection is not a try: the deadline stands
                tries[s] += 1
                deadline[s] = time.monotonic() + self.timeout
            *head, last = msgs[s]
            for f in head:
                self._socks[s].send(f, zmq.SNDMORE)
            big = not isinstance(last, bytes) and last.nbytes >= _COPY_THRESHOLD
            t = self._socks[s].send(last, copy=not big, track=big)
            if big:
                trackers.append(t)

        poller = zmq.Poller()
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
                            raise ShardTimeout(
                                f"shard {s} ({self.servers[s]}) did not answer {op} from worker {self.worker_id} "
                                f"within {self.timeout:.1f} s ({tries[s]} tries)"
                            )
                        send(s)  # same rid and seq: the shard applies a push at most once
                wait = min(deadline[s] for s in range(self.num_shards) if replies[s] is None) - time.monotonic()
                for sock, _ in poller.poll(max(0, int(wait * 1000)) + 1):
                    if sock in shard_of_monitor:
                        s = shard_of_monitor[sock]
                        zmq_monitor.recv_monitor_message(sock)
                        if replies[s] is None:
                            send(s, retry=False)  # (re)connected while waiting: what was in flight may be lost
                        continue
                    s = self._socks.index(sock)
                    reply = self._receive(s, rid, out if replies[s] is None else None, ranges)
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
        if errors:
            raise errors[0]
        return replies  # type: ignore[return-value]

    def _receive(self, s: int, rid: int, out: Tensor | None, ranges: list[tuple[int, int]]) -> dict[str, Any] | None:
        """Read one message from shard ``s``; None when it answers an older request."""
        sock = self._socks[s]
        h = protocol.unpack(sock.recv(), max_bytes=1 << 24)
        more = sock.getsockopt(zmq.RCVMORE)
        if h.get("rid") != rid:
            while more:  # a late answer to a request we gave up on
                sock.recv_into(self._trash)
                more = sock.getsockopt(zmq.RCVMORE)
            return None
        if more and out is None:  # weights we already have (a repeated answer): skip them
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv_into(self._trash)
        elif more:
            lo, hi = ranges[s]
            view = out[lo:hi].numpy()
            got = sock.recv_into(view) if view.nbytes else sock.recv_into(self._trash)
            if got != view.nbytes:
                raise DcasgdError(f"shard {s} sent {got} bytes of weights, expected {view.nbytes}")
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv_into(self._trash)
        elif h.get("ok") and out is not None:
            raise DcasgdError(f"shard {s} answered {h.get('op')} without weights")
        return h


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
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            keys.apply(sock)
        sock.connect(endpoint)
        sock.send(protocol.pack({"v": protocol.PROTOCOL_VERSION, "rid": 1, **header}))
        if not sock.poll(int(timeout * 1000)):
            raise ShardTimeout(f"{endpoint} did not answer {header['op']} within {timeout:.1f} s")
        h = protocol.unpack(sock.recv(), max_bytes=1 << 24)
    finally:
        sock.close()
    if not h.get("ok"):
        raise ServerError(h.get("shard", -1), endpoint, h.get("code", "?"), h.get("msg", ""))
    return h


def _flat(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a 1-D float32 tensor")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the optimizer stages GPU tensors through pinned memory)")
    return t.contiguous()
