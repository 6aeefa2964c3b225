"""Hostile input at a real shard process: a bad header gets an error reply, garbage is dropped and counted.

Every case checks the whole contract: the expected answer (an error reply with a ``code`` and a
``msg``, or no reply and ``dropped`` + 1), the shard unchanged (weights, version, every stats
field), the server counters, and that the server still answers the same peer afterwards.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
from conftest import RawPeer, start_cluster

from dcasgd import Client
from dcasgd import protocol as P
from dcasgd.layout import flat_fingerprint
from dcasgd.shard import MAX_SEQ_AHEAD

N = 1000
WORKERS = 3  # 0: a well-behaved Client; 1: the raw peer, which holds weights; 2: never receives weights
FP = flat_fingerprint(N)
OTHER_FP = flat_fingerprint(N + 1)
LR = 0.1
G = torch.ones(N).numpy().tobytes()  # a valid gradient payload for the whole (one-shard) model
MISSING = object()  # a field to leave out of a header
NO_REPLY_S = 0.5  # how long a dropped message must stay unanswered

_rids = itertools.count(1000)


def head(op: str, /, **fields: Any) -> dict:
    """A valid request header for ``op`` from worker 1 (the raw peer), then ``fields`` on top.

    A field set to MISSING is left out; ``op=...`` replaces the op after the fields were chosen.
    """
    h: dict[Any, Any] = {"v": P.PROTOCOL_VERSION, "rid": next(_rids), "op": op, "worker": 1}
    if op in ("init", "pull", "push", "push_pull"):
        h["fp"] = FP
    if op in P.PAYLOAD_OPS:
        h |= {"dtype": P.DTYPE, "nbytes": N * P.ITEMSIZE}
    if op in P.PUSH_OPS:
        h |= {"seq": 1, "lr": LR}
    if op == "init":
        h |= {"n": N, "lo": 0, "hi": N}
    h.update(fields)
    return {k: v for k, v in h.items() if v is not MISSING}


def claim_head(name: Any, /, **fields: Any) -> dict:
    """A claim header for ``name`` (MISSING: no name), without a worker id, then ``fields`` on top."""
    return head("claim", **{"worker": MISSING, "name": name, **fields})


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def stats_head() -> dict:
    return {"v": P.PROTOCOL_VERSION, "rid": next(_rids), "op": "stats"}


def padded_stats_header(size: int) -> bytes:
    """A valid stats header of exactly ``size`` bytes (size > 64 KiB needs a str32 pad)."""
    base = {**stats_head(), "pad": ""}
    pad = size - (len(packb(base)) - 1) - 3  # fixstr "" -> a str16 marker
    if pad > 0xFFFF:
        pad -= 2  # a str32 marker
    data = packb({**base, "pad": "x" * pad})
    assert len(data) == size
    return data


# --- the state of the shard, seen through a well-behaved client ---------------------------------------


@dataclass
class State:
    shard: dict  # the shard's stats without the server counters
    server: dict  # the server counters (only non-zero ones are listed)
    weights: torch.Tensor | None

    def count(self, key: str) -> int:
        return self.server.get(key, 0)


def state_of(client: Client, weights: bool = True) -> State:
    st = client.stats()[0]
    server = st.pop("server")
    for key in ("v", "rid", "ok", "op"):  # the reply envelope, not the shard's state
        del st[key]
    del st["phase_seconds"]  # time spent, not state: receiving a bad request takes some too
    return State(st, server, client.pull() if weights else None)


def assert_unchanged(before: State, after: State) -> None:
    assert after.shard == before.shard, "bad input changed the shard's state"
    assert after.shard["version"] == before.shard["version"]
    if before.weights is not None:
        assert torch.equal(after.weights, before.weights), "bad input changed the weights"


def assert_serving(peer: RawPeer) -> None:
    """The same peer gets a normal answer; it is the next message, so nothing else was queued for it."""
    h = stats_head()
    reply, payload = peer.request(h)
    assert reply["ok"] is True and reply["rid"] == h["rid"] and payload == []


def expect_error(peer: RawPeer, client: Client, frames: tuple, code: str, *, weights: bool = True) -> dict:
    """Send ``frames``; expect an error reply with ``code``, no state change, the counters moved."""
    before = state_of(client, weights)
    peer.send(*frames)
    got = peer.recv(timeout=10.0)
    assert got is not None, "no error reply"
    reply, payload = got
    assert reply["ok"] is False, reply
    assert reply["code"] == code, reply
    assert isinstance(reply["msg"], str) and reply["msg"], reply
    assert payload == [], "an error reply carries no payload"
    rid = frames[0].get("rid") if isinstance(frames[0], dict) else None
    assert reply["rid"] == (rid if type(rid) is int else None)
    after = state_of(client, weights)
    assert_unchanged(before, after)
    assert after.count("errors") == before.count("errors") + 1
    assert after.count("error:" + code) == before.count("error:" + code) + 1
    assert after.count("dropped") == before.count("dropped")
    assert_serving(peer)
    return reply


def expect_drop(peer: RawPeer, client: Client, before: State, *, timeout: float = 10.0) -> None:
    """After the bad frames were sent: ``dropped`` goes up by one, no reply comes, nothing changes."""
    deadline = time.monotonic() + timeout
    while client.stats()[0]["server"].get("dropped", 0) == before.count("dropped"):
        assert time.monotonic() < deadline, f"the message was not counted as dropped within {timeout} s"
        assert peer.recv(timeout=0.05) is None, "a malformed message was answered"
    assert peer.recv(timeout=NO_REPLY_S) is None, "a malformed message was answered"
    after = state_of(client, before.weights is not None)
    assert_unchanged(before, after)
    assert after.count("dropped") == before.count("dropped") + 1
    assert after.count("errors") == before.count("errors")
    assert_serving(peer)


# --- one initialized job for the whole module ------------------------------------------------------------


@dataclass
class Job:
    endpoint: str
    client: Client  # worker 0
    w0: torch.Tensor


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Iterator[Job]:
    with start_cluster(tmp_path_factory.mktemp("bad_input"), 1, WORKERS, "dcasgd") as cl:
        client = Client(cl.endpoints, worker_id=0, timeout=10.0, retries=0)
        w0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
        client.init(w0)
        assert torch.equal(client.pull(), w0)
        peer = RawPeer(cl.endpoints[0])
        try:
            reply, [w] = peer.request(head("pull"))  # worker 1 holds weights: its pushes would be applied
            assert reply["ok"] and w == w0.numpy().tobytes()
        finally:
            peer.close()
        yield Job(cl.endpoints[0], client, w0)
        client.close()


def case(id_: str, code: str, *frames: dict | bytes):
    return pytest.param(frames, code, id=id_)


ERROR_CASES = [
    # rid and protocol version
    case("rid-missing", P.BAD_HEADER, head("stats", rid=MISSING)),
    case("rid-negative", P.BAD_HEADER, head("pull", rid=-1)),
    case("rid-str", P.BAD_HEADER, head("pull", rid="7")),
    case("rid-bool", P.BAD_HEADER, head("pull", rid=True)),
    case("rid-empty-ext", P.BAD_HEADER, head("pull", rid=msgpack.ExtType(1, b""))),
    case("keys-are-bytes", P.BAD_HEADER, {b"v": 1, b"rid": 5, b"op": "stats"}),
    case("v-missing", P.BAD_VERSION, head("pull", v=MISSING)),
    case("v-next", P.BAD_VERSION, head("pull", v=P.PROTOCOL_VERSION + 1)),
    case("v-old", P.BAD_VERSION, head("pull", v=1)),
    case("v-true", P.BAD_VERSION, head("pull", v=True)),
    case("v-str", P.BAD_VERSION, head("pull", v="1")),
    case("v-nil", P.BAD_VERSION, head("push", v=None), G),
    # op
    case("op-unknown", P.BAD_OP, head("pull", op="delete")),
    case("op-missing", P.BAD_OP, head("pull", op=MISSING)),
    case("op-upper-case", P.BAD_OP, head("pull", op="PULL")),
    case("op-int", P.BAD_OP, head("pull", op=3)),
    case("op-list", P.BAD_OP, head("pull", op=["pull"])),
    case("op-bytes", P.BAD_OP, head("pull", op=b"pull")),
    case("op-map", P.BAD_OP, head("push", op={"push": 1}), G),
    # worker id
    case("worker-num_workers", P.BAD_WORKER, head("pull", worker=WORKERS)),
    case("worker-negative", P.BAD_WORKER, head("push", worker=-1), G),
    case("worker-huge", P.BAD_WORKER, head("push_pull", worker=2**64 - 1), G),
    case("worker-str", P.BAD_HEADER, head("pull", worker="1")),
    case("worker-bool", P.BAD_HEADER, head("push", worker=True), G),
    case("worker-float", P.BAD_HEADER, head("pull", worker=1.0)),
    case("worker-missing", P.BAD_HEADER, head("push", worker=MISSING), G),
    case("hello-worker-out-of-range", P.BAD_WORKER, head("hello", worker=WORKERS)),
    case("stats-worker-out-of-range", P.BAD_WORKER, {**stats_head(), "worker": WORKERS}),
    # frame count
    case("push-no-payload", P.BAD_FRAMES, head("push")),
    case("push_pull-no-payload", P.BAD_FRAMES, head("push_pull")),
    case("push-two-payloads", P.BAD_FRAMES, head("push"), G, G),
    case("init-no-payload", P.BAD_FRAMES, head("init")),
    case("pull-extra-frame", P.BAD_FRAMES, head("pull"), G),
    case("pull-empty-extra-frame", P.BAD_FRAMES, head("pull"), b""),
    case("hello-extra-frame", P.BAD_FRAMES, head("hello"), G),
    case("stats-extra-frame", P.BAD_FRAMES, stats_head(), b"x"),
    # layout fingerprint
    case("pull-fp-wrong", P.BAD_FINGERPRINT, head("pull", fp=OTHER_FP)),
    case("push-fp-wrong", P.BAD_FINGERPRINT, head("push", fp=OTHER_FP), G),
    case("push_pull-fp-wrong", P.BAD_FINGERPRINT, head("push_pull", fp=OTHER_FP), G),
    case("init-fp-wrong", P.BAD_FINGERPRINT, head("init", fp=OTHER_FP), G),
    case("init-n-differs", P.BAD_FINGERPRINT, head("init", n=N + 1, hi=N + 1, nbytes=(N + 1) * 4), G + bytes(4)),
    case("pull-fp-missing", P.BAD_HEADER, head("pull", fp=MISSING)),
    case("pull-fp-empty", P.BAD_HEADER, head("pull", fp="")),
    case("pull-fp-too-long", P.BAD_HEADER, head("pull", fp=FP * 4 + "0")),
    case("push-fp-int", P.BAD_HEADER, head("push", fp=123), G),
    case("push-fp-bytes", P.BAD_HEADER, head("push", fp=FP.encode()), G),
    # dtype
    case("push-float64", P.BAD_DTYPE, head("push", dtype="float64"), G),
    case("push-dtype-missing", P.BAD_DTYPE, head("push", dtype=MISSING), G),
    case("push_pull-big-endian", P.BAD_DTYPE, head("push_pull", dtype=">f4"), G),
    case("push-dtype-bytes", P.BAD_DTYPE, head("push", dtype=b"float32"), G),
    case("init-float16", P.BAD_DTYPE, head("init", dtype="float16"), G),
    # payload byte length
    case("push-nbytes-not-multiple-of-4", P.BAD_SIZE, head("push", nbytes=N * 4 - 2), G[:-2]),
    case("push-nbytes-smaller-than-shard", P.BAD_SIZE, head("push", nbytes=(N - 1) * 4), G[:-4]),
    case("push_pull-nbytes-larger-than-shard", P.BAD_SIZE, head("push_pull", nbytes=(N + 1) * 4), G + bytes(4)),
    case("push-frame-shorter-than-nbytes", P.BAD_SIZE, head("push"), G[:-4]),
    case("push-frame-longer-than-nbytes", P.BAD_SIZE, head("push"), G + bytes(4)),
    case("push-frame-empty", P.BAD_SIZE, head("push"), b""),
    case("push-nbytes-huge", P.BAD_SIZE, head("push", nbytes=2**62), G),
    case("init-frame-shorter-than-nbytes", P.BAD_SIZE, head("init"), G[:-4]),
    case("push-nbytes-missing", P.BAD_HEADER, head("push", nbytes=MISSING), G),
    case("push-nbytes-negative", P.BAD_HEADER, head("push", nbytes=-4), G),
    case("push-nbytes-float", P.BAD_HEADER, head("push", nbytes=float(N * 4)), G),
    # seq
    case("push-seq-0", P.BAD_SEQ, head("push", seq=0), G),
    case("push-seq-negative", P.BAD_SEQ, head("push", seq=-1), G),
    case("push_pull-seq-0", P.BAD_SEQ, head("push_pull", seq=0), G),
    case("push-seq-missing", P.BAD_HEADER, head("push", seq=MISSING), G),
    case("push-seq-float", P.BAD_HEADER, head("push", seq=1.0), G),
    case("push-seq-bool", P.BAD_HEADER, head("push", seq=True), G),
    # a seq far ahead of the worker's last one (it would make every later push a duplicate): refused, not stored
    case("push-seq-2**64-1", P.BAD_SEQ, head("push", seq=2**64 - 1), G),
    case("push_pull-seq-past-the-window", P.BAD_SEQ, head("push_pull", seq=MAX_SEQ_AHEAD + 1000), G),
    # learning rate
    case("lr-nan", P.BAD_LR, head("push", lr=math.nan), G),
    case("lr-inf", P.BAD_LR, head("push", lr=math.inf), G),
    case("lr-negative", P.BAD_LR, head("push", lr=-0.1), G),
    case("lr-str", P.BAD_LR, head("push", lr="0.1"), G),
    case("lr-bool", P.BAD_LR, head("push", lr=True), G),
    case("push_pull-lr-nan", P.BAD_LR, head("push_pull", lr=math.nan), G),
    # init
    case("init-range-shifted", P.BAD_RANGE, head("init", lo=1, hi=N + 1), G),
    case("init-range-of-another-n", P.BAD_RANGE, head("init", n=2 * N), G),
    case("init-hi-below-lo", P.BAD_RANGE, head("init", lo=N, hi=0, nbytes=0), b""),
    case("init-size-wrong", P.BAD_SIZE, head("init", nbytes=(N - 1) * 4), G[:-4]),
    case("init-lo-negative", P.BAD_HEADER, head("init", lo=-1), G),
    case("init-n-missing", P.BAD_HEADER, head("init", n=MISSING), G),
    # the shard's state
    case("push-before-receiving-weights", P.NO_WEIGHTS, head("push", worker=2), G),
    case("push_pull-before-receiving-weights", P.NO_WEIGHTS, head("push_pull", worker=2), G),
    # claim: a worker's name (no worker id needed); a refused claim takes no id
    case("claim-name-missing", P.BAD_HEADER, claim_head(MISSING)),
    case("claim-name-empty", P.BAD_HEADER, claim_head("")),
    case("claim-name-257-chars", P.BAD_HEADER, claim_head("n" * (P.MAX_NAME_CHARS + 1))),
    case("claim-name-int", P.BAD_HEADER, claim_head(7)),
    case("claim-name-bytes", P.BAD_HEADER, claim_head(b"worker-a")),
    case("claim-name-newline", P.BAD_HEADER, claim_head("worker\nb")),
    case("claim-name-nul", P.BAD_HEADER, claim_head("worker\x00b")),
    case("claim-worker-out-of-range", P.BAD_WORKER, claim_head("fresh-name", worker=WORKERS)),
    case("claim-extra-frame", P.BAD_FRAMES, claim_head("fresh-name"), b"x"),
    # done: a worker's exit status; a refused done finishes nobody (stats "finished" and "live" unchanged)
    case("done-status-missing", P.BAD_HEADER, head("done")),
    case("done-status-negative", P.BAD_HEADER, head("done", status=-1)),
    case("done-status-256", P.BAD_HEADER, head("done", status=256)),
    case("done-status-str", P.BAD_HEADER, head("done", status="0")),
    case("done-status-bool", P.BAD_HEADER, head("done", status=True)),
    case("done-status-float", P.BAD_HEADER, head("done", status=0.0)),
    case("done-worker-out-of-range", P.BAD_WORKER, head("done", worker=WORKERS, status=0)),
    case("done-worker-negative", P.BAD_WORKER, head("done", worker=-1, status=0)),
    case("done-worker-missing", P.BAD_HEADER, head("done", worker=MISSING, status=0)),
    case("done-extra-frame", P.BAD_FRAMES, head("done", status=0), G),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("frames", "code"), ERROR_CASES)
def test_bad_header_gets_an_error_reply_and_changes_nothing(job, raw_peer, frames, code):
    expect_error(raw_peer(job.endpoint), job.client, frames, code)


OVER_HEADER_LIMIT = P.DEFAULT_MAX_HEADER_BYTES + 2048


def drop(id_: str, *frames: bytes):
    return pytest.param(frames, id=id_)


DROP_CASES = [
    drop("garbage", b"\xc1\xc1 not msgpack \xff"),
    drop("garbage-with-payload", b"\xc1", G),
    drop("empty-frame", b""),
    drop("empty-frame-with-payload", b"", G),
    drop("header-is-a-list", packb(["pull", 1, 1])),
    drop("header-is-an-int", packb(7)),
    drop("header-is-a-str", packb("pull")),
    drop("header-is-nil", packb(None)),
    drop("header-is-bin", packb(packb(head("pull")))),
    # Over the 64 KiB header limit, within the frame limit (64 KiB + 4 KiB here): a larger frame never
    # reaches the shard (see test_a_1_gib_header_is_refused_by_the_frame_limit).
    drop("header-over-limit", padded_stats_header(OVER_HEADER_LIMIT)),
    drop("header-over-limit-with-payload", packb({**head("push"), "pad": "x" * OVER_HEADER_LIMIT}), G),
    drop("truncated", packb(head("pull"))[:-1]),
    drop("trailing-bytes", packb(head("pull")) + b"\x00"),
    drop("two-maps", packb(head("pull")) * 2),
    drop("invalid-utf8-value", b"\x81\xa2op\xa2\xff\xfe"),
    drop("invalid-utf8-key", b"\x81\xa2\xff\xfe\x01"),
    drop("int-key", packb({**head("pull"), 1: 2})),
    drop("nil-key", packb({None: 1})),
    drop("nested-int-key", packb({**head("pull"), "x": {1: 2}})),
    drop("ext-with-body", packb({**head("pull"), "x": msgpack.ExtType(1, b"abc")})),
    drop("timestamp", packb({**head("pull"), "t": msgpack.Timestamp(1, 0)})),
    drop("array-over-4096", packb({**head("pull"), "x": [0] * 4097})),
    drop("map-over-256-keys", packb({**head("pull"), **{f"k{i}": i for i in range(300)}})),
    drop("nested-10000-deep", b"\x91" * 10_000 + b"\xc0"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frames", DROP_CASES)
def test_frames_that_are_not_a_message_are_dropped_and_counted(job, raw_peer, frames):
    peer = raw_peer(job.endpoint)
    before = state_of(job.client)
    peer.send(*frames)
    expect_drop(peer, job.client, before)


@pytest.mark.timeout(30)
def test_header_limit_is_64_kib(job, raw_peer):
    peer = raw_peer(job.endpoint)
    at_limit = padded_stats_header(P.DEFAULT_MAX_HEADER_BYTES)
    reply, payload = peer.request(at_limit)
    assert reply["ok"] is True and reply["rid"] == msgpack.unpackb(at_limit)["rid"] and payload == []
    before = state_of(job.client)
    peer.send(padded_stats_header(P.DEFAULT_MAX_HEADER_BYTES + 1))
    expect_drop(peer, job.client, before)


@pytest.mark.timeout(60)
def test_a_1_gib_header_is_refused_by_the_frame_limit(job, raw_peer):
    """The shard has weights, so its frame limit is the largest legal frame: ZeroMQ cuts the peer off at
    the frame's size, before reading it; nothing reaches the shard and nothing changes."""
    assert job.client.stats()[0]["max_message_bytes"] == P.DEFAULT_MAX_HEADER_BYTES + 4096
    peer = raw_peer(job.endpoint)
    assert_serving(peer)  # connected
    before = state_of(job.client)
    peer.send(bytes(1 << 30), copy=False)
    deadline = time.monotonic() + 20.0
    while job.client.stats()[0]["server"].get("disconnects", 0) == before.count("disconnects"):
        assert time.monotonic() < deadline, "the peer was not cut off within 20 s"
        assert peer.recv(timeout=0.05) is None, "a 1 GiB header was answered"
    after = state_of(job.client)
    assert_unchanged(before, after)
    assert after.count("dropped") == before.count("dropped")
    assert after.count("bytes_in") - before.count("bytes_in") < 1 << 20, "the frame was read"
    assert_serving(raw_peer(job.endpoint))


@pytest.mark.timeout(30)
def test_many_bad_messages_in_a_burst_leave_the_server_serving(job, raw_peer):
    peer = raw_peer(job.endpoint)
    before = state_of(job.client)
    bursts = 50
    for _ in range(bursts):
        peer.send(b"\xc1")
        peer.send(head("push", seq=0), G)
    for _ in range(bursts):
        reply, _ = peer.recv(timeout=10.0)
        assert reply["code"] == P.BAD_SEQ
    assert_serving(peer)
    after = state_of(job.client)
    assert_unchanged(before, after)
    assert after.count("dropped") == before.count("dropped") + bursts
    assert after.count("error:bad_seq") == before.count("error:bad_seq") + bursts


@pytest.mark.timeout(30)
def test_claim_when_every_id_is_taken_gets_no_worker_id_and_changes_nothing(job, raw_peer):
    """Claims on the module's job use names of their own. Workers 0 (the Client) and 1 (the raw peer) use
    their ids without a name, so no claim gets those; worker 2 never got through the checks, so id 2 is free."""
    peer = raw_peer(job.endpoint)
    names = ["bad-input-a", "b" * P.MAX_NAME_CHARS, "bad-input-\u00fc"]  # the longest name, a non-ASCII one
    reply, payload = peer.request(claim_head(names[0]))
    assert reply["ok"] is True and payload == [] and reply["name"] == names[0] and reply["num_workers"] == WORKERS
    assert reply["worker"] == 2, "ids 0 and 1 are in use"
    for name in names[1:]:  # valid names (not bad_header), but every id is held now
        reply, payload = peer.request(claim_head(name))
        assert reply["ok"] is False and reply["code"] == P.NO_WORKER_ID and payload == [], reply
    for _ in range(2):  # refused twice: the first refusal took no id
        reply = expect_error(peer, job.client, (claim_head("bad-input-one-too-many"),), P.NO_WORKER_ID)
        assert f"started for {WORKERS} workers" in reply["msg"] and reply["shard"] == 0
        assert "(by bad-input-a; ids 0, 1 given by DCASGD_WORKER_ID, RANK or SLURM_PROCID)" in reply["msg"], reply
    reply, _ = peer.request(claim_head(names[0]))  # the name keeps its id
    assert reply["ok"] is True and reply["worker"] == 2


# --- other clusters: before init, and sync mode -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_requests_before_init_are_refused_and_bad_inits_do_not_initialize(cluster_factory, raw_peer):
    with cluster_factory(1, 2, "async") as cl:
        client = Client(cl.endpoints, worker_id=0, timeout=10.0, retries=0)
        peer = raw_peer(cl.endpoints[0])
        uninitialized = [
            ((head("pull"),), P.NOT_INITIALIZED),
            ((head("push"), G), P.NOT_INITIALIZED),
            ((head("push_pull"), G), P.NOT_INITIALIZED),
            ((head("init", lo=1, hi=N + 1), G), P.BAD_RANGE),
            ((head("init", nbytes=(N - 1) * 4), G[:-4]), P.BAD_SIZE),
            ((head("init"), G[:-4]), P.BAD_SIZE),
            ((head("init", dtype="float64"), G), P.BAD_DTYPE),
            ((head("init"),), P.BAD_FRAMES),
            ((head("init", fp=""), G), P.BAD_HEADER),
            ((head("init", worker=2), G), P.BAD_WORKER),
        ]
        for frames, code in uninitialized:
            expect_error(peer, client, frames, code, weights=False)
        st = client.stats()[0]
        assert st["initialized"] is False and st["version"] == 0 and st["n"] == 0
        before = state_of(client, weights=False)
        peer.send(packb([head("init")]), G)
        expect_drop(peer, client, before)
        assert client.stats()[0]["initialized"] is False
        # A good init still works afterwards, with the good client's weights.
        w0 = torch.arange(N, dtype=torch.float32)
        client.init(w0)
        assert torch.equal(client.pull(), w0)
        assert client.stats()[0]["version"] == 0
        client.close()


@pytest.mark.timeout(60)
def test_sync_second_push_in_a_round_waits_and_is_not_applied(cluster_factory, raw_peer):
    # A worker restarted mid-round (same id, next seq) pushes again while its push from before the
    # crash waits in the round: the first one stands for it, the new one is answered with the round.
    with cluster_factory(1, 2, "sync", "--sync-timeout", "30") as cl:
        client = Client(cl.endpoints, worker_id=0, timeout=10.0, retries=0)
        w0 = torch.zeros(N)
        client.init(w0)
        client.pull()
        peer = raw_peer(cl.endpoints[0])
        assert peer.request(head("pull"))[0]["ok"]
        first = head("push", seq=1, lr=1.0)
        peer.send(first, G)  # waits for worker 0 to complete the round
        deadline = time.monotonic() + 10.0
        while client.stats()[0]["updates"] != [0, 1]:
            assert time.monotonic() < deadline, "the first push never joined the round"
            assert peer.recv(timeout=0.02) is None, "a sync push was answered before its round closed"
        big = (100 * torch.ones(N)).numpy().tobytes()
        later = head("push_pull", seq=2, lr=1.0)
        peer.send(later, big)
        assert peer.recv(timeout=0.3) is None, "the later push was answered before the round closed"
        # The round closes with the first push only: mean(3, 1) = 2, lr 1.
        [reply] = client.push(torch.full((N,), 3.0), lr=1.0)
        assert reply["version"] == 1 and reply["round_size"] == 2
        got = peer.recv(timeout=10.0)
        assert got is not None, "the deferred push was never answered"
        deferred, payload = got
        assert deferred["ok"] is True and deferred["rid"] == later["rid"] and deferred["not_applied"] is True
        assert len(payload) == 1, "a push_pull gets the round's weights"
        assert peer.recv(timeout=0.3) is None, "one answer per round"
        assert torch.equal(client.pull(), torch.full((N,), -2.0))
        st = client.stats()[0]
        assert st["version"] == 1 and st["rounds"] == 1 and st["last_seq"] == [1, 2] and st["updates"] == [1, 1]
        client.close()


# --- last: after all of the above, the job still trains ---------------------------------------------------


@pytest.mark.timeout(30)
def test_after_all_bad_input_a_good_push_pull_is_applied_once(job, raw_peer):
    before = state_of(job.client)
    assert before.shard["version"] == 0, "none of the bad requests above may have been applied"
    assert torch.equal(before.weights, job.w0)
    g = torch.full((N,), 0.5)
    w = job.client.push_pull(g, lr=LR)
    after = state_of(job.client)
    assert after.shard["version"] == before.shard["version"] + 1
    assert after.shard["updates"] == [1, 0, 0]
    torch.testing.assert_close(w, job.w0 - LR * g, rtol=0, atol=1e-6)
    assert torch.equal(after.weights, w)
    # The raw peer's seq 1 was never used up by a refused push: it is applied, not a duplicate.
    peer = raw_peer(job.endpoint)
    reply, [w2] = peer.request(head("push_pull"), G)
    assert reply["ok"] is True and "duplicate" not in reply and reply["version"] == 2
    assert state_of(job.client).shard["last_seq"] == [1, 1, 0]


@pytest.mark.timeout(60)
def test_user_set_limits_on_message_and_header_size(cluster_factory, raw_peer):
    """--max-message-bytes: ZeroMQ disconnects a peer whose frame is larger; --max-header-bytes: dropped, counted."""
    with cluster_factory(1, 1, "async", "--max-message-bytes", "4096", "--max-header-bytes", "200") as cl:
        good = Client(cl.endpoints, worker_id=0, timeout=5.0)
        good.init(torch.zeros(16))
        big = raw_peer(cl.endpoints[0])
        big.send(b"\x00" * 100_000)  # larger than MAXMSGSIZE: the connection goes, nothing reaches the shard
        header = raw_peer(cl.endpoints[0])
        header.send(
            msgpack.packb({"v": P.PROTOCOL_VERSION, "op": "stats", "rid": 1, "pad": "x" * 300})
        )  # a 300-byte header
        reply, _ = header.request(
            {"v": P.PROTOCOL_VERSION, "op": "stats", "rid": 2}
        )  # answered after the big header was seen
        assert reply["rid"] == 2 and reply["server"]["dropped"] == 1
        stats = good.stats()[0]
        # Without the limit the 100 kB frame would have been read (and dropped as a header) too.
        assert stats["server"]["dropped"] == 1 and stats["server"]["bytes_in"] < 100_000 and stats["version"] == 0
        assert big.recv(timeout=0.2) is None
        assert torch.equal(good.pull(), torch.zeros(16))  # still answering
        good.close()
