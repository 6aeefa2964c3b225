"""Round-trip time of ``push_pull`` against a bare ZeroMQ DEALER/ROUTER echo of the same bytes.

Both sides run as separate processes on 127.0.0.1, the way a job runs. The bare
echo is a ROUTER that sends every message straight back and a DEALER that receives
into a reused buffer; it is measured with glibc's default malloc (the baseline of
the ratios) and again with the malloc tuning that dcasgd applies to its own
processes (``dcasgd.memory``), so the table shows what that tuning alone buys.
Then ``push_pull`` of the same number of floats through ``dcasgd server``
processes, for each mode on 1 and 2 shards. Prints median milliseconds and the
ratio to the bare echo; writes the raw timings as JSON.

    python benchmarks/throughput.py                 # 1M and 10M floats, all modes, 1 and 2 shards
    python benchmarks/throughput.py --quick         # 1M floats, async and dcasgd-a, 1 shard, 10 round trips
    python benchmarks/throughput.py --sizes 1000000 --repeats 10 --modes dcasgd-a
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

import torch
import zmq

from dcasgd import MODES, Client
from dcasgd.memory import keep_freed_memory


def _echo_server(port_queue: mp.Queue, tuned: bool) -> None:
    if tuned:
        keep_freed_memory()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port_queue.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    ctx.term()


def time_echo(numel: int, repeats: int, warmup: int, tuned: bool) -> list[float]:
    """Seconds per round trip of ``numel`` float32 through a bare DEALER/ROUTER echo."""
    q: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_echo_server, args=(q, tuned), daemon=True)
    proc.start()
    port = q.get(timeout=30)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = torch.randn(numel).numpy()
    back = torch.empty(numel).numpy()
    times = []
    try:
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            tracker = sock.send(payload, copy=False, track=True)
            got = sock.recv_into(back)
            tracker.wait()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            assert got == payload.nbytes
    finally:
        sock.send(b"stop")
        proc.join(10)
        sock.close(linger=0)
        ctx.term()
    return times


def start_shards(num_shards: int, mode: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, endpoints = [], []
    for s in range(num_shards):
        threads = max(1, (os.cpu_count() or 1) // num_shards)  # shards share the cores
        cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", "tcp://127.0.0.1:0", "--shard", str(s),
               "--num-shards", str(num_shards), "--num-workers", "1", "--mode", mode, "--log-level", "WARNING",
               "--threads", str(threads)]  # fmt: skip
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if not m:
            raise RuntimeError(f"shard {s} did not start: {line!r}")
        endpoints.append(m.group(1))
    return procs, endpoints


def time_push_pull(numel: int, num_shards: int, mode: str, repeats: int, warmup: int) -> list[float]:
    """Seconds per ``push_pull`` of ``numel`` floats on ``num_shards`` fresh shard processes."""
    procs, endpoints = start_shards(num_shards, mode)
    try:
        client = Client(endpoints, worker_id=0, timeout=60.0, tune_malloc=True)  # as measured so far
        client.init(torch.randn(numel))
        w = client.pull()
        g = torch.randn(numel) * 1e-3
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            client.push_pull(g, lr=0.01, out=w)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        client.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return times


DEFAULTS = {"sizes": [1_000_000, 10_000_000], "modes": list(MODES), "shards": [1, 2], "repeats": 30, "warmup": 5}
# A smoke run: the 1M row of the README's table for the cheapest and the default rule.
QUICK = {"sizes": [1_000_000], "modes": ["async", "dcasgd-a"], "shards": [1], "repeats": 10, "warmup": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` fills in :data:`QUICK` for those not given, otherwise :data:`DEFAULTS` apply."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"fewer runs: {QUICK} unless given explicitly")
    ap.add_argument("--sizes", type=int, nargs="+", help=f"floats per message (default {DEFAULTS['sizes']})")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="update rules (default: all)")
    ap.add_argument("--shards", type=int, nargs="+", help=f"shard counts (default {DEFAULTS['shards']})")
    ap.add_argument("--repeats", type=int, help=f"timed round trips per configuration (default {DEFAULTS['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed round trips first (default {DEFAULTS['warmup']})")
    ap.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    a = ap.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else value)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}, "runs": []}  # fmt: skip
    # Every echo first: once this process makes a Client, its own malloc is tuned too.
    measured: dict[int, list[tuple[str, list[float]]]] = {numel: [] for numel in a.sizes}
    for tuned in (False, True):
        if tuned:
            keep_freed_memory()
        for numel in a.sizes:
            what = "bare zmq echo" + (" (tuned)" if tuned else "")
            measured[numel].append((what, time_echo(numel, a.repeats, a.warmup, tuned)))
    for numel in a.sizes:
        for shards in a.shards:
            for mode in a.modes:
                t = time_push_pull(numel, shards, mode, a.repeats, a.warmup)
                measured[numel].append((f"push_pull {mode} x{shards}", t))
    print(f"{'floats':>10} {'what':<24} {'median ms':>10} {'min ms':>8} {'ratio':>6}")
    for numel, rows in measured.items():
        base = statistics.median(rows[0][1])
        for what, t in rows:
            med = statistics.median(t)
            results["runs"].append({"numel": numel, "what": what, "seconds": t, "ratio_to_echo": med / base})
            print(f"{numel:>10} {what:<24} {med * 1e3:>10.2f} {min(t) * 1e3:>8.2f} {med / base:>6.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"raw timings: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
