"""What one peer can make a shard hold: unsent answers, the last message it sent, the size of a frame.

Real shard processes; memory is the shard's resident size (VmRSS in /proc), waited on with deadlines.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq

from dcasgd import Client
from dcasgd import protocol as P
from dcasgd.server import DEFAULT_MAX_MESSAGE_BYTES, MAX_WEIGHT_REPLIES

MIB = 1 << 20
K = MIB // 4  # floats in a 1 MiB shard


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


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
