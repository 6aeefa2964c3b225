"""Transport choices side by side: tcp or ipc, ZeroMQ I/O threads, one connection or several.

Every configuration runs at once, each against its own server process, and the
round trips are interleaved (one of each in turn, the order rotating) so that the
noise of a shared machine falls on all of them alike. Rows:

- ``memcpy``: one copy of the message in this process (a reused buffer), the floor;
- ``echo``: a bare ZeroMQ DEALER to a ROUTER in another process that sends every
  message straight back, over tcp (127.0.0.1) and ipc, with 1 and 2 I/O threads on
  each side; ``xK`` rows split the message over K connections (K DEALERs, one per
  I/O thread), the one way to spread one message's bytes over several I/O threads;
- ``push_pull``: one worker's ``Client.push_pull`` through a real ``dcasgd server``
  (one shard, ``--threads 1``) over tcp and ipc, ``--io-threads`` 1 and 2 (the
  client uses as many).

Prints the median round trip in ms with its range (min to max), the GB/s that
median moves (both directions), and the ratio to the 1-I/O-thread tcp row of the
same kind; writes the raw timings to ``OUT/transport.json``.

    python benchmarks/transport.py                    # 10M floats (40 MB), 30 rounds
    python benchmarks/transport.py --sizes 1000000 10000000 --connections 1 2 4
    python benchmarks/transport.py --quick            # tiny, for CI: every row, no timing value
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq

from dcasgd import Client
from dcasgd.memory import keep_freed_memory

TRANSPORTS = ("tcp", "ipc")


# The echo server: a script of its own, so that it starts in a blink (no torch), with the malloc
# tuning of dcasgd.memory that dcasgd's own processes get.
_ECHO_SERVER = """
import ctypes, sys, zmq
ctypes.CDLL("libc.so.6").mallopt(-3, 2**31 - 1); ctypes.CDLL("libc.so.6").mallopt(-1, 2**31 - 1)
endpoint, io_threads = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context(io_threads=io_threads)
sock = ctx.socket(zmq.ROUTER)
if endpoint.startswith("tcp://"):
    endpoint = "tcp://127.0.0.1:%d" % sock.bind_to_random_port("tcp://127.0.0.1")
else:
    sock.bind(endpoint)
print("listening on", endpoint, flush=True)
while True:
    frames = sock.recv_multipart(copy=False)
    if len(frames) == 2 and frames[1].bytes == b"stop":
        break
    sock.send_multipart(frames, copy=False)
sock.close(linger=0)
ctx.term()
"""


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _endpoint(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"{proc.args} did not start: {line!r}")
    return m.group(1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()


@dataclass
class Config:
    """One row: how to do one round trip, and its timings."""

    kind: str  # memcpy, echo, push_pull
    transport: str
    io_threads: int
    connections: int = 1
    seconds: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.kind == "memcpy":
            return "memcpy"
        conns = f" x{self.connections}" if self.connections > 1 else ""
        return f"{self.kind} {self.transport} io{self.io_threads}{conns}"


class Memcpy:
    proc = None

    def __init__(self, numel: int) -> None:
        self.src = np.random.default_rng(0).standard_normal(numel, dtype=np.float32)
        self.dst = np.empty_like(self.src)

    def connect(self) -> None:
        pass

    def round_trip(self) -> None:
        np.copyto(self.dst, self.src)

    def close(self) -> None:
        pass


class Echo:
    """A DEALER per connection to an echo ROUTER in its own process; the message is split evenly over them."""

    def __init__(self, numel: int, endpoint: str, io_threads: int, connections: int) -> None:
        self.proc = _start([sys.executable, "-c", _ECHO_SERVER, endpoint, str(io_threads)])
        self.numel, self.io_threads, self.connections = numel, io_threads, connections
        self.ctx: zmq.Context | None = None
        self.socks: list[zmq.Socket] = []

    def connect(self) -> None:
        endpoint = _endpoint(self.proc)
        numel, connections = self.numel, self.connections
        self.ctx = zmq.Context(io_threads=self.io_threads)
        for _ in range(connections):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            self.socks.append(s)
        payload = torch.randn(numel).numpy()
        self.back = np.empty_like(payload)
        bounds = np.linspace(0, numel, connections + 1).astype(int)
        self.parts = [(payload[a:b], self.back[a:b]) for a, b in itertools.pairwise(bounds)]

    def round_trip(self) -> None:
        trackers = [s.send(out, copy=False, track=True) for s, (out, _) in zip(self.socks, self.parts, strict=True)]
        for s, (out, into) in zip(self.socks, self.parts, strict=True):
            assert s.recv_into(into) == out.nbytes
        for t in trackers:
            t.wait()

    def close(self) -> None:
        if self.socks:
            self.socks[0].send(b"stop")
        for s in self.socks:
            s.close(linger=100)
        if self.ctx is not None:
            self.ctx.term()
        _stop(self.proc)


class PushPull:
    """One ``dcasgd server`` process and a Client: push_pull of the whole vector, into a reused buffer."""

    def __init__(self, numel: int, endpoint: str, io_threads: int, mode: str) -> None:
        bind = "tcp://127.0.0.1:0" if endpoint.startswith("tcp://") else endpoint
        cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", bind, "--num-workers", "1", "--mode", mode,
               "--log-level", "WARNING", "--threads", "1", "--io-threads", str(io_threads)]  # fmt: skip
        self.proc = _start(cmd)
        self.numel, self.io_threads = numel, io_threads
        self.client: Client | None = None

    def connect(self) -> None:
        numel = self.numel
        self.client = Client([_endpoint(self.proc)], worker_id=0, timeout=60.0, io_threads=self.io_threads)
        self.client.init(torch.randn(numel))
        self.w = self.client.pull()
        self.g = torch.randn(numel) * 1e-3

    def round_trip(self) -> None:
        self.client.push_pull(self.g, lr=0.01, out=self.w)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        _stop(self.proc)


def configs(a: argparse.Namespace) -> list[Config]:
    rows = [Config("memcpy", "-", 0)]
    for transport, io in itertools.product(a.transports, a.io_threads):
        rows.append(Config("echo", transport, io))
    for transport, k in itertools.product(a.transports, [k for k in a.connections if k > 1]):
        rows.append(Config("echo", transport, k, connections=k))  # one I/O thread per connection
    for transport, io in itertools.product(a.transports, a.io_threads):
        rows.append(Config("push_pull", transport, io))
    return rows


def measure(numel: int, a: argparse.Namespace, ipc_dir: str) -> list[Config]:
    rows = configs(a)
    runners = []
    try:
        for i, c in enumerate(rows):
            endpoint = "tcp://127.0.0.1:0" if c.transport == "tcp" else f"ipc://{ipc_dir}/{i}"
            if c.kind == "memcpy":
                runners.append(Memcpy(numel))
            elif c.kind == "echo":
                runners.append(Echo(numel, endpoint, c.io_threads, c.connections))
            else:
                runners.append(PushPull(numel, endpoint, c.io_threads, a.mode))
        for run in runners:  # every server process was started above; they start side by side
            run.connect()
        order = list(range(len(rows)))
        for r in range(a.warmup + a.repeats):
            k = r % len(order)
            for i in order[k:] + order[:k]:  # rotate, so that no row always follows the same one
                t0 = time.perf_counter()
                runners[i].round_trip()
                if r >= a.warmup:
                    rows[i].seconds.append(time.perf_counter() - t0)
    finally:
        for run in runners:
            run.close()
    return rows


DEFAULTS = {"sizes": [10_000_000], "repeats": 30, "warmup": 3, "connections": [1, 2]}
QUICK = {"sizes": [20_000], "repeats": 3, "warmup": 1, "connections": [1, 2]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given explicitly")
    ap.add_argument("--sizes", type=int, nargs="+", help=f"floats per message (default {DEFAULTS['sizes']})")
    ap.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    ap.add_argument("--io-threads", type=int, nargs="+", default=[1, 2], help="I/O threads per side (default 1 2)")
    ap.add_argument(
        "--connections", type=int, nargs="+", help="echo split over K connections, K > 1 adds rows (default 1 2)"
    )
    ap.add_argument("--mode", default="dcasgd-a", help="the shard's update rule for push_pull (default dcasgd-a)")
    ap.add_argument("--repeats", type=int, help=f"timed rounds (default {DEFAULTS['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed rounds first (default {DEFAULTS['warmup']})")
    ap.add_argument("--out", type=Path, default=Path("results/transport"), help="directory for transport.json")
    a = ap.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else value)
    if a.repeats < 1 or min(a.io_threads) < 1 or min(a.connections) < 1:
        ap.error("--repeats, --io-threads and --connections must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    keep_freed_memory()
    results = {
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
        },  # fmt: skip
        "runs": [],
    }
    ipc_dir = tempfile.mkdtemp(prefix="dcasgd-transport-")
    try:
        by_size = {numel: measure(numel, a, ipc_dir) for numel in a.sizes}
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)
    print(f"{'floats':>10}  {'what':<22} {'median ms':>9}  {'range ms':>15} {'GB/s':>6} {'vs tcp io1':>10}")
    for numel, rows in by_size.items():
        base = {}
        for c in rows:
            if c.transport == "tcp" and c.io_threads == 1 and c.connections == 1:
                base[c.kind] = statistics.median(c.seconds)
        for c in rows:
            med = statistics.median(c.seconds)
            moved = numel * 4 * (1 if c.kind == "memcpy" else 2)  # a copy moves it once, a round trip twice
            ratio = med / base[c.kind] if c.kind in base else None
            results["runs"].append({"numel": numel, "what": c.name, "kind": c.kind, "transport": c.transport,
                                    "io_threads": c.io_threads, "connections": c.connections,
                                    "median_s": med, "seconds": c.seconds, "ratio_to_tcp_io1": ratio})  # fmt: skip
            rng = f"{min(c.seconds) * 1e3:.2f}-{max(c.seconds) * 1e3:.2f}"
            r = f"{ratio:.2f}" if ratio is not None else "-"
            print(f"{numel:>10}  {c.name:<22} {med * 1e3:>9.2f}  {rng:>15} {moved / med / 1e9:>6.2f} {r:>10}")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / "transport.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"raw timings: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
