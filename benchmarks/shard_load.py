"""How many updates per second one shard applies, against model size and the number of workers.

The number a user needs to size a job: with N workers each stepping every T_step
seconds, the shards must apply N / T_step updates per second between them.

For each size (floats in the shard's slice) and each M, a fresh ``dcasgd server`` (one
shard, ``--threads 1`` as ``dcasgd launch`` starts it) and M light workers: no model and
no torch compute, raw DEALER sockets in a few processes (``--procs``), each worker with
one request in flight, sending ``push_pull`` of a precomputed gradient the moment the
last answer arrives, as fast as the shard answers. After a warm-up the rate is measured
at the shard: its ``stats`` version delta over the time between two ``stats`` replies
``--seconds`` apart; the same replies' ``phase_seconds`` give where a shard's update
goes (receive, check, rule, snapshot, send, per update) and how much of the window its
loop was busy. The rest of the loop's time is waiting for the next message, which on a
2-core machine mostly means waiting for a core (the workers' processes and ZeroMQ's I/O
threads run on the same two).

Memory: the shard keeps a backup per worker (``dcasgd-a``), and up to one request per
worker waits in its queue, so a point needs about (2M + 4) x 4 x size bytes; points
above ``--max-gb`` are skipped (and listed as such).

    python benchmarks/shard_load.py                              # 1M 10M 25M floats, M 1-64, 3 s per point
    python benchmarks/shard_load.py --sizes 10000000 --workers 1 8 32 --seconds 5
    python benchmarks/shard_load.py --quick                      # tiny, for CI: every row, no timing value
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from dcasgd import MODES, Client, protocol
from dcasgd.client import fetch_stats
from dcasgd.memory import keep_freed_memory

PHASES = ("receive", "check", "rule", "snapshot", "send")
_SPAWN = mp.get_context("spawn")


def _load(endpoint: str, workers: list[int], numel: int, fp: str, stop: Any, errors: Any) -> None:
    """Workers ``workers`` of the job in one process: push_pull as fast as the shard answers, until ``stop``."""
    keep_freed_memory()  # each reply is a fresh multi-MB message
    ctx = zmq.Context()
    g = (torch.randn(numel) * 1e-3).numpy()  # one gradient for all: only read, never changed
    socks, seq = {}, dict.fromkeys(workers, 0)
    poller = zmq.Poller()

    def send(w: int, op: str) -> None:
        h = {"v": protocol.PROTOCOL_VERSION, "op": op, "rid": seq[w], "worker": w, "fp": fp, "keep": 1}
        if op == "pull":
            socks[w].send(protocol.pack(h))
            return
        seq[w] += 1
        h.update(rid=seq[w], seq=seq[w], lr=1e-3, dtype="float32", nbytes=g.nbytes)
        socks[w].send_multipart([protocol.pack(h), g], copy=False)

    try:
        for w in workers:
            socks[w] = ctx.socket(zmq.DEALER)
            socks[w].setsockopt(zmq.LINGER, 0)
            socks[w].connect(endpoint)
            poller.register(socks[w], zmq.POLLIN)
            send(w, "pull")  # the shard keeps this worker's backup from here on
        who = {s: w for w, s in socks.items()}
        while not stop.is_set():
            for sock, _ in poller.poll(100):
                frames = sock.recv_multipart(copy=False)
                h = protocol.unpack(frames[0].buffer)
                if not h.get("ok"):
                    errors.put(f"worker {who[sock]}: {h.get('code')}: {h.get('msg')}")
                    return
                send(who[sock], "push_pull")
    finally:
        for s in socks.values():
            s.close(linger=0)
        ctx.term()


def _start_shard(numel: int, workers: int, a: argparse.Namespace, point: int) -> tuple[subprocess.Popen, str]:
    bind = "tcp://127.0.0.1:0" if a.transport == "tcp" else f"ipc://{a.ipc_dir}/shard-load-{os.getpid()}-{point}"
    cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", bind, "--num-workers", str(workers), "--mode", a.mode,
           "--log-level", "WARNING", "--threads", str(a.shard_threads)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"the shard did not start: {line!r}")
    return p, m.group(1)


def need_bytes(numel: int, workers: int) -> int:
    """About what one point holds at once: w, mean square, snapshots, a backup and a request per worker."""
    return (2 * workers + 4) * 4 * numel


def measure(numel: int, workers: int, a: argparse.Namespace, point: int) -> dict[str, Any]:
    """One point: a fresh shard, ``workers`` light workers, the rate over ``a.seconds``."""
    shard, endpoint = _start_shard(numel, workers, a, point)
    stop, errors = _SPAWN.Event(), _SPAWN.Queue()
    loads = []
    try:
        with Client([endpoint], worker_id=0, timeout=120.0, tune_malloc=True) as init:
            init.init(torch.zeros(numel))
            fp = init.fingerprint
        procs = min(a.procs, workers)
        for p in range(procs):
            mine = list(range(p, workers, procs))
            loads.append(_SPAWN.Process(target=_load, args=(endpoint, mine, numel, fp, stop, errors), daemon=True))
            loads[-1].start()
        deadline = time.monotonic() + 300
        while fetch_stats(endpoint, timeout=120)["version"] < workers:  # every worker has pushed once
            if not errors.empty() or time.monotonic() > deadline:
                raise RuntimeError(errors.get() if not errors.empty() else "the workers did not start pushing")
            time.sleep(0.2)
        time.sleep(a.warmup)
        s0, t0 = fetch_stats(endpoint, timeout=120), time.perf_counter()
        time.sleep(a.seconds)
        s1, t1 = fetch_stats(endpoint, timeout=120), time.perf_counter()
        if not errors.empty():
            raise RuntimeError(errors.get())
    finally:
        stop.set()
        for p in loads:
            p.join(30)
            if p.is_alive():
                p.kill()
        shard.terminate()
        shard.wait(30)
    updates = s1["version"] - s0["version"]
    window = t1 - t0
    per_update = {p: (s1["phase_seconds"][p] - s0["phase_seconds"][p]) / max(1, updates) for p in PHASES}
    staleness = {k: v for k, v in s1["staleness"]}
    return {
        "numel": numel,
        "workers": workers,
        "updates": updates,
        "seconds": window,
        "rate": updates / window,
        "phase_seconds_per_update": per_update,
        "busy": sum(per_update.values()) * updates / window,
        "median_staleness": _median_of_histogram(staleness),
    }


def _median_of_histogram(hist: dict[int, int]) -> int | None:
    if not hist:
        return None
    expanded = [k for k, n in sorted(hist.items()) for _ in range(min(n, 100_000))]
    return int(statistics.median_low(expanded))


DEFAULTS = {"sizes": [1_000_000, 10_000_000, 25_000_000], "workers": [1, 2, 4, 8, 16, 32, 64], "seconds": 3.0,
            "warmup": 1.0}  # fmt: skip
QUICK = {"sizes": [100_000], "workers": [1, 2], "seconds": 0.5, "warmup": 0.2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` fills in :data:`QUICK` for those not given, otherwise :data:`DEFAULTS` apply."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given explicitly")
    ap.add_argument("--sizes", type=int, nargs="+", help=f"floats in the shard (default {DEFAULTS['sizes']})")
    ap.add_argument("--workers", type=int, nargs="+", help=f"M, light workers (default {DEFAULTS['workers']})")
    ap.add_argument("--seconds", type=float, help=f"measured window per point (default {DEFAULTS['seconds']})")
    ap.add_argument("--warmup", type=float, help=f"seconds of load before it (default {DEFAULTS['warmup']})")
    ap.add_argument("--mode", default="dcasgd-a", choices=MODES, help="the shard's rule (default dcasgd-a)")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "ipc"), help="tcp (127.0.0.1, default) or ipc")
    ap.add_argument("--procs", type=int, default=2, help="processes the workers are spread over (default 2)")
    ap.add_argument("--shard-threads", type=int, default=1, help="the shard's --threads (default 1)")
    ap.add_argument("--max-gb", type=float, default=8.0, help="skip points that need more memory (default 8)")
    ap.add_argument("--out", type=Path, default=Path("results/shard_load.json"))
    a = ap.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else value)
    if min(a.workers) < 1 or a.procs < 1 or a.seconds <= 0:
        ap.error("--workers and --procs must be >= 1, --seconds > 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    keep_freed_memory()
    a.ipc_dir = "/tmp"
    results: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
        },  # fmt: skip
        "points": [],
        "skipped": [],
    }
    print(f"one {a.mode} shard (--threads {a.shard_threads}, {a.transport}), M light workers pushing push_pull")
    print(f"{'floats':>11} {'M':>3} {'updates/s':>9} {'ms/update':>9}  " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'busy':>5} {'stale':>5}")  # fmt: skip
    point = 0
    for numel in a.sizes:
        for workers in a.workers:
            point += 1
            if need_bytes(numel, workers) > a.max_gb * 1e9:
                results["skipped"].append({"numel": numel, "workers": workers, "why": f"over --max-gb {a.max_gb}"})
                print(f"{numel:>11,} {workers:>3}  skipped: needs about {need_bytes(numel, workers) / 1e9:.1f} GB")
                continue
            r = measure(numel, workers, a, point)
            results["points"].append(r)
            ph = r["phase_seconds_per_update"]
            print(f"{numel:>11,} {workers:>3} {r['rate']:>9.1f} {1e3 / r['rate']:>9.2f}  "
                  + " ".join(f"{ph[p] * 1e3:>8.2f}" for p in PHASES)
                  + f" {r['busy']:>5.2f} {r['median_staleness']!s:>5}", flush=True)  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print("phases: the shard's ms per update; busy: the loop's share of the window in them; stale: median staleness")
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
