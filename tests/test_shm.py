"""Same-host shared memory (dcasgd/shm.py): the region's checks, the shard's use of it, the client's rules."""

from __future__ import annotations

import fcntl
import os
import threading

import msgpack
import pytest
import torch
import zmq

from dcasgd import Client, protocol, shm
from dcasgd.layout import flat_fingerprint

N = 10_001  # not a multiple of a page's floats: the areas are padded
# A message limit given: the shard never binds again after the first init, so no request is resent on a
# new connection (a resend goes as frames, which would change the counts these tests check).
FIXED_LIMIT = ("--max-message-bytes", str(1 << 20))


# --- the region's own checks (no shard) ------------------------------------------------------------


def test_a_region_opened_by_pid_and_fd_shares_its_memory_both_ways():
    made = shm.Region.create(N, torch.bfloat16)
    try:
        seen = shm.Region.open(os.getpid(), made.fd, made.size, made.token, N, torch.bfloat16)
        made.grad.copy_(torch.arange(N, dtype=torch.bfloat16))
        assert torch.equal(seen.grad, made.grad)
        seen.weights.fill_(-2.5)
        assert torch.equal(made.weights, torch.full((N,), -2.5, dtype=torch.bfloat16))
        assert made.grad.data_ptr() + N * 2 <= made.weights.data_ptr()  # the areas do not overlap
        assert made.size == shm.region_bytes(N, torch.bfloat16) == 4096 + 2 * 20480
    finally:
        made.close()


def _memfd(name: str, size: int, seals: int) -> int:
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(
    "case, why",
    [
        ("token", "does not hold the token"),
        ("size", "slice needs"),
        ("unsealed", "not sealed"),
        ("name", "not a dcasgd region"),
        ("file", "not a dcasgd region"),
        ("no such fd", "cannot open"),
    ],
)
def test_a_shard_refuses_a_region_that_is_not_one(case, why, tmp_path):
    made = shm.Region.create(N, torch.float32)
    size, token, fd, other = made.size, made.token, made.fd, None
    try:
        if case == "token":
            token = bytes(16)
        elif case == "size":
            size += 4096
        elif case == "unsealed":  # could shrink under the shard's mapping: SIGBUS on its next write
            fd = other = _memfd(shm.NAME, size, 0)
        elif case == "name":
            fd = other = _memfd("someone-else", size, shm.SEALS)
        elif case == "file":  # a plain file the worker can name: the shard must never write it
            path = tmp_path / "victim"
            path.write_bytes(shm.MAGIC + token + bytes(size - 32))
            fd = other = os.open(path, os.O_RDWR)
        elif case == "no such fd":
            fd = 10_000
        with pytest.raises(shm.RegionRefused, match=why):
            shm.Region.open(os.getpid(), fd, size, token, N, torch.float32)
        if case == "file":
            assert (tmp_path / "victim").read_bytes()[32:] == bytes(size - 32)
    finally:
        made.close()
        if other is not None:
            os.close(other)


def test_the_request_field_is_checked():
    h = {"v": 2, "rid": 1, "op": "push", "worker": 0, "fp": "f", "dtype": "float32", "nbytes": 8, "seq": 1}
    named = {"pid": 1, "fd": 3, "size": 8192, "token": "ab" * 16}
    req = protocol.validate_request({**h, "shm": named}, 1, 0)  # no payload frame: the region holds it
    assert req.shm == protocol.Region(1, 3, 8192, bytes([0xAB] * 16))
    with pytest.raises(protocol.ProtocolError, match="bad_frames"):
        protocol.validate_request({**h, "shm": named}, 1, 1)
    for bad in ({**named, "token": "zz" * 16}, {**named, "fd": -1}, {**named, "pid": True}, [1, 2]):
        with pytest.raises(protocol.ProtocolError, match="bad_header"):
            protocol.validate_request({**h, "shm": bad}, 1, 0)


# --- through real shards --------------------------------------------------------------------------


def _run(endpoints: list[str], shared_memory: bool) -> tuple[torch.Tensor, list[bool], list[dict]]:
    """init, pull, push_pull x4, push, pull: the weights, what the client used, the shards' stats."""
    torch.manual_seed(0)
    with Client(endpoints, 0, timeout=20.0, shared_memory=shared_memory) as c:
        c.init(torch.randn(N))
        w = c.pull()
        for _ in range(4):
            w = c.push_pull(torch.randn(N) * 0.1, lr=0.1, out=w)
        c.push(torch.randn(N) * 0.1, lr=0.1)
        return c.pull(), c.shared_memory, c.stats()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode, wire", [("dcasgd-a", "bfloat16"), ("sync", "float16")])
def test_shared_memory_gives_bit_for_bit_the_weights_frames_give(cluster_factory, mode, wire):
    # The narrow wires here (and two shards: a region each); float32 in every mode, shared memory and
    # frames side by side against a float64 reference: tests/test_cluster.py (worker 1 sends frames).
    args = (mode, "--wire-dtype", wire, *FIXED_LIMIT)
    with cluster_factory(2, 1, *args) as a, cluster_factory(2, 1, *args) as b:
        w_shm, used_shm, st_shm = _run(a.endpoints, None)  # the default on one host
        w_frames, used_frames, st_frames = _run(b.endpoints, False)
    assert used_shm == [True, True] and used_frames == [False, False]
    assert torch.equal(w_shm, w_frames)
    assert [s["version"] for s in st_shm] == [5, 5]
    itemsize = protocol.WIRE_DTYPES[wire]
    for s_shm, s_frames in zip(st_shm, st_frames, strict=True):
        srv, frames = s_shm["server"], s_frames["server"]
        assert srv["shm_attached"] == 1 and "shm_attached" not in frames
        # Five gradients in, six replies with weights out, through the region; counted as bytes all the same.
        slice_bytes = (s_shm["hi"] - s_shm["lo"]) * itemsize
        assert (srv["shm_bytes_in"], srv["shm_bytes_out"]) == (5 * slice_bytes, 6 * slice_bytes)
        assert srv["bytes_in"] > srv["shm_bytes_in"] and srv["bytes_out"] > srv["shm_bytes_out"]


@pytest.mark.timeout(60)
def test_a_shard_without_shared_memory_gets_frames(cluster_factory):
    with cluster_factory(1, 1, "async", "--no-shared-memory") as cl:
        w, used, st = _run(cl.endpoints, True)
    assert used == [False] and "shm_refused" not in st[0]["server"] and st[0]["version"] == 5


@pytest.mark.timeout(60)
def test_a_region_the_shard_cannot_open_falls_back_to_frames_and_applies_once(cluster_factory, monkeypatch):
    # As a worker in another container: the fd it names is not one the shard can open.
    monkeypatch.setattr(shm.Region, "describe", lambda self: {"pid": os.getpid(), "fd": 10_000, "size": self.size,
                                                              "token": self.token.hex()})  # fmt: skip
    with cluster_factory(1, 1, "async", *FIXED_LIMIT) as cl:
        with Client(cl.endpoints, 0, timeout=20.0) as c:
            c.init(torch.zeros(N))
            assert torch.equal(c.pull(), torch.zeros(N))  # refused twice, then frames
            assert c.shared_memory == [False]
            w = c.push_pull(torch.ones(N), lr=0.5)
            assert torch.equal(w, torch.full((N,), -0.5))
            st = c.stats()[0]
    assert st["version"] == 1 and st["server"]["shm_refused"] == 2


@pytest.mark.timeout(60)
def test_a_stranger_naming_a_workers_region_without_its_token_changes_nothing(cluster_factory, raw_peer):
    with cluster_factory(1, 2, "async") as cl:
        with Client(cl.endpoints, 0, timeout=20.0) as c:
            c.init(torch.zeros(N))
            c.push_pull(torch.ones(N), lr=1.0, out=c.pull())
            region = c._regions[0]
            peer = raw_peer(cl.endpoints[0])
            fp = flat_fingerprint(N)
            forged = {**region.describe(), "token": "00" * 16}
            h, frames = peer.request({"v": 2, "rid": 7, "op": "push_pull", "worker": 0, "fp": fp, "seq": 99,
                                      "dtype": "float32", "nbytes": 4 * N, "shm": forged})  # fmt: skip
            assert h["ok"] is False and h["code"] == protocol.SHM_REFUSED and frames == []
            st = c.stats()[0]
            assert st["version"] == 1 and st["last_seq"] == [1, 0]
            # The worker's own region still works.
            assert torch.equal(c.push_pull(torch.ones(N), lr=1.0), torch.full((N,), -2.0))


# --- the client's rules, against a scripted shard --------------------------------------------------


class ScriptedShard:
    """A ROUTER in a thread that answers hello as a one-shard job offering shared memory, then runs ``script``."""

    def __init__(self, script) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.script, self.error = script, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def recv(self) -> tuple[bytes, dict, list[bytes]]:
        assert self.sock.poll(20_000), "no request within 20 s"
        ident, header, *payload = self.sock.recv_multipart()
        return ident, msgpack.unpackb(header), payload

    def send(self, ident: bytes, h: dict, fields: dict, *frames: bytes) -> None:
        reply = {"v": 2, "rid": h["rid"], "ok": True, "op": h["op"], **fields}
        self.sock.send_multipart([ident, msgpack.packb(reply), *frames])

    def _run(self) -> None:
        try:
            ident, h, _ = self.recv()
            assert h["op"] == "hello"
            self.send(ident, h, {"shard": 0, "num_shards": 1, "num_workers": 1, "mode": "async", "initialized": True,
                                 "n": N, "fp": flat_fingerprint(N), "last_seq": 0, "wire_dtype": "float32",
                                 "instance": "i1", "non_finite": "refuse", "shared_memory": True})  # fmt: skip
            self.script(self)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.thread.join(30)
        self.sock.close(0)
        self.ctx.term()
        if self.error is not None:
            raise self.error


def _open(h: dict) -> shm.Region:
    r = h["shm"]
    return shm.Region.open(r["pid"], r["fd"], r["size"], bytes.fromhex(r["token"]), N, torch.float32)


@pytest.mark.timeout(60)
def test_a_resent_request_goes_as_frames_and_the_region_is_replaced():
    tokens = []

    def script(shard: ScriptedShard) -> None:
        ident, h, payload = shard.recv()  # the first try names the region; it is left unanswered
        assert h["op"] == "push_pull" and payload == [] and h["nbytes"] == 4 * N
        first = _open(h)
        assert torch.equal(first.grad, torch.full((N,), 3.0))
        tokens.append(h["shm"]["token"])
        ident, h2, payload = shard.recv()  # after the timeout: the same request, in frames
        assert h2["rid"] == h["rid"] and h2["seq"] == h["seq"] and "shm" not in h2
        assert payload == [torch.full((N,), 3.0).numpy().tobytes()]
        shard.send(
            ident, h2, {"version": 1, "staleness": 0, "dtype": "float32"}, torch.full((N,), 7.0).numpy().tobytes()
        )
        ident, h3, payload = shard.recv()  # the next call: a new region, with a new token
        assert payload == [] and h3["shm"]["token"] != tokens[0]
        region = _open(h3)
        region.weights.fill_(9.0)  # the weights, then the answer that says where they are
        shard.send(ident, h3, {"version": 2, "staleness": 0, "dtype": "float32", "shm": True})

    shard = ScriptedShard(script)
    try:
        with Client([shard.endpoint], 0, timeout=1.0, retries=1) as c:
            assert torch.equal(c.push_pull(torch.full((N,), 3.0), lr=0.1), torch.full((N,), 7.0))
            assert c._regions == [None] and c.shared_memory == [True]  # dropped after the call that resent
            assert torch.equal(c.push_pull(torch.ones(N), lr=0.1), torch.full((N,), 9.0))
            assert c._regions[0] is not None
    finally:
        shard.close()


@pytest.mark.timeout(30)
def test_the_shard_checks_and_applies_its_own_copy_of_a_regions_gradient():
    # A worker could write its region between the shard's non-finite check and its rule: what the
    # shard checks and applies is a copy taken once, which later writes to the region do not reach.
    from dcasgd.server import ShardServer
    from dcasgd.shard import ShardConfig

    server = ShardServer("tcp://127.0.0.1:0", ShardConfig(num_workers=1))
    made = shm.Region.create(N, torch.float32)
    try:
        server.shard.init(protocol.validate_request(
            {"v": 2, "rid": 1, "op": "init", "worker": 0, "fp": "f", "n": N, "lo": 0, "hi": N, "dtype": "float32",
             "nbytes": 4 * N}, 1, 1), torch.zeros(N))  # fmt: skip
        named = {"pid": os.getpid(), "fd": made.fd, "size": made.size, "token": made.token.hex()}
        req = protocol.validate_request({"v": 2, "rid": 2, "op": "push", "worker": 0, "fp": "f", "seq": 1,
                                         "dtype": "float32", "nbytes": 4 * N, "shm": named}, 1, 0)  # fmt: skip
        made.grad.fill_(0.5)
        region = server._region(req)
        grad = server._payload(req, [], region)
        made.grad.fill_(float("nan"))  # the worker writes again, after the copy
        assert torch.equal(grad, torch.full((N,), 0.5))
        assert region.grad.isnan().all() and grad.untyped_storage().data_ptr() != region.grad.data_ptr()
    finally:
        server.close()
        made.close()
