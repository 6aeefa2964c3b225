"""Property-based: whatever malformed input a live server gets, it answers with an error or drops
and counts it; the weights never change and it keeps answering."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from conftest import RawPeer, start_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcasgd import Client
from dcasgd.protocol import (
    BAD_DTYPE,
    BAD_FINGERPRINT,
    BAD_FRAMES,
    BAD_HEADER,
    BAD_LR,
    BAD_OP,
    BAD_SEQ,
    BAD_SIZE,
    BAD_VERSION,
    BAD_WORKER,
    NON_FINITE,
    PROTOCOL_VERSION,
)

N, WORKERS = 64, 2
ERROR_CODES = {BAD_DTYPE, BAD_FINGERPRINT, BAD_FRAMES, BAD_HEADER, BAD_LR, BAD_OP, BAD_SEQ, BAD_SIZE, BAD_VERSION,
               BAD_WORKER, NON_FINITE}  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A 1-shard dcasgd-a server; worker 0 is a real client, worker 1 the hostile peer (it has pulled)."""
    with start_cluster(tmp_path_factory.mktemp("hostile"), 1, WORKERS, "dcasgd-a") as cl:
        good = Client(cl.endpoints, worker_id=0, timeout=10.0)
        good.init(torch.randn(N, generator=torch.Generator().manual_seed(0)))
        peer = RawPeer(cl.endpoints[0])
        reply, _ = peer.request({"v": PROTOCOL_VERSION, "op": "pull", "rid": 1, "worker": 1, "fp": good.fingerprint})
        assert reply["ok"]
        yield good, peer
        peer.close()
        good.close()


def valid_push(fp: str) -> dict:
    return {"v": PROTOCOL_VERSION, "op": "push_pull", "rid": 7, "worker": 1, "fp": fp, "seq": 10**6, "dtype": "float32",
            "nbytes": N * 4, "lr": 0.1}  # fmt: skip


GOOD_PAYLOAD = torch.full((N,), 0.5).numpy().tobytes()

# Each entry makes a valid push invalid: (field, a value it must not have); None deletes the field.
BREAKS = st.one_of(
    st.tuples(st.just("op"), st.sampled_from(["pushpull", "", "PULL", 3, None, [1], b"push"])),
    st.tuples(
        st.just("v"),
        st.sampled_from(
            [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION), float(PROTOCOL_VERSION), True, None]
        ),
    ),
    st.tuples(st.just("worker"), st.sampled_from([-1, WORKERS, 2**63 - 1, "1", True, 1.5, None])),
    st.tuples(st.just("seq"), st.sampled_from([0, -1, "9", 1.5, None])),
    st.tuples(st.just("dtype"), st.sampled_from(["float64", ">f4", "", 4, None])),
    st.tuples(st.just("nbytes"), st.sampled_from([0, 4, N * 4 - 4, N * 4 + 4, 3, -4, "256", None])),
    st.tuples(st.just("fp"), st.sampled_from(["0" * 16, "", "x" * 65, 16, None])),
    st.tuples(st.just("lr"), st.sampled_from([math.nan, math.inf, -math.inf, -0.1, "0.1", True])),  # 0 is valid
    st.tuples(st.just("rid"), st.sampled_from([-1, "7", None])),
)
EXTRA_KEYS = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in valid_push("f")),
                             st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=20),
                                       st.binary(max_size=20), st.none()), max_size=3)  # fmt: skip


@st.composite
def hostile_message(draw, fp: str) -> list[bytes]:
    kind = draw(st.sampled_from(["garbage", "broken_header", "bad_payload", "non_finite"]))
    if kind == "garbage":
        return draw(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4))
    header = {**valid_push(fp), **draw(EXTRA_KEYS)}
    payloads = [GOOD_PAYLOAD]
    if kind == "broken_header":
        for field, value in draw(st.lists(BREAKS, min_size=1, max_size=3)):
            if value is None:
                header.pop(field, None)
            else:
                header[field] = value
    elif kind == "bad_payload":
        payloads = draw(st.one_of(
            st.just([]),
            st.lists(st.binary(max_size=N * 8).filter(lambda b: len(b) != N * 4), min_size=1, max_size=1),
            st.just([GOOD_PAYLOAD, GOOD_PAYLOAD]),
        ))  # fmt: skip
    else:
        grad = torch.randn(N)
        for i in draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=5)):
            grad[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        payloads = [grad.numpy().tobytes()]
    return [msgpack.packb(header), *payloads]


def exchange(peer: RawPeer, frames: list[bytes], stats_rid: int) -> tuple[list[dict], dict]:
    """Send ``frames`` then a stats request; the replies before the stats reply answer ``frames``."""
    peer.send(*frames)
    peer.send({"v": PROTOCOL_VERSION, "op": "stats", "rid": stats_rid})
    before = []
    while True:
        got = peer.recv(timeout=10.0)
        assert got is not None, "the server stopped answering"
        header, _ = got
        if header.get("rid") == stats_rid and header.get("op") == "stats":
            return before, header
        before.append(header)


@pytest.mark.timeout(300)
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_input_never_changes_the_weights(live, data):
    good, peer = live
    frames = data.draw(hostile_message(good.fingerprint))
    weights = good.pull()
    _, stats_before = exchange(peer, [msgpack.packb({"v": PROTOCOL_VERSION, "op": "stats", "rid": 900})], 901)
    replies, stats = exchange(peer, frames, 902)
    assert len(replies) <= 1
    if replies:
        (reply,) = replies
        assert reply["ok"] is False and reply["code"] in ERROR_CODES and reply["msg"], reply
        assert stats["server"].get("errors", 0) == stats_before["server"].get("errors", 0) + 1
        if reply["code"] == NON_FINITE:
            assert stats["non_finite"] == stats_before["non_finite"] + 1
    else:
        assert stats["server"].get("dropped", 0) == stats_before["server"].get("dropped", 0) + 1
    assert stats["version"] == stats_before["version"] == 0
    assert stats["updates"] == [0, 0]
    assert torch.equal(good.pull(), weights)
