"""``dcasgd status --watch``: the live view, against a running job (shard processes, workers pushing)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from dcasgd import Client
from dcasgd.client import fetch_stats
from dcasgd.protocol import PROTOCOL_VERSION
from dcasgd.watch import quantile

N = 1000


class Pushers:
    """Workers pushing in threads until stopped; ``pause[w]`` seconds between two pushes of worker w."""

    def __init__(self, endpoints: list[str], workers: int, pause: dict[int, float]) -> None:
        self.clients = [Client(endpoints, worker_id=w, timeout=20.0) for w in range(workers)]
        self.clients[0].init(torch.zeros(N))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._push, args=(w, p)) for w, p in pause.items()]
        self.errors: list[BaseException] = []

    def _push(self, w: int, pause: float) -> None:
        c = self.clients[w]
        try:
            c.pull()
            while not self.stop.wait(pause):
                c.push_pull(torch.full((N,), 0.001), lr=0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Pushers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        for c in self.clients:
            c.close()


def wait_until_pushed(endpoints: list[str], workers: list[int], timeout: float = 30.0) -> None:
    """Until every shard has applied pushes of each of ``workers``."""
    deadline = time.monotonic() + timeout
    while not all(all(fetch_stats(ep)["updates"][w] > 0 for w in workers) for ep in endpoints):
        assert time.monotonic() < deadline, f"workers {workers} did not push within {timeout} s"
        time.sleep(0.05)  # polling the shards, with a deadline


def watch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcasgd", "status", "--watch", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def frames(stdout: str) -> list[list[str]]:
    """The frames of a non-terminal run: separated by a blank line before each frame's title."""
    parts = re.split(r"\n\n(?=dcasgd status --watch )", stdout.strip("\n"))
    return [p.splitlines() for p in parts]


def rows(frame: list[str], first: str) -> dict[str, list[str]]:
    """The rows of the table whose header starts with ``first``, by their first cell."""
    start = next(i for i, line in enumerate(frame) if line.startswith(first))
    table = {}
    for line in frame[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        table[cells[0]] = cells[1:]
    return table


@pytest.mark.timeout(90)
def test_watch_shows_shards_workers_and_errors_of_a_running_job(cluster_factory, raw_peer):
    with cluster_factory(2, 3, "dcasgd-a") as cl, Pushers(cl.endpoints, 3, {0: 0.005, 1: 0.1}) as job:
        job.clients[2].done(0)  # worker 2 never pushes and reports its end
        bad, _ = raw_peer(cl.endpoints[1]).request({"v": PROTOCOL_VERSION, "rid": 1, "op": "no_such_op"})
        assert bad["ok"] is False and bad["code"] == "bad_op"
        wait_until_pushed(cl.endpoints, [0, 1])
        out = watch("--count", "2", "--interval", "1", *cl.endpoints)
    assert not job.errors, job.errors
    assert out.returncode == 0, out.stdout + out.stderr
    assert "\x1b[" not in out.stdout  # not a terminal: plain frames
    first, second = frames(out.stdout)
    assert first[0].startswith("dcasgd status --watch ") and first[0].endswith("(2 shards)")

    shards = rows(second, "shard")
    assert list(shards) == [f"0 {cl.endpoints[0]}", f"1 {cl.endpoints[1]}"]
    for s, (mode, version, rate, p_window, p_all, bytes_in, bytes_out, errors) in enumerate(shards.values()):
        assert mode == "dcasgd-a" and int(version) > 0
        assert float(rate) > 5  # worker 0 alone pushes ~100/s here (its pause is 5 ms)
        assert re.fullmatch(r"\d+/\d+", p_window) and re.fullmatch(r"\d+/\d+", p_all)
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB)/s", bytes_in) and re.fullmatch(r"[\d.]+ (B|KiB|MiB)/s", bytes_out)
        assert errors == ("0.0 (1)" if s == 1 else "0.0 (0)")
    assert "sync round" not in second[2]  # an async job has no round column

    workers = rows(second, "worker")
    assert list(workers) == ["0", "1", "2"]
    (rate0, stale0, spread0, state0), (rate1, stale1, spread1, state1), (rate2, stale2, spread2, state2) = (
        workers.values()
    )
    assert float(rate0) > 3 * float(rate1) > 0  # worker 1 is the straggler
    assert state0 == state1 == "live" and int(stale0) >= 0 and int(stale1) >= 0
    bucket = r"(\d+|\d+-\d+)"
    assert re.fullmatch(f"{bucket}/{bucket}", spread0) and re.fullmatch(f"{bucket}/{bucket}", spread1)
    assert (rate2, stale2, spread2, state2) == ("0.0", "-", "-", "finished 0")
    assert "error replies by code: bad_op: 1" in second

    # The first frame has no interval behind it: no rates yet, the rest already there.
    first_shards = rows(first, "shard")
    assert all(cells[2] == "-" and cells[3] == "-" for cells in first_shards.values())
    assert [cells[0] for cells in rows(first, "worker").values()] == ["-", "-", "-"]


@pytest.mark.timeout(90)
def test_watch_sync_round_time_and_a_silent_shard(cluster_factory):
    # --sync-timeout 3: when the pushers stop, the last round closes without the one that stopped
    # first (the default would hold the other one's push for 30 s).
    with cluster_factory(1, 2, "sync", "--sync-timeout", "3") as cl, Pushers(cl.endpoints, 2, {0: 0.01, 1: 0.05}):
        wait_until_pushed(cl.endpoints, [0, 1])
        out = watch("--count", "2", "--interval", "0.5", "--timeout", "1", cl.endpoints[0], "tcp://127.0.0.1:1")
    assert out.returncode == 1, out.stdout + out.stderr  # a shard did not answer the last frame
    second = frames(out.stdout)[1]
    shards = rows(second, "shard")
    (cells,) = (c for ep, c in shards.items() if ep.startswith("0 "))
    assert cells[0] == "sync"
    assert re.fullmatch(r"[\d.]+ ms, [\d.]+/s", cells[-1]), cells  # the last round's time, rounds/s
    assert shards["tcp://127.0.0.1:1"] == ["no answer"]
    assert [w[3] for w in rows(second, "worker").values()] == ["live", "live"]


@pytest.mark.timeout(60)
def test_watch_ends_cleanly_on_ctrl_c(cluster_factory):
    with cluster_factory(1, 1, "async") as cl:
        proc = subprocess.Popen([sys.executable, "-m", "dcasgd", "status", "--watch", cl.endpoints[0]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout.readline().startswith("dcasgd status --watch ")  # the first frame is drawn
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_quantiles_of_the_staleness_histogram():
    assert quantile({}, 0.5) is None
    assert quantile({0: 1, 1: 8, 3: 1}, 0.5) == 1 and quantile({0: 1, 1: 8, 3: 1}, 0.99) == 3
    assert quantile({0: 50, 1: 49, 512: 1}, 0.99) == 1 and quantile({0: 50, 1: 48, 512: 2}, 0.99) == 512
