"""Round trip of ``push_pull`` against a bare ZeroMQ echo and a torch.distributed.rpc server, side by side.

Every row is a client process of its own talking to a server process of its own, all
set up at once; the round trips are interleaved (one of each row in turn, the order
rotating) so that the noise of a shared machine falls on every row alike. Rows:

- ``bare zmq echo``: a ROUTER that sends every message straight back and a DEALER that
  receives into a reused buffer, glibc's default malloc on both sides (the baseline of
  the ratios); ``(tuned)``: the same with the malloc tuning dcasgd applies to its own
  processes (``dcasgd.memory``), so the table shows what that tuning alone buys;
- ``torch rpc sgd``: what a PyTorch user would write without dcasgd: a
  ``torch.distributed.rpc`` server (TensorPipe, 127.0.0.1) holding the weights and a
  function ``push_pull(g, lr)`` that does ``w.add_(g, alpha=-lr); return w``; TensorPipe picks
  its fastest transport on one host (shared memory, cross-process copies); ``tcp``: TensorPipe
  told to use tcp alone (``uv`` transport, ``basic`` channel), as dcasgd's tcp rows do;
- ``push_pull MODE xK``: ``Client.push_pull`` through K ``dcasgd server`` processes (tcp to
  127.0.0.1, ``--threads 1`` each: ``--shard-threads``), the client with ``tune_malloc=True``.
  On one host a worker hands its payloads over in shared memory by default (``dcasgd/shm.py``:
  the gradient and the weights in a sealed memfd the shard maps; only headers cross the socket),
  so this row is what a training script gets on one host. ``(default client)``: ``dcasgd-a`` on
  one shard with a client left at glibc's defaults; ``ipc``: the same over ``ipc://``, as
  ``dcasgd launch`` connects workers to shards on their own host; ``frames``: every payload in
  ZeroMQ frames (``shared_memory=False``), as between hosts, over tcp and over ipc.

Beside them, in the same rotation: a memcpy (torch ``copy_``, at the servers' thread
count) that moves as many bytes as each mode's update must (``benchmarks/kernels.py``
``moved_bytes``: the push_pull update writes its reply's snapshot in the same pass), the
physical limit of the rule; and the shards' own counters (``stats``: ``phase_seconds``),
read before and after the timed rounds, give where each round trip's time goes on the
shard (receive, check, rule, snapshot, send), per update.

Prints median ms, range and the ratio to the bare echo; the per-phase table; the rule
against its memcpy bound; and the targets of issue 11 (10M floats, ``dcasgd-a``, one
shard: ``push_pull`` <= 1.0x the RPC server and <= 1.0x the bare echo; the rule within
1.5x of its bound) as PASS or MISS. Writes the raw timings as JSON.

    python benchmarks/throughput.py                 # 1M and 10M floats, all modes, 1 and 2 shards
    python benchmarks/throughput.py --quick         # 1M floats, async and dcasgd-a, 1 shard, 10 round trips
    python benchmarks/throughput.py --sizes 10000000 --modes dcasgd-a --shards 1 --repeats 40
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import zmq

from dcasgd import MODES, Client
from dcasgd.memory import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import moved_bytes  # noqa: E402  (benchmarks/kernels.py: the update's bytes per element)

PHASES = ("receive", "check", "rule", "snapshot", "send")
_SPAWN = mp.get_context("spawn")


# --- servers ----------------------------------------------------------------------------


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


_W: torch.Tensor | None = None  # the RPC server's weights


def rpc_push_pull(g: torch.Tensor, lr: float) -> torch.Tensor:
    """Plain SGD on the RPC server's weights, as a PyTorch user would write it."""
    _W.add_(g, alpha=-lr)
    return _W


def _rpc_options(tcp_only: bool) -> Any:
    """TensorPipe's own choice of transport (shared memory, cross-process copies on one host), or tcp alone."""
    import torch.distributed.rpc as rpc

    if not tcp_only:
        return None
    return rpc.TensorPipeRpcBackendOptions(_transports=["uv"], _channels=["basic"])


def _rpc_server(port: int, numel: int, tcp_only: bool) -> None:
    global _W
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _W = torch.randn(numel)
    rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=_rpc_options(tcp_only))
    rpc.shutdown()  # waits for the client's shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_shards(
    num_shards: int, mode: str, threads: int, ipc_dir: str | None = None, name: str = "shard"
) -> tuple[list[subprocess.Popen], list[str]]:
    """``num_shards`` ``dcasgd server`` processes on tcp (127.0.0.1), or on ipc sockets ``ipc_dir/name-s``."""
    procs, endpoints = [], []
    for s in range(num_shards):
        bind = "tcp://127.0.0.1:0" if ipc_dir is None else f"ipc://{ipc_dir}/{name}-{s}"
        cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", bind, "--shard", str(s),
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


# --- clients: one process per row, driven over a pipe -------------------------------------


def _client(conn: Connection, kind: str, numel: int, arg: Any, tuned: bool) -> None:
    """Set up one row's client, say "ready", then answer "go" (one timed round trip), "stats", "stop"."""
    if tuned:
        keep_freed_memory()
    g = torch.randn(numel) * 1e-3
    stats = lambda: None  # noqa: E731
    if kind == "echo":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{arg}")
        payload, back = g.numpy(), torch.empty(numel).numpy()

        def round_trip() -> None:
            tracker = sock.send(payload, copy=False, track=True)
            assert sock.recv_into(back) == payload.nbytes
            tracker.wait()

        def close() -> None:
            sock.send(b"stop")
            sock.close(linger=1000)
            ctx.term()

    elif kind == "rpc":
        import torch.distributed.rpc as rpc

        port, tcp_only = arg
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        rpc.init_rpc("client", rank=1, world_size=2, rpc_backend_options=_rpc_options(tcp_only))

        def round_trip() -> None:
            w = rpc.rpc_sync("ps", rpc_push_pull, args=(g, 0.01))
            assert w.numel() == numel

        close = rpc.shutdown
    else:  # push_pull through dcasgd servers at the endpoints in arg[0]; arg[1]: shared memory or frames
        endpoints, shared_memory = arg
        client = Client(endpoints, worker_id=0, timeout=60.0, tune_malloc=tuned, shared_memory=shared_memory)
        client.init(torch.randn(numel))
        w = client.pull()
        if client.shared_memory != [shared_memory] * len(endpoints):
            raise RuntimeError(f"shared memory asked {shared_memory}, in use {client.shared_memory}")

        def round_trip() -> None:
            client.push_pull(g, lr=0.01, out=w)

        stats, close = client.stats, client.close
    conn.send("ready")
    while True:
        what = conn.recv()
        if what == "go":
            t0 = time.perf_counter()
            round_trip()
            conn.send(time.perf_counter() - t0)
        elif what == "stats":
            conn.send(stats())
        else:
            close()
            conn.send("closed")
            return


@dataclass
class Row:
    """One line of the table: a client process (or a memcpy in this process) and its timings."""

    what: str
    kind: str  # echo, rpc, push_pull, memcpy
    mode: str | None = None
    shards: int = 1
    seconds: list[float] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)  # push_pull: each shard's stats after warm-up, at the end
    conn: Connection | None = None
    proc: Any = None
    nbytes: int = 0  # memcpy: bytes moved (half read, half written)

    def start(self, numel: int, arg: Any, tuned: bool) -> None:
        self.conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(target=_client, args=(child, self.kind, numel, arg, tuned), daemon=True)
        self.proc.start()

    def ready(self) -> None:
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError(f"{self.what}: the client did not start")

    def round_trip(self, copy: tuple[torch.Tensor, torch.Tensor] | None) -> float:
        if self.kind == "memcpy":
            src, dst = copy
            half = self.nbytes // 2
            t0 = time.perf_counter()
            dst[:half].copy_(src[:half])
            return time.perf_counter() - t0
        self.conn.send("go")
        return self.conn.recv()

    def ask(self, what: str) -> Any:
        self.conn.send(what)
        if not self.conn.poll(120):
            raise RuntimeError(f"{self.what}: no answer to {what}")
        return self.conn.recv()


def plan(numel: int, a: argparse.Namespace) -> list[Row]:
    rows = [Row("bare zmq echo", "echo"), Row("bare zmq echo (tuned)", "echo")]
    if a.rpc:
        rows += [Row("torch rpc sgd", "rpc"), Row("torch rpc sgd tcp", "rpc")]
    for shards in a.shards:
        rows += [Row(f"push_pull {mode} x{shards}", "push_pull", mode, shards) for mode in a.modes]
    if "dcasgd-a" in a.modes and 1 in a.shards:
        rows.append(Row("push_pull dcasgd-a x1 (default client)", "push_pull", "dcasgd-a", 1))
        rows.append(Row("push_pull dcasgd-a x1 ipc", "push_pull", "dcasgd-a", 1))
        rows.append(Row("push_pull dcasgd-a x1 frames", "push_pull", "dcasgd-a", 1))
        rows.append(Row("push_pull dcasgd-a x1 ipc frames", "push_pull", "dcasgd-a", 1))
    for mode in a.modes:  # the push_pull update: rule + its reply's snapshot, in one pass
        nbytes = moved_bytes(mode, 0.0, True, 4) * numel
        rows.append(Row(f"memcpy {mode} bytes", "memcpy", mode, nbytes=nbytes))
    return rows


def measure(numel: int, a: argparse.Namespace) -> list[Row]:
    rows = plan(numel, a)
    ipc_dir = tempfile.mkdtemp(prefix="dcasgd-throughput-")
    servers: list[Any] = []
    shard_procs: list[subprocess.Popen] = []
    biggest = max((r.nbytes for r in rows), default=0) // 2
    copy = (torch.ones(biggest, dtype=torch.uint8), torch.zeros(biggest, dtype=torch.uint8))
    try:
        for r in rows:
            if r.kind == "echo":
                q: mp.Queue = _SPAWN.Queue()
                tuned = r.what.endswith("(tuned)")
                servers.append(_SPAWN.Process(target=_echo_server, args=(q, tuned), daemon=True))
                servers[-1].start()
                r.start(numel, q.get(timeout=120), tuned)
            elif r.kind == "rpc":
                port, tcp_only = _free_port(), r.what.endswith(" tcp")
                servers.append(_SPAWN.Process(target=_rpc_server, args=(port, numel, tcp_only), daemon=True))
                servers[-1].start()
                r.start(numel, (port, tcp_only), False)
            elif r.kind == "push_pull":
                ipc = ipc_dir if " ipc" in r.what else None
                procs, endpoints = start_shards(r.shards, r.mode, a.shard_threads, ipc, f"row{rows.index(r)}")
                shard_procs += procs
                frames = r.what.endswith(" frames")
                r.start(numel, (endpoints, not frames), not r.what.endswith("(default client)"))
        for r in rows:
            if r.kind != "memcpy":
                r.ready()
        for i in range(a.warmup + a.repeats):
            if i == a.warmup:
                for r in rows:
                    if r.kind == "push_pull":
                        r.stats.append(r.ask("stats"))
            k = i % len(rows)
            for r in rows[k:] + rows[:k]:  # rotate, so that no row always follows the same one
                t = r.round_trip(copy)
                if i >= a.warmup:
                    r.seconds.append(t)
        for r in rows:
            if r.kind == "push_pull":
                r.stats.append(r.ask("stats"))
    finally:
        for r in rows:
            if r.conn is not None:
                try:
                    r.ask("stop")
                except (OSError, EOFError, RuntimeError):
                    pass
                r.proc.join(30)
                if r.proc.is_alive():
                    r.proc.kill()
        for p in servers:
            p.join(10)
            if p.is_alive():
                p.kill()
        for p in shard_procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return rows


def phases(row: Row) -> dict[str, float] | None:
    """Seconds per update of each shard phase over the timed rounds, averaged over the row's shards."""
    if len(row.stats) != 2:
        return None
    before, after = row.stats
    out = dict.fromkeys(PHASES, 0.0)
    for b, e in zip(before, after, strict=True):
        updates = e["version"] - b["version"]
        for p in PHASES:
            out[p] += (e["phase_seconds"].get(p, 0.0) - b["phase_seconds"].get(p, 0.0)) / max(1, updates)
    return {p: s / len(before) for p, s in out.items()}


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
    ap.add_argument(
        "--shard-threads",
        type=int,
        default=1,
        help="--threads of each dcasgd server, and of the memcpy bound (default 1, as dcasgd launch)",
    )
    ap.add_argument("--no-rpc", dest="rpc", action="store_false", help="leave out the torch.distributed.rpc row")
    ap.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    a = ap.parse_args(argv)
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else value)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    return a


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(numel: int, rows: list[Row], threads: int, results: dict[str, Any]) -> None:
    med = {r.what: statistics.median(r.seconds) for r in rows}
    base = med["bare zmq echo"]
    print(f"\n{numel:,} floats ({numel * 4 / 1e6:.0f} MB): median and range of {len(rows[0].seconds)} round trips")
    print(f"  {'what':<40} {'median ms':>9} {'range ms':>17} {'/ echo':>7}")
    for r in rows:
        if r.kind == "memcpy":
            continue
        rng = f"{min(r.seconds) * 1e3:.2f}-{max(r.seconds) * 1e3:.2f}"
        print(f"  {r.what:<40} {med[r.what] * 1e3:>9.2f} {rng:>17} {med[r.what] / base:>7.2f}")
    print(f"  where a push_pull's time goes on the shard, ms per update ({', '.join(PHASES)}; rest: client + wire)")
    print(f"  {'what':<40} " + " ".join(f"{p:>8}" for p in PHASES) + f" {'rest':>8}")
    per_phase = {}
    for r in rows:
        ph = phases(r)
        if ph is None:
            continue
        per_phase[r.what] = ph
        rest = med[r.what] - sum(ph.values())
        print(f"  {r.what:<40} " + " ".join(f"{ph[p] * 1e3:>8.2f}" for p in PHASES) + f" {rest * 1e3:>8.2f}")
    print(f"  the rule against its memcpy bound (memcpy at {threads} thread(s), as the servers)")
    print(f"  {'mode':<10} {'MB moved':>9} {'GB/s':>6} {'bound ms':>9} {'rule ms':>8} {'rule/bound':>10}")
    bounds = {}
    for r in rows:
        if r.kind != "memcpy":
            continue
        bound = med[r.what]
        ph = per_phase.get(f"push_pull {r.mode} x1")
        rule = None if ph is None else ph["rule"]
        ratio = None if rule is None else rule / bound
        bounds[r.mode] = {"bytes": r.nbytes, "bound_s": bound, "gb_per_s": r.nbytes / bound / 1e9, "rule_s": rule,
                          "rule_over_bound": ratio}  # fmt: skip
        shown = "-" if rule is None else f"{rule * 1e3:8.2f} {ratio:>10.2f}"
        print(f"  {r.mode:<10} {r.nbytes / 1e6:>9.0f} {r.nbytes / bound / 1e9:>6.1f} {bound * 1e3:>9.2f} {shown}")
    for r in rows:
        if r.kind == "memcpy":
            continue
        entry = {"numel": numel, "what": r.what, "seconds": r.seconds, "ratio_to_echo": med[r.what] / base}
        if r.what in per_phase:
            entry["phase_seconds_per_update"] = per_phase[r.what]
            entry["stats"] = r.stats
        results["runs"].append(entry)
    results["bounds"].append({"numel": numel, "threads": threads, "modes": bounds})
    target = "push_pull dcasgd-a x1"
    if target in med:
        checks = {"vs_echo": med[target] / base}
        line = f"  targets: {target} = {checks['vs_echo']:.2f}x the bare echo ({_verdict(checks['vs_echo'] <= 1.0)})"
        if "torch rpc sgd" in med:
            checks["vs_rpc"] = med[target] / med["torch rpc sgd"]
            line += f", {checks['vs_rpc']:.3f}x the rpc server ({_verdict(checks['vs_rpc'] <= 1.0)})"
        if bounds.get("dcasgd-a", {}).get("rule_over_bound") is not None:
            checks["rule_over_bound"] = bounds["dcasgd-a"]["rule_over_bound"]
            line += f", rule {checks['rule_over_bound']:.2f}x its bound ({_verdict(checks['rule_over_bound'] <= 1.5)})"
        print(line)
        # Like for like: each side's transport between hosts (tcp), and each side's fastest on one host
        # (both shared memory: TensorPipe's own pick; dcasgd launch connects workers to shards over ipc://).
        # And what shared memory buys dcasgd: the same ipc endpoint with every payload in frames.
        alike = [
            ("tcp_vs_rpc", "like for like", target + " frames", "torch rpc sgd tcp"),
            ("shm_vs_rpc", "like for like", target + " ipc", "torch rpc sgd"),
            ("shm_vs_frames", "shared memory", target + " ipc", target + " ipc frames"),
        ]
        for key, label, ours, theirs in alike:
            if ours in med and theirs in med:
                checks[key] = med[ours] / med[theirs]
                print(f"  {label}: {ours} = {checks[key]:.3f}x {theirs} ({_verdict(checks[key] <= 1.0)})")
        results["targets"].append({"numel": numel, **checks})


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.rpc:
        import torch.distributed.rpc as rpc

        if not rpc.is_available():
            print("torch.distributed.rpc is not available in this torch build: no rpc row", file=sys.stderr)
            a.rpc = False
    threads = a.shard_threads
    torch.set_num_threads(threads)  # the memcpy bound at the servers' thread count
    results: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
        },  # fmt: skip
        "runs": [],
        "bounds": [],
        "targets": [],
    }
    for numel in a.sizes:
        report(numel, measure(numel, a), threads, results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"raw timings: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
