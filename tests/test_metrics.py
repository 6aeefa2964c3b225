"""``dcasgd server --metrics-port``: Prometheus metrics scraped from a running shard."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import zmq
from conftest import ShardDriver, in_parallel
from prometheus_client.parser import text_string_to_metric_families

from dcasgd import Client
from dcasgd.metrics import ShardCollector
from dcasgd.server import ShardServer
from dcasgd.shard import ShardConfig

N = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 10.0) -> dict[str, dict[tuple, float]]:
    """``/metrics`` as {sample name: {sorted label items: value}}; retried until ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as r:
                text = r.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


@pytest.mark.timeout(60)
def test_scrape_shows_staleness_updates_and_drops(cluster_factory, raw_peer):
    port = free_port()
    # A limit given: the shard does not bind again at the init, after which the workers would resend what
    # was in flight (the init at least) and the request counts would vary.
    with cluster_factory(1, 2, "async", "--metrics-port", str(port), "--max-message-bytes", str(1 << 20)) as cl:
        c0, c1 = (Client(cl.endpoints, worker_id=i, timeout=20.0) for i in range(2))
        c0.init(torch.zeros(N))
        c0.pull()
        c1.pull()
        g = torch.full((N,), 0.01)
        for _ in range(3):  # interleaved: every push after the first is one update behind
            c0.push_pull(g, lr=0.1)
            c1.push_pull(g, lr=0.1)
        c1.done(3)  # worker 1 reports that its command ended with status 3
        raw_peer(cl.endpoints[0]).send(b"\xc1 not msgpack")  # dropped, unanswered
        deadline = time.monotonic() + 10.0
        while True:  # the junk frame is counted when the shard has read it
            m = scrape(port)
            if m["dcasgd_dropped_messages_total"][(("shard", "0"),)] == 1 or time.monotonic() > deadline:
                break
        c0.close()
        c1.close()

    shard = (("shard", "0"),)
    assert m["dcasgd_version"][shard] == 6
    assert m["dcasgd_updates_total"] == {(("shard", "0"), ("worker", "0")): 3, (("shard", "0"), ("worker", "1")): 3}
    assert m["dcasgd_dropped_messages_total"][shard] == 1
    # staleness: 0 once (the first push), 1 five times
    buckets = {float(dict(k)["le"]): v for k, v in m["dcasgd_staleness_bucket"].items()}
    assert list(buckets) == [0, 1, 2, 4, 8, 16, 32, 64, float("inf")]
    assert buckets[0] == 1 and buckets[1] == 6 and buckets[64] == 6 and buckets[float("inf")] == 6
    assert m["dcasgd_staleness_count"][shard] == 6 and m["dcasgd_staleness_sum"][shard] == 5
    requests = {dict(k)["op"]: v for k, v in m["dcasgd_requests_total"].items()}
    assert requests["push_pull"] == 6 and requests["pull"] == 2 and requests["init"] == 1
    assert m["dcasgd_received_bytes_total"][shard] > 6 * N * 4 and m["dcasgd_sent_bytes_total"][shard] > 8 * N * 4
    assert not [name for name in m if name.startswith("dcasgd_sync_")], "an async shard has no sync series"
    assert "dcasgd_live_workers" not in m
    assert m["dcasgd_worker_finished"] == {(("shard", "0"), ("status", "3"), ("worker", "1")): 1}


@pytest.mark.timeout(60)
def test_sync_rounds_and_round_times(cluster_factory):
    port = free_port()
    with cluster_factory(1, 2, "sync", "--metrics-port", str(port)) as cl:
        cs = [Client(cl.endpoints, worker_id=i, timeout=20.0) for i in range(2)]
        cs[0].init(torch.zeros(N))
        for c in cs:
            c.pull()
        g = torch.ones(N)
        for _ in range(2):
            in_parallel(*[lambda c=c: c.push_pull(g, lr=0.1) for c in cs])
        m = scrape(port)
        for c in cs:
            c.close()

    shard = (("shard", "0"),)
    assert m["dcasgd_sync_rounds_total"][shard] == 2
    assert m["dcasgd_sync_round_seconds_count"][shard] == 2 and m["dcasgd_sync_round_seconds_sum"][shard] >= 0
    assert m["dcasgd_version"][shard] == 2
    assert m["dcasgd_staleness_count"][shard] == 4
    (info,) = m["dcasgd_shard_info"]
    assert dict(info)["mode"] == "sync" and dict(info)["num_shards"] == "1" and len(dict(info)["instance"]) == 16


def readme_metrics() -> tuple[set[str], set[str]]:
    """The metric names that the README's "## Metrics" table lists: (all, those marked sync only)."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names, sync_only = set(), set()
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if row.startswith("| `dcasgd_"):
            name = cells[0].strip("`")
            names.add(name)
            if cells[-1].startswith("sync only"):
                sync_only.add(name)
    return names, sync_only


def exported(port: int) -> set[str]:
    """Metric names as a user queries them (a counter with ``_total``), empty families included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0) as r:
        text = r.read().decode()
    return {f.name + "_total" if f.type == "counter" else f.name for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["async", "dcasgd", "dcasgd-a", "sync"])
def test_every_mode_exports_the_readme_metrics_and_only_sync_the_sync_ones(cluster_factory, mode):
    listed, sync_only = readme_metrics()
    assert len(listed) >= 20 and {"dcasgd_live_workers", "dcasgd_sync_rounds_total"} <= sync_only
    port = free_port()
    with cluster_factory(1, 1, mode, "--metrics-port", str(port)) as cl:
        with Client(cl.endpoints, worker_id=0, timeout=20.0) as c:
            c.init(torch.zeros(N))
            c.pull()
            for _ in range(2):  # one worker: each push closes a sync round
                c.push_pull(torch.full((N,), 0.01), lr=0.1)
        scrape(port)  # retried until the metrics server answers
        names = exported(port)
    expected = listed if mode == "sync" else listed - sync_only
    assert names == expected, f"exported, not in the README: {names - listed}; missing: {expected - names}"
    if mode != "sync":
        assert not [n for n in names if n.startswith("dcasgd_sync_")]


@pytest.mark.timeout(30)
def test_parameters_is_the_shards_slice():
    ctx = zmq.Context()
    server = ShardServer("tcp://127.0.0.1:0", ShardConfig(shard=1, num_shards=2, num_workers=1), context=ctx)
    try:
        ShardDriver(server.shard).call("init", 0, torch.zeros(N // 2), n=N + 1, lo=N // 2 + 1, hi=N + 1)
        [family] = [f for f in ShardCollector(server).collect() if f.name == "dcasgd_parameters"]
        assert [s.value for s in family.samples] == [N // 2], "shard 1's slice of N + 1, not the model's N + 1"
    finally:
        server.close()
        ctx.term()
