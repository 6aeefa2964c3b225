"""Prometheus metrics for one shard (``dcasgd server --metrics-port P``).

Nothing is counted twice: a custom collector reads :meth:`ShardServer.stats` when
Prometheus scrapes ``/metrics``, so the serve loop pays nothing but an uncontended
lock (``ShardServer.lock``, held while it handles messages) that keeps a scrape from
reading the shard's state half-way through an update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

if TYPE_CHECKING:
    from .server import ShardServer

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


class ShardCollector:
    """The metrics of one :class:`ShardServer`, read at scrape time."""

    def __init__(self, server: ShardServer) -> None:
        self.server = server
        # Round times: the shard keeps only its last 1000, so the summary's sum is accumulated here.
        self._rounds_seen = 0
        self._round_sum = 0.0
        self._round_lock = threading.Lock()

    def _snapshot(self) -> tuple[dict[str, Any], list[float]]:
        with self.server.lock:
            return self.server.stats(), list(self.server.shard.round_seconds)

    def collect(self) -> Iterator[Metric]:
        s, round_seconds = self._snapshot()
        shard = str(s["shard"])
        srv: dict[str, int] = s["server"]

        info = GaugeMetricFamily(
            "dcasgd_shard_info", "This shard: mode, instance (new at every start), shard count", labels=_INFO_LABELS
        )
        info.add_metric([shard, str(s["num_shards"]), s["mode"], s["instance"]], 1)
        yield info
        yield _gauge("dcasgd_version", "Updates applied to this shard's weights (its version)", shard, s["version"])
        yield _gauge("dcasgd_initialized", "1 once the shard holds weights", shard, int(s["initialized"]))
        # Its slice, as the help says (it was the whole model's n): summed over shards, the model's size.
        yield _gauge("dcasgd_parameters", "Parameters this shard holds", shard, s["hi"] - s["lo"])
        sync = s["mode"] == "sync"  # the sync series mean nothing elsewhere: other modes leave them out
        if sync:
            yield _gauge("dcasgd_live_workers", "Workers taking part in sync rounds", shard, len(s["live"]))

        updates = CounterMetricFamily(
            "dcasgd_updates",
            "Gradients applied (or averaged into a sync round), per worker",
            labels=["shard", "worker"],
        )
        for worker, n in enumerate(s["updates"]):
            updates.add_metric([shard, str(worker)], n)
        yield updates

        yield _staleness(shard, s["staleness"])

        requests = CounterMetricFamily("dcasgd_requests", "Valid requests, by operation", labels=["shard", "op"])
        for key, n in sorted(srv.items()):
            if key.startswith("op:"):
                requests.add_metric([shard, key[3:]], n)
        yield requests
        yield _counter("dcasgd_messages", "Messages received, valid or not", shard, srv.get("messages", 0))
        yield _counter(
            "dcasgd_received_bytes", "Bytes received: frames, and gradients read from shared memory", shard,
            srv.get("bytes_in", 0),
        )  # fmt: skip
        yield _counter(
            "dcasgd_sent_bytes", "Bytes sent in replies: frames, and weights written to shared memory", shard,
            srv.get("bytes_out", 0),
        )  # fmt: skip
        yield _counter(
            "dcasgd_shared_memory_bytes", "Payload bytes that moved through workers' shared-memory regions", shard,
            srv.get("shm_bytes_in", 0) + srv.get("shm_bytes_out", 0),
        )  # fmt: skip
        yield _counter(
            "dcasgd_dropped_messages",
            "Frames that were not a message, dropped unanswered",
            shard,
            srv.get("dropped", 0),
        )
        errors = CounterMetricFamily(
            "dcasgd_error_replies", "Requests refused with an error, by code", labels=["shard", "code"]
        )
        for key, n in sorted(srv.items()):
            if key.startswith("error:"):
                errors.add_metric([shard, key[6:]], n)
        yield errors
        yield _counter(
            "dcasgd_unroutable_replies",
            "Replies not sent: peer gone or its queue full",
            shard,
            srv.get("unroutable_replies", 0),
        )
        yield _counter(
            "dcasgd_peer_disconnects",
            "Peer connections that ended: a worker that closed, or one ZeroMQ cut off for a frame over "
            "--max-message-bytes",
            shard,
            srv.get("disconnects", 0),
        )
        yield _counter(
            "dcasgd_duplicate_pushes", "Retried pushes recognised and not applied again", shard, s["duplicates"]
        )
        yield _counter("dcasgd_non_finite_pushes", "Gradients with NaN or Inf", shard, s["non_finite"])

        finished = GaugeMetricFamily(
            "dcasgd_worker_finished",
            "1 for a worker that reported its end (dcasgd worker); its exit status in the label",
            labels=["shard", "worker", "status"],
        )
        for worker, status in s["finished"]:
            finished.add_metric([shard, str(worker), str(status)], 1)
        yield finished
        if sync:
            yield from self._sync(shard, s, round_seconds)

    def _sync(self, shard: str, s: dict[str, Any], round_seconds: list[float]) -> Iterator[Metric]:
        """The series of a sync shard: rounds, workers left out, round times."""
        yield _counter("dcasgd_sync_rounds", "Sync rounds completed", shard, s["rounds"])
        yield _counter("dcasgd_sync_left_out", "Workers left out of a sync round at its timeout", shard, s["left_out"])
        with self._round_lock:
            new = max(0, s["rounds"] - self._rounds_seen)
            if new:
                self._round_sum += sum(round_seconds[-new:])
                self._rounds_seen = s["rounds"]
            rounds = SummaryMetricFamily(
                "dcasgd_sync_round_seconds", "Time from a round's first push to its end", labels=["shard"]
            )
            rounds.add_metric([shard], count_value=self._rounds_seen, sum_value=self._round_sum)
        yield rounds
        if round_seconds:
            yield _gauge("dcasgd_sync_last_round_seconds", "Duration of the last sync round", shard, round_seconds[-1])


_INFO_LABELS = ["shard", "num_shards", "mode", "instance"]


def _gauge(name: str, doc: str, shard: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["shard"])
    g.add_metric([shard], value)
    return g


def _counter(name: str, doc: str, shard: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["shard"])
    c.add_metric([shard], value)
    return c


def _staleness(shard: str, counts: list[tuple[int, int]]) -> HistogramMetricFamily:
    """``counts``: (staleness, pushes) pairs, as ``ShardState.stats()`` gives them."""
    buckets, total = [], 0
    for bound in STALENESS_BUCKETS:
        buckets.append((str(bound), sum(n for k, n in counts if k <= bound)))
    total = sum(n for _, n in counts)
    buckets.append(("+Inf", total))
    h = HistogramMetricFamily(
        "dcasgd_staleness", "Staleness of applied gradients (updates since the worker's pull)", labels=["shard"]
    )
    h.add_metric([shard], buckets, sum_value=sum(k * n for k, n in counts))
    return h


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def start_metrics_server(
    port: int, server: ShardServer, host: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` for ``server`` on ``host:port`` (0: a free port, see ``httpd.server_port``) in a thread.

    Stop it with ``httpd.shutdown(); httpd.server_close()``.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShardCollector(server))
    httpd = make_server(host, port, make_wsgi_app(registry), handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="dcasgd-metrics", daemon=True)
    thread.start()
    return httpd, thread
