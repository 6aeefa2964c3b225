"""Shared fixtures: shard servers as real processes on free 127.0.0.1 ports (or ipc sockets)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq
from torch import Tensor

from dcasgd.protocol import Request
from dcasgd.shard import ShardState

START_TIMEOUT = 30.0  # seconds for a shard process to report its endpoint


class Cluster:
    """Shard processes of one job; ``endpoints`` in shard order."""

    def __init__(
        self, procs: list[subprocess.Popen], endpoints: list[str], logs: list[Path], ipc_dir: Path | None = None
    ) -> None:
        self.procs = procs
        self.endpoints = endpoints
        self.logs = logs
        self.ipc_dir = ipc_dir  # the directory of the ipc socket files, for transport="ipc"

    def log(self, shard: int) -> str:
        return self.logs[shard].read_text()


def _read_endpoint(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                return line.rsplit("listening on ", 1)[1].strip()
    raise RuntimeError(f"shard did not start (exit code {proc.poll()}):\n{log.read_text()}")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode


@contextmanager
def start_cluster(
    tmp_path: Path, num_shards: int, num_workers: int, mode: str, *extra: str, transport: str = "tcp"
) -> Iterator[Cluster]:
    """Start ``num_shards`` ``dcasgd server`` processes and stop them on exit.

    ``transport="ipc"``: each shard binds ``ipc://DIR/shardS`` in a fresh short directory (pytest's
    tmp_path may be longer than a Unix socket address allows), removed on exit.
    """
    procs, endpoints, logs = [], [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ipc_dir = Path(tempfile.mkdtemp(prefix="dcasgd-")) if transport == "ipc" else None
    try:
        for s in range(num_shards):
            log = tmp_path / f"shard{s}-{time.monotonic_ns()}.log"
            bind = f"ipc://{ipc_dir}/shard{s}" if ipc_dir is not None else "tcp://127.0.0.1:0"
            cmd = [
                sys.executable, "-m", "dcasgd", "server", "--bind", bind,
                "--shard", str(s), "--num-shards", str(num_shards), "--num-workers", str(num_workers),
                "--mode", mode, "--log-level", "DEBUG", *extra,
            ]  # fmt: skip
            with open(log, "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env))
            logs.append(log)
        for proc, log in zip(procs, logs, strict=True):  # they start side by side: most of a start is imports
            endpoints.append(_read_endpoint(proc, log))
        yield Cluster(procs, endpoints, logs, ipc_dir)
    finally:
        for p in procs:  # SIGTERM to all first, so that they exit side by side
            if p.poll() is None:
                p.terminate()
        for p in procs:
            stop_process(p)
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)


@pytest.fixture
def cluster_factory(tmp_path):
    """``cluster_factory(num_shards, num_workers, mode, *extra_args, transport="tcp")`` as a context manager."""

    def factory(num_shards: int, num_workers: int, mode: str, *extra: str, transport: str = "tcp"):
        return start_cluster(tmp_path, num_shards, num_workers, mode, *extra, transport=transport)

    return factory


class RawPeer:
    """A bare DEALER socket that speaks the wire format by hand, for hostile tests."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes | dict, copy: bool = True) -> None:
        parts = [msgpack.packb(f) if isinstance(f, dict) else f for f in frames]
        self.sock.send_multipart(parts, copy=copy)

    def recv(self, timeout: float = 10.0) -> tuple[dict, list[bytes]] | None:
        """The next reply (header, payload frames), or None if none came within ``timeout`` s."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0], raw=False), frames[1:]

    def request(self, *frames: bytes | dict, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
        self.send(*frames)
        reply = self.recv(timeout)
        assert reply is not None, f"no reply within {timeout} s"
        return reply

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def raw_peer():
    peers: list[RawPeer] = []

    def make(endpoint: str) -> RawPeer:
        peers.append(RawPeer(endpoint))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def in_parallel(*calls, timeout: float = 60.0) -> list:
    """Run the zero-argument ``calls`` in threads at once; their results, in order (errors re-raised)."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"calls still running after {timeout} s"
    if errors:
        raise errors[0]
    return results


class ShardDriver:
    """Feeds one ShardState requests the way ``ShardServer._dispatch`` does: ``check`` first, then the op."""

    def __init__(self, state: ShardState, fp: str = "test-layout") -> None:
        self.state = state
        self.fp = fp
        self.rid = 0

    def call(self, op: str, worker: int, payload: Tensor | None = None, **fields):
        """The replies to one request; ``payload`` (float32, this shard's slice) for init and pushes."""
        self.rid += 1
        nbytes = None if payload is None else payload.numel() * payload.element_size()
        if payload is not None:
            fields.setdefault("dtype", str(payload.dtype).removeprefix("torch."))
        req = Request(op=op, rid=self.rid, worker=worker, fp=self.fp, nbytes=nbytes, **fields)
        self.state.check(req)
        if op == "init":
            return [self.state.init(req, payload)]
        if op == "pull":
            return [self.state.pull(worker, req.rid, req.keep)]
        return self.state.push(req, payload.clone(), now=0.0)


def assert_all_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Each pid exits within ``timeout`` s (a zombie counts as gone: the process has ended)."""
    assert pids
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                alive.append(pid)
        finally:
            os.close(fd)
    assert not alive, f"processes left behind: {alive}"
