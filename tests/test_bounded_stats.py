"""Stats stay bounded and decodable: a staleness histogram of any length of run, jobs of 4,096+ workers."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ShardDriver

from dcasgd import Client, protocol
from dcasgd.checkpoint import load, save
from dcasgd.client import _MAX_REPLY_HEADER, fetch_stats
from dcasgd.shard import EXACT_STALENESS, ShardConfig, ShardState, staleness_bucket


def test_staleness_buckets():
    assert [staleness_bucket(s) for s in (0, 1, 255, 256, 511, 512, 10_000)] == [0, 1, 255, 256, 256, 512, 8192]


def test_ten_thousand_distinct_staleness_values_keep_the_histogram_small(tmp_path):
    state = ShardState(ShardConfig(num_workers=2))
    shard = ShardDriver(state)
    shard.call("init", 0, torch.zeros(4), n=4, lo=0, hi=4)
    shard.call("pull", 0)
    for seq in range(1, 10_001):  # never pulls again: each push is one version staler than the last
        shard.call("push", 0, torch.ones(4), seq=seq)
    hist = dict(state.stats()["staleness"])
    assert sum(hist.values()) == 10_000
    assert len(hist) == EXACT_STALENESS + 6  # 256..511, ..., 8192..16383
    assert hist[255] == 1 and hist[256] == 256 and hist[8192] == 10_000 - 8192
    reply = protocol.pack(protocol.ok_header(1, "stats", state.stats()))
    assert protocol.unpack(reply, max_bytes=_MAX_REPLY_HEADER, max_items=_MAX_REPLY_HEADER)["version"] == 10_000
    # A checkpoint from before the buckets, with one key per value, is bucketed on load.
    state.staleness = Counter({v: 1 for v in range(10_000)})
    save(state, tmp_path)
    restored = load(tmp_path, state.config)
    assert dict(restored.stats()["staleness"]) == hist


@pytest.mark.timeout(180)
def test_stats_and_status_of_a_job_with_5000_workers_after_4200_pushes(cluster_factory):
    n = 16
    with cluster_factory(1, 5_000, "async") as cl:
        with Client(cl.endpoints, 4_999, timeout=20.0) as c:
            c.init(torch.zeros(n))
            c.pull()
            g = torch.full((n,), 1e-3)
            for _ in range(4_200):
                c.push(g, lr=0.1)  # every push one version staler: 4,200 distinct values before the buckets
            stats = c.stats()[0]
        assert stats["version"] == 4_200 and len(stats["updates"]) == 5_000
        assert len(stats["staleness"]) <= EXACT_STALENESS + 64
        assert fetch_stats(cl.endpoints[0])["updates"][4_999] == 4_200
        out = subprocess.run([sys.executable, "-m", "dcasgd", "status", cl.endpoints[0]], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "2048-4095:" in out.stdout
