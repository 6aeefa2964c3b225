"""What one peer can make a shard hold: unsent answers, the last message it sent, the size of a frame.

Real shard processes; memory is the shard's resident size (VmRSS in /proc), waited on with deadlines.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import msgpack
import pytest
import torch
import zmq
from conftest import in_parallel

from dcasgd import Client, DcasgdError
from dcasgd import protocol as P
from dcasgd import server as server_module
from dcasgd.client import fetch_stats
from dcasgd.layout import flat_fingerprint
from dcasgd.server import DEFAULT_MAX_MESSAGE_BYTES, MAX_WEIGHT_REPLIES, BindError, ShardServer
from dcasgd.shard import ShardConfig

MIB = 1 << 20
K = MIB // 4  # floats in a 1 MiB shard


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """The process's resident size in MiB; ``field="VmHWM"``: its peak since start or :func:`reset_peak_rss`."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak becomes the current resident size (Linux 4.0+)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)  # polling a condition, with a deadline


def header(**fields) -> bytes:
    return msgpack.packb({"v": P.PROTOCOL_VERSION, **fields})


@pytest.fixture
def no_kernel_compile(monkeypatch):
    """The shards run the torch update: numba's compile (tens of MiB, in a background thread from
    the shard's start) would land in the memory these tests measure."""
    monkeypatch.setenv("DCASGD_FUSED", "0")


@pytest.mark.timeout(180)
def test_a_peer_that_never_reads_pins_only_a_few_snapshots(cluster_factory, no_kernel_compile):
    """300 push_pulls (a new version and snapshot each) from a peer that reads none of the answers: without
    the bound the shard kept one 1 MiB snapshot per unsent answer (RSS +600 MB); now a few, the rest dropped."""
    with cluster_factory(1, 2, "dcasgd") as cl:
        pid = cl.procs[0].pid
        c0 = Client(cl.endpoints, 0, timeout=30.0)
        c0.init(torch.zeros(K))
        c0.pull()
        base = rss_mib(pid)
        ctx = zmq.Context()
        try:
            hog = ctx.socket(zmq.DEALER)
            hog.setsockopt(zmq.RCVHWM, 1)  # reads (almost) nothing off the connection
            hog.setsockopt(zmq.LINGER, 0)
            hog.connect(cl.endpoints[0])
            fp, steps, g = c0.fingerprint, 300, torch.zeros(K).numpy()
            hog.send_multipart([header(op="pull", rid=1, worker=1, fp=fp)])
            push = dict(op="push_pull", worker=1, fp=fp, dtype=P.DTYPE, nbytes=4 * K, lr=0.0)
            for i in range(1, steps + 1):
                hog.send_multipart([header(rid=1 + i, seq=i, **push), g])
            wait_for(lambda: c0.stats()[0]["version"] == steps, 150, "all pushes applied")
            st = c0.stats()[0]
            grown = rss_mib(pid) - base
            print(f"RSS {base:.0f} MiB + {grown:.0f} MiB; snapshots {st['snapshots']}; server {st['server']}")
            assert grown < 64, f"the shard grew by {grown:.0f} MiB for a peer that reads nothing"
            assert st["snapshots"] <= 3 * MAX_WEIGHT_REPLIES
            assert st["server"]["reply_queue_full"] >= steps - 40  # a few fit in socket buffers on the way
            # A worker that reads its answers is not affected.
            w = c0.push_pull(torch.ones(K), lr=0.5)
            assert w.shape == (K,) and c0.stats()[0]["version"] == steps + 1
            c0.close()
        finally:
            ctx.destroy(linger=0)


@pytest.mark.timeout(120)
def test_a_large_refused_message_is_not_kept_after_its_answer(cluster_factory, no_kernel_compile):
    """Two 200 MB pushes before init are refused (not_initialized); the shard gives their memory back at
    once, not when some later message happens to arrive (it used to keep the last one)."""
    with cluster_factory(1, 1, "async") as cl:
        pid = cl.procs[0].pid
        ctx = zmq.Context()
        try:
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(cl.endpoints[0])
            peer.send_multipart([header(op="stats", rid=1)])
            assert peer.poll(20_000)
            peer.recv_multipart()
            base = rss_mib(pid)
            big = bytearray(200 * MIB)
            for rid in (2, 3):
                h = header(op="push", rid=rid, worker=0, seq=1, fp="x", dtype=P.DTYPE, nbytes=len(big))
                peer.send_multipart([h, big], copy=False)
                assert peer.poll(60_000)
                assert msgpack.unpackb(peer.recv_multipart()[0])["code"] == P.NOT_INITIALIZED
            del big
            wait_for(lambda: rss_mib(pid) - base < 64, 10, "the shard's memory back near where it was")
        finally:
            ctx.destroy(linger=0)


@pytest.mark.timeout(120)
def test_message_limit_defaults_to_the_largest_legal_frame_once_the_size_is_known(cluster_factory, tmp_path):
    """Before the model size is known: a cap (1 GiB of payload). A shard resumed from a checkpoint knows
    it before it binds: the largest legal frame, and a larger frame cuts the connection (nothing arrives)."""
    ckpt = tmp_path / "ckpt"
    n = 1000
    with cluster_factory(1, 1, "async", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0") as cl:
        c = Client(cl.endpoints, 0, timeout=20.0)
        cap = c.stats()[0]["max_message_bytes"]
        assert DEFAULT_MAX_MESSAGE_BYTES <= cap < DEFAULT_MAX_MESSAGE_BYTES + 64 * 1024
        c.init(torch.zeros(n))
        c.close()
    with cluster_factory(1, 1, "async", "--checkpoint-dir", str(ckpt), "--resume") as cl:
        c = Client(cl.endpoints, 0, timeout=20.0)
        limit = c.stats()[0]["max_message_bytes"]
        assert P.DEFAULT_MAX_HEADER_BYTES <= limit < P.DEFAULT_MAX_HEADER_BYTES + 64 * 1024
        c.pull()
        assert c.push_pull(torch.ones(n), lr=0.5).shape == (n,)  # legal frames pass
        ctx = zmq.Context()
        try:
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(cl.endpoints[0])
            before = c.stats()[0]["server"]
            peer.send_multipart([header(op="stats", rid=1, pad="x" * 10), bytes(limit + 1)])
            wait_for(lambda: c.stats()[0]["server"].get("disconnects", 0) > before.get("disconnects", 0), 20, "cut")
            after = c.stats()[0]["server"]
            assert after["bytes_in"] - before["bytes_in"] < limit, "the large frame was read"
            assert not peer.poll(200), "answered"
        finally:
            ctx.destroy(linger=0)
        c.close()


# --- the limit tightens at the first init ---------------------------------------------------------------

STEPS = 20  # push_pulls per worker
TIGHT = max(P.DEFAULT_MAX_HEADER_BYTES, 4 * K) + 4096  # the largest legal frame of a K-float shard + envelope


def train(c: Client, w0: torch.Tensor | None = None) -> None:
    """A worker: the init if ``w0`` is given; hello as fast as it can until the shard has weights (requests
    in flight while the shard binds again); then a pull and STEPS push_pulls of ones at lr 1."""
    if w0 is not None:
        c.init(w0)
    deadline = time.monotonic() + 60
    while not c.hello()[0]["initialized"]:
        assert time.monotonic() < deadline, "no init within 60 s"
    c.pull()
    for _ in range(STEPS):
        c.push_pull(torch.ones(K), lr=1.0)


def observe(endpoint: str) -> int:
    """``fetch_stats`` as fast as it can until the workers are done (an observer across the rebind); the
    number of answers."""
    answers, deadline = 1, time.monotonic() + 60
    while fetch_stats(endpoint, timeout=10.0)["version"] < 3 * STEPS:
        assert time.monotonic() < deadline, "the workers did not finish within 60 s"
        answers += 1
    return answers


def send_big_frame(endpoint: str, c: Client, pid: int, nbytes: int) -> tuple[float, str]:
    """Send a stats request with a frame of ``nbytes`` from a raw peer, and wait until ZeroMQ cut the peer
    off (the ``disconnects`` counter) or the shard answered. Returns how much the shard's peak resident size
    grew meanwhile (MiB), and what happened: "cut off", or what says the frame got through."""
    before = c.stats()[0]["server"]
    reset_peak_rss(pid)
    base = rss_mib(pid, "VmHWM")
    ctx = zmq.Context()
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint)
        peer.send_multipart([header(op="stats", rid=1), bytearray(nbytes)], copy=False)
        cut = lambda: c.stats()[0]["server"].get("disconnects", 0) > before.get("disconnects", 0)  # noqa: E731
        wait_for(lambda: cut() or peer.poll(0), 20, "the peer cut off or answered")
        read = c.stats()[0]["server"]["bytes_in"] - before["bytes_in"]
        outcome = "answered" if peer.poll(100) else f"read {read} bytes" if read >= nbytes else "cut off"
    finally:
        ctx.destroy(linger=0)
    return rss_mib(pid, "VmHWM") - base, outcome


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_fresh_shard_tightens_the_message_limit_at_the_first_init(cluster_factory, no_kernel_compile, transport):
    """A shard started without weights allows 1 GiB frames (an init of any size); the first init tells the
    model size, and the shard binds its endpoint again with the largest legal frame as ZeroMQ's limit. Three
    workers and an observer that talk to it across that one reconnect go on without an error, no push lost
    or doubled; a 96 MiB frame afterwards is cut off by ZeroMQ without the shard's memory growing by it."""
    clients: list[Client] = []
    with cluster_factory(1, 3, "async", transport=transport) as cl:
        pid, ep = cl.procs[0].pid, cl.endpoints[0]
        assert fetch_stats(ep)["max_message_bytes"] == DEFAULT_MAX_MESSAGE_BYTES + 4096
        ipc_file = cl.ipc_dir / "shard0" if transport == "ipc" else None
        try:
            for worker in range(3):  # connected before the init
                clients.append(Client(cl.endpoints, worker, timeout=20.0))
            *_, answers = in_parallel(
                lambda: train(clients[0], torch.zeros(K)),
                lambda: train(clients[1]),
                lambda: train(clients[2]),
                lambda: observe(ep),
                timeout=90,
            )
            c = clients[0]
            st = c.stats()[0]
            print(f"after training: {answers} stats answers, duplicates {st['duplicates']}, server {st['server']}")
            assert st["version"] == 3 * STEPS, "a push lost or applied twice"
            assert torch.equal(c.pull(), torch.full((K,), -3.0 * STEPS)), "a push lost or applied twice"
            grown, outcome = send_big_frame(ep, c, pid, 96 * MIB)
            print(f"peak RSS grew {grown:.1f} MiB for a 96 MiB frame, {outcome}")
            assert grown < 32, f"the shard's memory grew by {grown:.0f} MiB for a frame over the limit"
            assert outcome == "cut off"
            assert st["max_message_bytes"] == TIGHT
            for w in clients:  # each went through the rebind: a second handshake on its socket
                assert w._handshakes[w._socks[0]].succeeded >= 2
            log = cl.log(0)
            assert log.count("message limit tightened") == 1 and f"to {TIGHT} bytes" in log, log
            if ipc_file is not None:
                assert ipc_file.is_socket()
            w = c.push_pull(torch.ones(K), lr=1.0)  # the workers go on training
            assert torch.equal(w, torch.full((K,), -3.0 * STEPS - 1)) and c.stats()[0]["version"] == 3 * STEPS + 1
        finally:
            for w in clients:
                w.close()
    if ipc_file is not None:
        assert not ipc_file.exists(), "the socket file made by the rebind was left behind"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [0, 8 * MIB])
def test_a_message_limit_given_is_never_changed(cluster_factory, no_kernel_compile, limit):
    """--max-message-bytes given (0: none): the shard keeps it after the init, binds nothing again, and a
    frame over the largest legal one but within the limit is read (and answered)."""
    with cluster_factory(1, 1, "async", "--max-message-bytes", str(limit)) as cl:
        c = Client(cl.endpoints, 0, timeout=20.0)
        c.init(torch.zeros(K))
        c.pull()
        c.push_pull(torch.ones(K), lr=1.0)
        st = c.stats()[0]
        assert st["max_message_bytes"] == limit
        assert c._handshakes[c._socks[0]].succeeded == 1, "the worker was disconnected"
        ctx = zmq.Context()
        try:
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(cl.endpoints[0])
            peer.send_multipart([header(op="stats", rid=1), bytes(2 * TIGHT)])
            assert peer.poll(20_000), "no answer: the frame was refused"
            assert msgpack.unpackb(peer.recv_multipart()[0])["rid"] == 1
            assert c.stats()[0]["server"]["bytes_in"] - st["server"]["bytes_in"] > 2 * TIGHT
        finally:
            ctx.destroy(linger=0)
        assert "message limit tightened" not in cl.log(0)
        c.close()


@pytest.mark.timeout(60)
def test_a_shard_that_cannot_bind_again_stops_and_says_so(cluster_factory, no_kernel_compile, tmp_path):
    """Another process took the shard's ipc path before the init: the shard does not take it back (ZeroMQ
    would unlink the other's socket); it writes its checkpoint and exits with an error that says why."""
    ckpt = tmp_path / "ckpt"
    with cluster_factory(1, 1, "async", "--checkpoint-dir", str(ckpt), transport="ipc") as cl:
        ctx = zmq.Context()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(cl.endpoints[0])
            peer.send_multipart([header(op="stats", rid=1)])
            assert peer.poll(20_000)  # connected to the shard's listener
            peer.recv_multipart()
            path = cl.ipc_dir / "shard0"
            path.unlink()
            other.bind(str(path))
            other.listen()
            init = dict(op="init", rid=2, worker=0, fp=flat_fingerprint(K), n=K, lo=0, hi=K, dtype=P.DTYPE)
            peer.send_multipart([header(**init, nbytes=4 * K), bytes(4 * K)])
            assert cl.procs[0].wait(20) == 1
            assert path.exists()  # the other process's socket is still there
            log = cl.log(0)
            assert "cannot bind" in log and "again (to tighten the message limit)" in log, log
            assert "another process is listening" in log, log
            assert list(ckpt.iterdir()), "no checkpoint written on the way out"
        finally:
            other.close()
            ctx.destroy(linger=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failures", [3, None])
def test_a_rebind_is_retried_until_its_deadline(monkeypatch, failures):
    """An in-thread shard whose rebind meets EADDRINUSE (the old port not free yet, or taken): retried until
    it binds (``failures`` times); when every try fails (None), serve() raises BindError at the deadline."""
    monkeypatch.setattr(server_module, "_REBIND_SECONDS", 0.5)
    ctx = zmq.Context()
    server = ShardServer("tcp://127.0.0.1:0", ShardConfig(), context=ctx)
    real_bind, calls, errors = server._sock.bind, [], []

    def bind(endpoint: str) -> None:
        calls.append(endpoint)
        if failures is None or len(calls) <= failures:
            raise zmq.ZMQError(zmq.EADDRINUSE)
        real_bind(endpoint)

    def serve() -> None:
        try:
            server.serve()
        except BaseException as exc:  # checked below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    try:
        monkeypatch.setattr(server._sock, "bind", bind)
        thread.start()
        with Client([server.endpoint], 0, timeout=5.0, retries=0, context=ctx) as c:
            if failures is not None:
                c.init(torch.zeros(16))
                c.pull()
                assert c.push_pull(torch.ones(16), lr=1.0).eq(-1).all()
                assert c.stats()[0]["max_message_bytes"] == P.DEFAULT_MAX_HEADER_BYTES + 4096
                assert calls == [server.endpoint] * (failures + 1) and not errors
            else:
                with contextlib.suppress(DcasgdError):  # the answer may be lost with the connection
                    c.init(torch.zeros(16))
                thread.join(10)
                assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], BindError), errors
                assert "again (to tighten the message limit)" in str(errors[0]) and len(calls) > 3
    finally:
        server.stop()
        if thread.ident is not None:
            thread.join(10)
        server.close()
        ctx.term()
