"""monitoring/: every metric that the Grafana dashboard and the Prometheus config query is one that a
live shard exports (scraped from real ``dcasgd server --metrics-port`` processes, async and sync)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import in_parallel
from test_metrics import free_port, scrape

from dcasgd import Client
from dcasgd.protocol import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "dcasgd.json"
NAME = re.compile(r"\bdcasgd_[a-z_]+\b")


def _strings(node, key: str):
    """Every string under ``key`` anywhere in a parsed JSON/YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _strings(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)


def queried_metrics() -> set[str]:
    """Metric (sample) names in the dashboard's queries and in any rule of the Prometheus config."""
    exprs = list(_strings(json.loads(DASHBOARD.read_text()), "expr"))
    prom = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    for rules in prom.get("rule_files", []):
        exprs += list(_strings(yaml.safe_load((ROOT / "monitoring" / rules).read_text()), "expr"))
    return {name for e in exprs for name in NAME.findall(e)}


def test_the_dashboard_queries_what_an_operator_asks_for():
    names = queried_metrics()
    assert {
        "dcasgd_updates_total",  # updates/s per worker
        "dcasgd_staleness_bucket",  # staleness quantiles
        "dcasgd_received_bytes_total",
        "dcasgd_sent_bytes_total",
        "dcasgd_version",
        "dcasgd_sync_round_seconds_sum",
        "dcasgd_sync_round_seconds_count",
        "dcasgd_error_replies_total",  # by code
        "dcasgd_worker_finished",
    } <= names
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(p.get("description") for p in panels)


def _job_samples(cluster_factory, raw_peer, mode: str) -> set[str]:
    """Sample names a shard of ``mode`` exports once it has applied pushes, refused a request and
    heard that a worker finished."""
    port = free_port()
    with cluster_factory(1, 2, mode, "--metrics-port", str(port)) as cl:
        c0, c1 = (Client(cl.endpoints, worker_id=i, timeout=20.0) for i in range(2))
        c0.init(torch.zeros(100))
        c0.pull()
        c1.pull()
        for _ in range(2):  # at once: a sync round closes (and answers) when both have pushed
            in_parallel(*(lambda c=c: c.push_pull(torch.ones(100), lr=0.1) for c in (c0, c1)))
        reply, _ = raw_peer(cl.endpoints[0]).request({"v": PROTOCOL_VERSION, "rid": 1, "op": "no_such_op"})
        assert reply["code"] == "bad_op"
        c1.done(0)
        samples = scrape(port)
        c0.close()
        c1.close()
    return set(samples)


@pytest.mark.timeout(120)
def test_every_queried_metric_is_exported_by_a_live_shard(cluster_factory, raw_peer):
    exported = _job_samples(cluster_factory, raw_peer, "dcasgd-a")
    assert "dcasgd_sync_rounds_total" not in exported  # sync series exist only on sync shards
    exported |= _job_samples(cluster_factory, raw_peer, "sync")
    missing = queried_metrics() - exported
    assert not missing, f"queried but not exported: {sorted(missing)}"
