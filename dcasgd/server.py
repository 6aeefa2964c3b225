"""The ZeroMQ loop around one shard: a ROUTER socket, a poller, replies.

The loop reads a message, validates its header (``protocol``), asks the shard
whether the request fits its state (``ShardState.check``), only then reads the
payload, hands the request to the shard and sends the replies the shard returns.
It never computes a rule. Bad input gets an error reply; frames that are not a
message are dropped and counted; nothing a peer sends stops the loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import zmq
from zmq.utils import monitor as zmq_monitor

from . import checkpoint, protocol, security, shm
from . import env as job_env
from .memory import keep_freed_memory
from .protocol import MalformedMessage, ProtocolError
from .shard import Reply, ShardConfig, ShardState

log = logging.getLogger("dcasgd.server")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_IO_THREADS = 1  # ZeroMQ I/O threads per shard; measured in docs/benchmarks.md "Transport"
_POLL_MS = 100  # how often the loop wakes up to check stop flags and sync deadlines
# What one peer may hold in the server. A worker has a request or two in flight and reads its answers;
# a peer that does not read would otherwise pin a snapshot of the weights per unsent answer. ZeroMQ's
# high-water marks count whole messages, per peer on a ROUTER: a reply beyond them is dropped and counted
# (``reply_queue_full``), a request beyond them waits in the network (ZeroMQ stops reading that peer).
MAX_QUEUED_REQUESTS = 4  # RCVHWM: each up to --max-message-bytes
MAX_QUEUED_REPLIES = 64  # SNDHWM: headers (a burst of small answers fits)
MAX_WEIGHT_REPLIES = 4  # answers with weights not yet sent (their trackers): a snapshot each, at most
# ZeroMQ's frame size limit before the model size is known: an init of up to 2**28 floats per shard (a
# model of 1G parameters on 4 shards). Once the size is known (a resumed shard, or after the first init),
# the largest legal frame.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_ENVELOPE = 4096  # bytes a frame may exceed its payload on the wire (CURVE's box and command name)
_REBIND_SECONDS = 10.0  # to close the listener and bind its endpoint again when the limit tightens


# Where an answer goes: the peer's identity, the request's rid and op, and the region it named (or None).
_Route = tuple[bytes, int, str, "shm.Region | None"]


class BindError(ValueError):
    """The endpoint cannot be bound; the message says why and what to do."""


class ShardServer:
    """One shard served on one ROUTER socket.

    ``bind``: a ZeroMQ endpoint such as ``tcp://127.0.0.1:5555`` (port 0 or ``*``
    picks a free one; see :attr:`endpoint`), or ``ipc:///path/to/socket`` for
    workers on the same host (the socket file is removed by :meth:`close`).
    ``io_threads``: ZeroMQ I/O threads of the server's own context (ignored when
    ``context`` is given). ``shared_memory``: let workers on this host name a
    shared-memory region for their payloads (``dcasgd/shm.py``), so that no payload
    crosses the socket. Call :meth:`serve` to run until :meth:`stop`.
    """

    def __init__(
        self,
        bind: str,
        config: ShardConfig,
        *,
        max_header_bytes: int = protocol.DEFAULT_MAX_HEADER_BYTES,
        max_message_bytes: int | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: float = 0.0,
        resume: bool = False,
        context: zmq.Context | None = None,
        io_threads: int = DEFAULT_IO_THREADS,
        curve_secret_key: str | os.PathLike[str] | None = None,
        curve_clients: str | os.PathLike[str] | None = None,
        exit_when_done: bool = False,
        shared_memory: bool = True,
    ) -> None:
        secured = security.check_server_options(curve_secret_key, curve_clients)  # both or neither
        self.config = config
        self.shard = ShardState(config)
        self._setup_checkpoints(checkpoint_dir, checkpoint_every, resume)  # with resume, replaces self.shard
        self.max_header_bytes = max_header_bytes
        self._limit_asked = max_message_bytes  # None: the default, which tightens once the model size is known
        self.max_message_bytes = self._message_limit()
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self._ipc_file: tuple[str, int] | None = None  # (path, inode) of the socket file this server made
        ipc = job_env.ipc_path(bind)
        if ipc is not None:
            _check_ipc_bind(bind, ipc)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=io_threads)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.SNDHWM, MAX_QUEUED_REPLIES)
        self._sock.setsockopt(zmq.RCVHWM, MAX_QUEUED_REQUESTS)
        if self.max_message_bytes > 0:  # ZeroMQ drops the connection of a peer that sends a larger frame
            # Set before bind: libzmq copies the options into the listener, and each connection keeps the
            # listener's. A later change reaches no connection until the endpoint is bound again (what
            # _tighten_message_limit does once, after the first init, and which cuts every connection).
            self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._auth = None
        if secured:  # CURVE: encrypted, and only workers whose public keys are in curve_clients get through
            self._auth = security.secure_server_socket(self._sock, self._ctx, curve_secret_key, curve_clients)
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = bind[:-2] + ":*"
        try:
            self._sock.bind(bind)
        except zmq.ZMQError:
            self.close()  # nothing of a shard that could not start stays open
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._note_ipc_file()
        # ZeroMQ ends the connection of a peer whose frame is over MAXMSGSIZE and tells nobody: the
        # message never arrives, and the monitor's DISCONNECTED event is the only trace. It is the same
        # event as a peer that closed its socket (libzmq 4.3 gives no reason), so disconnects are counted
        # and, with a limit set, logged with the hint.
        # (EVENT_CLOSED: the listener's, awaited by _tighten_message_limit before it binds again.)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        security.warn_if_exposed(self.endpoint, secured)
        self._stop = threading.Event()
        self.counters: Counter[str] = Counter()
        # Cumulative seconds of the loop's own share of a message, beside the shard's phase_seconds (stats
        # merges them): "receive" from a message being available to its request handed to the shard (the
        # recv, header parsing and validation; ZeroMQ's I/O thread has read the bytes already), "send" in
        # replies (header packing, handing frames to ZeroMQ).
        self.phase_seconds = {"receive": 0.0, "send": 0.0}
        # Held by serve() while it changes state; a metrics scrape (dcasgd/metrics.py) reads stats() under it.
        self.lock = threading.Lock()
        # (identity, rid, op) of sync pushes waiting for their round, per worker.
        self._deferred: dict[int, _Route] = {}
        # Per peer, the trackers of the weight frames handed to ZeroMQ and maybe not sent yet.
        self._unsent: dict[bytes, list[zmq.MessageTracker]] = {}
        # Return from serve() once every worker has reported its end (docker compose: the job is over).
        self.exit_when_done = exit_when_done
        self.shared_memory = shared_memory and shm.available()
        # Per worker, the shared-memory region its requests name (the newest: a new one replaces it).
        self._regions: dict[int, shm.Region] = {}
        self._shm_grad: torch.Tensor | None = None  # a gradient copied out of a region, checked and applied here

    def _message_limit(self) -> int:
        """ZeroMQ's frame limit: the one asked for if any (0: none), else the largest legal frame when the
        model size is known (resumed from a checkpoint, or initialized), else ``DEFAULT_MAX_MESSAGE_BYTES``."""
        if self._limit_asked is not None:
            return self._limit_asked
        if not self.shard.initialized:
            return DEFAULT_MAX_MESSAGE_BYTES + _ENVELOPE
        return max(self.max_header_bytes, self.shard.size * protocol.ITEMSIZE) + _ENVELOPE

    def stop(self) -> None:
        """Ask :meth:`serve` to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        if getattr(self, "_monitor", None) is not None:  # a failed bind closes before the monitor exists
            self._sock.disable_monitor()
            self._monitor.close()
            self._monitor = None
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self._ctx.term()
        self._remove_ipc_file()

    def _note_ipc_file(self) -> None:
        """Remember the ipc socket file that binding :attr:`endpoint` made (by inode), for :meth:`close`."""
        path = job_env.ipc_path(self.endpoint)
        if path is not None:
            try:
                self._ipc_file = (path, os.stat(path).st_ino)
            except OSError:
                pass

    def _remove_ipc_file(self) -> None:
        """Remove the ipc socket file this server bound (ZeroMQ leaves it), unless another has replaced it."""
        if self._ipc_file is None:
            return
        path, inode = self._ipc_file
        self._ipc_file = None
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:  # gone already, or its directory is
            pass

    def serve(self) -> None:
        """Serve requests until :meth:`stop` is called."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        log.info(
            "shard %d/%d (%s, %d workers) listening on %s",
            self.config.shard,
            self.config.num_shards,
            self.shard.mode,
            self.config.num_workers,
            self.endpoint,
        )
        while not self._stop.is_set():
            timeout = _POLL_MS
            deadline = self.shard.next_deadline()
            if deadline is not None:
                timeout = max(0, min(timeout, int((deadline - time.monotonic()) * 1000) + 1))
            ready = dict(poller.poll(timeout))
            if self._monitor in ready:
                self._disconnects()
            if self._sock in ready:
                # Drain what is queued, but come back to check deadlines now and then.
                with self.lock:
                    for _ in range(64):
                        t0 = time.perf_counter()
                        try:
                            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames, t0)
                        del frames  # the loop would keep the last message (a payload of any size) until the next
            with self.lock:
                for reply in self.shard.expire(time.monotonic()):
                    self._send_reply(reply, self._deferred.pop(reply.worker, None))
            self._maybe_checkpoint()
        self._checkpoint("on stop")

    # --- one message ---------------------------------------------------------------

    def handle(self, frames: list[zmq.Frame], t0: float | None = None) -> None:
        """Answer one message ``[identity, header, payload...]`` from the ROUTER.

        ``t0``: the ``perf_counter()`` before it was received (for ``phase_seconds["receive"]``).
        """
        if t0 is None:
            t0 = time.perf_counter()
        self.counters["messages"] += 1
        self.counters["bytes_in"] += sum(len(f) for f in frames)  # and a region's gradient, once read
        if len(frames) < 2:
            self._drop("no header frame")
            return
        ident, header, payloads = frames[0].bytes, frames[1], frames[2:]
        # The peer's CURVE public key, as the authenticator reported it; None without CURVE.
        key = header.get("User-Id") if self._auth is not None else None
        try:
            h = protocol.unpack(header.buffer, self.max_header_bytes)
        except MalformedMessage as exc:
            self._drop(exc.reason)
            return
        rid = h.get("rid") if type(h.get("rid")) is int else None
        try:
            req = protocol.validate_request(h, self.config.num_workers, len(payloads))
            if req.nbytes is not None and req.shm is None and len(payloads[0]) != req.nbytes:
                raise ProtocolError(
                    protocol.BAD_SIZE, f"header says {req.nbytes} payload bytes, frame has {len(payloads[0])}"
                )
            if req.instance is not None and req.instance != self.instance:
                # The worker talks to a shard that has since restarted: its backup here is not what it holds.
                raise ProtocolError(
                    protocol.RESTARTED, f"shard {self.config.shard} restarted (now {self.instance}); say hello and pull"
                )
            self._check_base_instance(req)
            self.shard.check(req, key)
            if req.worker is not None and req.op != "claim":
                # An id in use, claimed or not, is never handed out by a claim (two workers would share it),
                # and under CURVE it belongs to the key that first used it (stats, for anyone, binds nothing).
                self.shard.members.seen(req.worker, None if req.op == "stats" else key)
            region = self._region(req) if req.shm is not None else None
            payload = self._payload(req, payloads, region)
            self.counters["op:" + req.op] += 1
            route = (ident, req.rid, req.op, region)
            self.phase_seconds["receive"] += time.perf_counter() - t0
            replies = self._dispatch(req, payload, key)
            if req.op == "init" and self.max_message_bytes != self._message_limit():
                # The model size is known now. Bind again under the tight limit before any answer says the
                # shard has weights: a peer that heard it can reach only the new listener.
                self._tighten_message_limit()
            answered = False
            for reply in replies:
                if reply.worker == req.worker and not answered:
                    answered = True
                    self._send_reply(reply, route)
                else:  # a sync round completed: the others' answers go where they asked
                    # (so does the sender's own, when a `done` closes the round its push waited in)
                    self._send_reply(reply, self._deferred.pop(reply.worker, None))
            if not answered and req.op in protocol.PUSH_OPS:
                self._deferred[req.worker] = route  # a sync push waits for its round
            if req.op == "done":
                self._stop_if_job_done()
        except ProtocolError as exc:
            self.counters["errors"] += 1
            self.counters["error:" + exc.code] += 1
            log.debug("error reply %s to %r", exc, ident)
            t1 = time.perf_counter()
            self._send(ident, protocol.error_header(rid, exc.code, exc.message, shard=self.config.shard))
            self.phase_seconds["send"] += time.perf_counter() - t1

    def _region(self, req: protocol.Request) -> shm.Region:
        """The shared-memory region ``req`` names, mapped once per worker and region.

        Raises ProtocolError ``shm_refused`` (the worker sends frames instead) when this shard
        cannot use it: shared memory is off here, or the region fails a check of ``shm.Region.open``.
        """
        if not self.shared_memory:
            raise ProtocolError(protocol.SHM_REFUSED, f"shard {self.config.shard} runs without shared memory")
        named = req.shm
        held = self._regions.get(req.worker)
        if held is not None and held.token == named.token:  # a token names one region (and so its size)
            return held
        try:
            region = shm.Region.open(
                named.pid, named.fd, named.size, named.token, self.shard.size, self.shard.wire_dtype
            )
        except shm.RegionRefused as exc:
            self.counters["shm_refused"] += 1
            raise ProtocolError(protocol.SHM_REFUSED, f"shard {self.config.shard}: {exc}") from None
        self._regions[req.worker] = region  # the worker's older region, if any, unmaps with its last view
        self.counters["shm_attached"] += 1
        log.debug("shard %d: worker %d's region mapped (%d bytes)", self.config.shard, req.worker, region.size)
        return region

    def _payload(
        self, req: protocol.Request, payloads: list[zmq.Frame], region: shm.Region | None
    ) -> torch.Tensor | None:
        """A request's payload as a 1-D tensor of its type: a view of its frame, or copied out of its region.

        Copied, because the worker could write its region while the shard checks and applies the
        gradient; the copy is what is checked and applied. None for ops without a payload.
        """
        if req.op not in protocol.PAYLOAD_OPS:
            return None
        if region is None:
            return _as_tensor(payloads[0], req.dtype)
        if self._shm_grad is None or self._shm_grad.numel() != region.numel:
            self._shm_grad = torch.empty(region.numel, dtype=region.dtype)
        self._shm_grad.copy_(region.grad)
        self.counters["bytes_in"] += req.nbytes
        self.counters["shm_bytes_in"] += req.nbytes
        return self._shm_grad

    def _dispatch(self, req: protocol.Request, payload: torch.Tensor | None, key: str | None) -> list[Reply]:
        if req.op == "stats":
            return [Reply(req.worker, self.stats())]
        if req.op == "hello":
            info = {**self.shard.hello(req.worker), **self._restart_info(), "shared_memory": self.shared_memory}
            return [Reply(req.worker, info)]
        if req.op == "init":
            return [self.shard.init(req, payload)]
        if req.op == "pull":
            return [self.shard.pull(req.worker, req.rid, req.keep)]
        if req.op == "claim":
            return [Reply(req.worker, self.shard.claim(req.name, key))]
        if req.op == "weights":
            reply = self.shard.weights(req.worker)
            reply.fields.update(self._restart_info())
            return [reply]
        if req.op == "done":
            return self.shard.done(req.worker, req.status, time.monotonic())
        return self.shard.push(req, payload, time.monotonic())

    def stats(self) -> dict[str, Any]:
        """The shard's counters plus the server's (messages, bytes, drops, errors, receive and send seconds)."""
        s = self.shard.stats()
        s["phase_seconds"] = {"receive": self.phase_seconds["receive"], **s["phase_seconds"]}
        s["phase_seconds"]["send"] = self.phase_seconds["send"]
        s["server"] = dict(self.counters)
        s["max_message_bytes"] = self.max_message_bytes
        s.update(self._restart_info())
        s["checkpoint"] = self._checkpoint_info()
        return s

    def _stop_if_job_done(self) -> None:
        members = self.shard.members
        if self.exit_when_done and members.all_done:
            failed = members.failed
            log.info(
                "shard %d: all %d workers finished (%s); exiting",
                self.config.shard,
                self.config.num_workers,
                f"failed: {failed}" if failed else "all with status 0",
            )
            self._stop.set()

    # --- checkpoints (dcasgd/checkpoint.py) ------------------------------------------

    def _setup_checkpoints(self, directory: str | os.PathLike[str] | None, every: float, resume: bool) -> None:
        if (resume or every > 0) and directory is None:
            raise checkpoint.CheckpointError("resume and checkpoint_every need a checkpoint directory")
        self.checkpoint_dir = directory
        self.checkpoint_every = float(every)
        self.instance = secrets.token_hex(8)  # new at every start: clients can tell that a shard restarted
        self.resumed_from_version: int | None = None
        # The job: made at a fresh start, taken from the checkpoint on --resume; written into every
        # checkpoint, and only files of this job are ever read or pruned.
        self.job = checkpoint.new_job_id()
        if resume:
            self.shard, job = checkpoint.resume(directory, self.config)
            if job is None:
                log.warning(
                    "shard %d: the checkpoint is from before job ids; continuing it as job %s "
                    "(its files are left alone, never pruned)",
                    self.config.shard,
                    self.job,
                )
            self.job = job or self.job
            self.resumed_from_version = self.shard.version
            if self.shard.restart_if_finished():
                log.info("shard %d: every worker of the resumed job had finished: a new run", self.config.shard)
            log.info(
                "shard %d: resumed job %s at version %d from %s",
                self.config.shard,
                self.job,
                self.shard.version,
                directory,
            )
        elif directory is not None:
            checkpoint.check_fresh_start(directory, self.config.shard)
        self._ckpt_version = self.resumed_from_version
        self._ckpt_time = time.monotonic()
        # Periodic checkpoints are written by a thread from a copy taken in the loop (the loop goes on
        # meanwhile); False writes them in the loop, as the last one on stop always is.
        self.checkpoint_in_background = True
        self._writer = None if directory is None else checkpoint.Writer(directory, job=self.job)
        self._ckpt_last: checkpoint.Outcome | None = None

    def _checkpoint_info(self) -> dict[str, Any] | None:
        """For ``stats``: the checkpoint being written (its version) and the last one started, or None."""
        if self._writer is None:
            return None
        last = self._ckpt_last
        return {
            "writing": self._writer.writing,
            "version": None if last is None else last.version,
            "pause_s": None if last is None else last.pause,
            "seconds": None if last is None else last.seconds,
            "nbytes": None if last is None else last.nbytes,
        }

    def _check_base_instance(self, req: protocol.Request) -> None:
        """Refuse a push computed on weights an earlier instance sent that this one's checkpoint lacks.

        A shard resumed from a checkpoint numbers new weights from the checkpoint's version on, so a
        version above it from before the restart names weights that are gone (and the same number
        may now name others). A duplicate is answered, never applied: it passes.
        """
        if req.base is None or req.base_instance is None or req.base_instance == self.instance:
            return
        if req.seq is not None and req.seq <= self.shard.last_seq[req.worker]:
            return
        if self.resumed_from_version is None or req.base > self.resumed_from_version:
            raise ProtocolError(
                protocol.BAD_BASE,
                f"worker {req.worker} computed on version {req.base} of shard {self.config.shard} before it "
                f"restarted (resumed at version {self.resumed_from_version}): those weights are gone",
            )

    def _restart_info(self) -> dict[str, Any]:
        return {"instance": self.instance, "resumed_from_version": self.resumed_from_version, "job": self.job}

    def _maybe_checkpoint(self) -> None:
        """A checkpoint if ``checkpoint_every`` seconds passed since the last one and the version moved.

        One at a time: while one is being written in the background, no other starts.
        """
        if self._writer is not None and (outcome := self._writer.poll()) is not None:
            self._checkpoint_done("periodic", outcome)
        if self.checkpoint_every <= 0 or self.shard.version == self._ckpt_version:
            return
        if time.monotonic() - self._ckpt_time < self.checkpoint_every or self._writer.busy:
            return
        if not self.checkpoint_in_background:
            self._ckpt_time = time.monotonic()  # a failed write is retried after another period, not at once
            self._checkpoint("periodic")
            return
        with self.lock:  # a metrics scrape reads the same state
            try:
                outcome = self._writer.start(self.shard)
            except checkpoint.CheckpointError as exc:
                outcome = checkpoint.Outcome(self.shard.version, 0, 0.0, error=exc)
        if outcome is None:  # the writer makes its buffers first (in the background), then starts
            return
        self._ckpt_time = time.monotonic()  # a failed write is retried after another period, not at once
        self._ckpt_last = outcome
        if outcome.error is not None:
            self._checkpoint_done("periodic", outcome)
        else:
            self._ckpt_version = outcome.version  # the version moves on while the file is written

    def _checkpoint(self, why: str) -> None:
        """Write the shard's state to ``checkpoint_dir`` now (if it has weights); a failure is logged.

        Waits first for a checkpoint being written in the background.
        """
        if self.checkpoint_dir is None:
            return
        if (outcome := self._writer.wait()) is not None:
            self._checkpoint_done("periodic", outcome)
        if not self.shard.initialized:
            return
        start = time.perf_counter()
        outcome = checkpoint.Outcome(self.shard.version, 0, 0.0)
        try:
            outcome.path = checkpoint.save(self.shard, self.checkpoint_dir, job=self.job)
        except (OSError, checkpoint.CheckpointError) as exc:
            outcome.error = exc
        outcome.pause = outcome.seconds = time.perf_counter() - start
        if outcome.path is not None:
            outcome.nbytes = outcome.path.stat().st_size
        self._ckpt_last = outcome
        self._checkpoint_done(why, outcome)

    def _checkpoint_done(self, why: str, outcome: checkpoint.Outcome) -> None:
        """Log and count a checkpoint that was written or failed."""
        if outcome.error is not None:
            self.counters["checkpoint_failures"] += 1
            log.error(
                "shard %d: %s checkpoint at v%d failed: %s", self.config.shard, why, outcome.version, outcome.error
            )
            if self._ckpt_version == outcome.version:
                self._ckpt_version = None  # retried after another period even if the version stays
            return
        self.counters["checkpoints"] += 1
        self._ckpt_version = outcome.version
        log.info(
            "shard %d: %s checkpoint at version %d, %.1f MB in %.3f s (the loop paused %.3f s): %s",
            self.config.shard,
            why,
            outcome.version,
            outcome.nbytes / 1e6,
            outcome.seconds,
            outcome.pause,
            outcome.path,
        )

    # --- replies -------------------------------------------------------------------

    def _send_reply(self, reply: Reply, route: _Route | None) -> None:
        if route is None:
            return
        t0 = time.perf_counter()
        try:
            self._send_reply_now(reply, route)
        finally:
            self.phase_seconds["send"] += time.perf_counter() - t0

    def _send_reply_now(self, reply: Reply, route: _Route) -> None:
        ident, rid, op, region = route
        header = protocol.ok_header(rid, op, reply.fields)
        if reply.snapshot is None:
            self._send(ident, header)
            return
        snap = reply.snapshot
        if region is not None:  # the weights go into the worker's region before the answer says so
            if self._send(ident, {**header, "shm": True}, write=lambda: region.weights.copy_(snap.tensor)):
                nbytes = snap.tensor.nbytes
                self.counters["bytes_out"] += nbytes
                self.counters["shm_bytes_out"] += nbytes
            return
        unsent = [t for t in self._unsent.pop(ident, ()) if not t.done]
        if len(unsent) >= MAX_WEIGHT_REPLIES:  # the peer does not read: keep no more weights for it
            self._unsent[ident] = unsent
            self.counters["unroutable_replies"] += 1
            self.counters["reply_queue_full"] += 1
            log.debug("reply to %r not sent: %d answers with weights wait for it", ident, len(unsent))
            return
        if not self._send(ident, header, more=True):
            return
        buf = snap.tensor.view(torch.uint8).numpy()  # raw bytes of any wire type (numpy has no bfloat16)
        # In frames of at most REPLY_FRAME_BYTES (zero-copy views): the worker's I/O thread allocates each
        # frame it receives, and glibc serves blocks under its 32 MiB mmap ceiling from reused heap memory,
        # where one 40 MB frame is a fresh mmap whose pages fault in on every reply (2x the round trip).
        last = max(0, (buf.nbytes - 1) // protocol.REPLY_FRAME_BYTES)
        frames = []
        for k in range(last + 1):
            chunk = buf[k * protocol.REPLY_FRAME_BYTES : (k + 1) * protocol.REPLY_FRAME_BYTES]
            frames.append(self._sock.send(chunk, zmq.SNDMORE if k < last else 0, copy=False, track=True))
        tracker = zmq.MessageTracker(*frames)
        snap.hold(tracker)  # the shard will not reuse this buffer until ZeroMQ is done with every frame
        self.counters["bytes_out"] += buf.nbytes
        unsent.append(tracker)
        self._unsent[ident] = unsent
        if len(self._unsent) > 256:  # peers come and go: forget those with nothing in flight
            self._unsent = {i: ts for i, ts in self._unsent.items() if not all(t.done for t in ts)}

    def _send(
        self, ident: bytes, header: dict[str, Any], more: bool = False, write: Callable[[], Any] | None = None
    ) -> bool:
        """Send ``header`` to peer ``ident`` (``more``: weight frames follow); False when it cannot be routed.

        ``write``: called once the peer is known to be routable, before the header goes (the
        weights into its region: a peer that reads the header finds them written).
        """
        data = protocol.pack(header)
        try:
            self._sock.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN)
            self.counters["unroutable_replies"] += 1
            if exc.errno == zmq.EAGAIN:  # MAX_QUEUED_REPLIES wait for it already: it does not read them
                self.counters["reply_queue_full"] += 1
            log.debug("reply to %r not sent: %s", ident, exc)
            return False
        if write is not None:
            write()
        self._sock.send(data, zmq.SNDMORE if more else 0)
        self.counters["bytes_out"] += len(data)
        return True

    def _tighten_message_limit(self) -> None:
        """Make the largest legal frame ZeroMQ's limit, now that an init told the model size.

        A connection keeps the limit of the listener that accepted it, and a listener the one the
        socket had when it was bound; so: set the limit, unbind, wait until ZeroMQ has closed the
        listener, and bind the same endpoint again (the port or path workers know). Unbinding ends every
        connection the listener accepted, once ZeroMQ has written what is queued for it (LINGER; a large
        answer may be cut short). Peers reconnect by themselves, and a Client resends the request it had
        in flight, the init included (a second init is answered, not applied; a push is applied at most
        once: seq). Raises BindError if the endpoint cannot be bound again within ``_REBIND_SECONDS``,
        after a checkpoint if it has a directory: the shard must stop, not live on unreachable.
        """
        limit, endpoint = self._message_limit(), self.endpoint
        deadline = time.monotonic() + _REBIND_SECONDS
        self._sock.setsockopt(zmq.MAXMSGSIZE, limit)
        self._sock.unbind(endpoint)
        try:
            if not self._read_monitor(closed=endpoint, deadline=deadline):
                raise BindError(f"ZeroMQ did not close the listener within {_REBIND_SECONDS:.0f} s")
            path = job_env.ipc_path(endpoint)
            if path is not None:  # ZeroMQ leaves the file; a bind replaces it, unless another process took it
                _check_ipc_bind(endpoint, path)
            while True:
                try:
                    self._sock.bind(endpoint)
                    break
                except zmq.ZMQError as exc:  # EADDRINUSE: the old listener's port may not be free at once
                    if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                        raise BindError(zmq.strerror(exc.errno)) from None
                    time.sleep(0.01)  # a retry, under the deadline
        except BindError as exc:
            log.error(
                "shard %d: cannot bind %s again to tighten the message limit: %s. The shard stops; start it "
                "again (with --max-message-bytes given, a shard never rebinds)",
                self.config.shard,
                endpoint,
                exc,
            )
            self._checkpoint("on stop")  # the weights it got, for --resume
            raise BindError(f"{endpoint} again (to tighten the message limit): {exc}") from None
        self._note_ipc_file()
        log.info(
            "shard %d: model size known: message limit tightened from %d to %d bytes (the largest legal "
            "frame); %s bound again, so every peer reconnected once",
            self.config.shard,
            self.max_message_bytes,
            limit,
            endpoint,
        )
        self.max_message_bytes = limit

    def _disconnects(self) -> None:
        """Count the peers whose connection ended (the monitor's queued events) and say what it may mean."""
        with self.lock:
            self._read_monitor()

    def _read_monitor(self, closed: str | None = None, deadline: float = 0.0) -> bool:
        """Read the monitor's queued events, and count the disconnects (the caller holds ``self.lock``).

        ``closed``: an endpoint whose listener is closing; then wait until ``time.monotonic()`` reaches
        ``deadline`` for ZeroMQ to report it closed. Returns whether it did (always True without ``closed``).
        """
        n, done = 0, closed is None
        while True:
            wait = 0 if done else int(max(0.0, deadline - time.monotonic()) * 1000) + 1
            if not self._monitor.poll(wait) or (not done and time.monotonic() > deadline):
                break
            event = zmq_monitor.recv_monitor_message(self._monitor)
            n += event["event"] == zmq.EVENT_DISCONNECTED
            done = done or (event["event"] == zmq.EVENT_CLOSED and event["endpoint"].decode() == closed)
        if n:
            self._count_disconnects(n)
        return done

    def _count_disconnects(self, n: int) -> None:
        self.counters["disconnects"] += n
        total = self.counters["disconnects"]
        if self.max_message_bytes <= 0:
            log.debug("shard %d: %d peer connection(s) ended (%d in all)", self.config.shard, n, total)
            return
        size = (
            f"this shard's slice is {self.shard.size * protocol.ITEMSIZE} bytes"
            if self.shard.initialized
            else ("an init sends this shard's slice, 4 bytes per parameter")
        )
        log.info(
            "shard %d: %d peer connection(s) ended (%d in all): a worker that closed, or one that sent a frame "
            "over --max-message-bytes %d, which ZeroMQ refuses without a word (the worker then times out). "
            "If workers time out, start the shards with --max-message-bytes above 4 x the largest slice (%s)",
            self.config.shard,
            n,
            total,
            self.max_message_bytes,
            size,
        )

    def _drop(self, reason: str) -> None:
        self.counters["dropped"] += 1
        log.debug("dropped a message: %s", reason)


def _check_ipc_bind(endpoint: str, path: str) -> None:
    """Refuse an ipc path that is too long, or that another process is listening on, and ``ipc://*``.

    ZeroMQ would say only "File name too long"; and it unlinks whatever file is at the
    path before it binds, so a second shard on the same path would silently take the
    workers of the first. A socket file nobody listens on (a shard that was killed)
    is left for ZeroMQ to replace.
    """
    try:
        job_env.check_endpoint(endpoint)
    except job_env.JobConfigError as exc:
        raise BindError(str(exc)) from None
    if path == "*":  # libzmq 4.3 names a directory relative to the current one, and leaves it behind
        raise BindError(f"{endpoint}: give the socket a path, e.g. ipc:///tmp/dcasgd/shard0")
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):  # ZeroMQ would delete it
        raise BindError(f"{endpoint}: {path} exists and is not a socket: remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return  # a stale socket file: ZeroMQ replaces it
    except OSError as exc:
        raise BindError(f"{endpoint}: {exc.strerror}") from None
    finally:
        probe.close()
    raise BindError(f"{endpoint}: another process is listening on {path} (address in use)")


def _as_tensor(frame: zmq.Frame, dtype: str) -> torch.Tensor:
    """A view of a payload frame as a 1-D tensor of ``dtype`` (a wire type name), without copying it."""
    if len(frame) == 0:
        return torch.empty(0, dtype=getattr(torch, dtype))
    return torch.frombuffer(frame.buffer, dtype=getattr(torch, dtype))


def run_server(
    bind: str,
    config: ShardConfig,
    *,
    threads: int = 0,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    exit_process: bool = False,
    **kwargs: Any,
) -> int:
    """Run one shard in this process until SIGTERM or SIGINT; returns the exit code (0).

    ``threads``: torch intra-op threads for the rules (0: torch's default, one per core).
    ``metrics_port``: serve Prometheus metrics on ``http://metrics_host:metrics_port/metrics`` (0: off).
    ``exit_process``: once the shard has served and closed everything (its last checkpoint written,
    sockets and metrics server closed, logs flushed), end the process with the exit code at once
    (``dcasgd server``): Python's own teardown of torch's modules would take another ~0.5 s.
    """
    keep_freed_memory()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        server = ShardServer(bind, config, **kwargs)
    except checkpoint.CheckpointError as exc:
        print(f"dcasgd server: {exc}", file=sys.stderr)
        return 2
    except BindError as exc:  # the message names the endpoint
        print(f"dcasgd server: cannot bind {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:  # the bind, nearly always: a port in use, an address not on this host
        print(f"dcasgd server: cannot bind {bind}: {zmq.strerror(exc.errno)}", file=sys.stderr)
        return 2

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("shard %d: signal %d, stopping", config.shard, signum)
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    httpd = None
    if metrics_port > 0:
        from .metrics import start_metrics_server

        try:
            httpd, _ = start_metrics_server(metrics_port, server, metrics_host)
        except OSError as exc:
            server.close()
            print(f"dcasgd server: metrics on {metrics_host}:{metrics_port}: {exc}", file=sys.stderr)
            return 2
        log.info("shard %d: metrics on http://%s:%d/metrics", config.shard, metrics_host, httpd.server_port)
    print(f"dcasgd shard {config.shard}/{config.num_shards} listening on {server.endpoint}", flush=True)
    code = 0
    try:
        server.serve()
    except BindError as exc:  # the endpoint could not be bound again to tighten the message limit (logged)
        print(f"dcasgd server: cannot bind {exc}", file=sys.stderr)
        code = 1
    finally:  # an unexpected error goes on from here, with its traceback and Python's usual exit
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        server.close()
    if exit_process:
        _end_process(code)
    return code


def _end_process(code: int) -> None:
    """Flush what this process has written and end it with ``code``, skipping the interpreter's teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, or a closed stream: nothing more to say
            pass
    os._exit(code)
