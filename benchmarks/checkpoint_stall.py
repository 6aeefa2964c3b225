"""How long a shard's serve loop stops answering while it writes a checkpoint: in the loop, or in the background.

One ``dcasgd-a`` shard of ``--floats`` parameters runs in its own process (a ``ShardServer``, as
``dcasgd server`` runs it) with ``--workers`` workers. Before each checkpoint every worker does one
``push_pull`` in turn, so that each holds a backup of its own version: the state is then as large as it
gets, w, ms and one snapshot per worker, ``(workers + 2) x`` the slice. Then the periodic checkpoint is
let go (its period set to a millisecond through a pipe) while a client sends ``stats`` requests one after
another; the **stall** is the longest gap between two consecutive ``stats`` replies from the last reply
before the checkpoint was let go until the reply that shows it written. ``stats`` answers in a fraction of
a millisecond, so the gap is the time the loop could not answer. **none** is the same longest gap over an
equal time (at most 5 s) right after, with no checkpoint: what the machine's scheduling adds anyway. The
shard's own figures come with it: ``pause`` (the seconds the loop spent on the checkpoint: the whole
write in the loop, the copy in the background) and the write's duration. With the background writer,
one ``push_pull`` is timed while the file is being written and compared with one on an idle shard (the
writer thread competes for cores and memory bandwidth). The first checkpoint of each variant is a
warm-up (the background writer makes its buffers then) and is not counted.

    python benchmarks/checkpoint_stall.py                          # 25M floats (100 MB), 8 workers, 5 repeats
    python benchmarks/checkpoint_stall.py --quick                  # 1M floats, 2 workers, 2 repeats
    python benchmarks/checkpoint_stall.py --floats 5000000 --workers 4 --out stall.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dcasgd import Client
from dcasgd.memory import keep_freed_memory
from dcasgd.rules import RuleConfig
from dcasgd.server import ShardServer
from dcasgd.shard import ShardConfig

OFF = 1e9  # a checkpoint period that never comes


def _serve(conn, floats: int, workers: int, directory: str, background: bool) -> None:
    """The shard process: serves until told "stop"; any other message is the checkpoint period."""
    keep_freed_memory()
    cfg = ShardConfig(num_workers=workers, rules=RuleConfig(mode="dcasgd-a", lr=0.01))
    server = ShardServer("tcp://127.0.0.1:0", cfg, checkpoint_dir=directory, checkpoint_every=OFF)
    server.checkpoint_in_background = background

    def control() -> None:
        while (msg := conn.recv()) != "stop":
            server.checkpoint_every = msg
        server.checkpoint_dir = None  # no last checkpoint: nothing more to measure
        server.stop()

    threading.Thread(target=control, daemon=True).start()
    conn.send(server.endpoint)
    server.serve()
    server.close()


def measure(floats: int, workers: int, repeats: int, background: bool, last_op: str = "push_pull") -> dict:
    """One shard, ``repeats + 1`` checkpoints (the first a warm-up); their stalls, pauses, sizes, write times."""
    mpc = mp.get_context("spawn")
    here, there = mpc.Pipe()
    with tempfile.TemporaryDirectory(prefix="dcasgd-stall-") as directory:
        proc = mpc.Process(target=_serve, args=(there, floats, workers, directory, background), daemon=True)
        proc.start()
        try:
            if not here.poll(60):
                raise RuntimeError(f"the shard process did not start (exit code {proc.exitcode})")
            endpoint = here.recv()
            clients = [Client([endpoint], worker_id=w, timeout=120.0) for w in range(workers)]
            try:
                return _run(here, clients, floats, repeats, last_op)
            finally:
                for c in clients:
                    c.close()
        finally:
            here.send("stop")
            proc.join(60)
            if proc.is_alive():
                proc.kill()


def _run(control, clients: list[Client], floats: int, repeats: int, last_op: str) -> dict:
    c0 = clients[0]
    c0.init(torch.randn(floats, generator=torch.Generator().manual_seed(0)))
    for c in clients:
        c.pull()
    g = torch.randn(floats, generator=torch.Generator().manual_seed(1)) * 1e-4
    runs = []
    for i in range(repeats + 1):
        for c in clients:  # every backup a version of its own
            c.push_pull(g)
        t0 = time.perf_counter()
        c0.push_pull(g)
        idle_push = time.perf_counter() - t0
        if last_op == "push":  # no weights sent at the new version: the copy includes w
            c0.push(g)
        before = c0.stats()[0]
        written = before["server"].get("checkpoints", 0)
        last = time.perf_counter()
        control.send(0.001)  # let the checkpoint go
        gaps, during_push = [], None
        while True:
            s = c0.stats()[0]
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if s["checkpoint"]["writing"] is not None and during_push is None:
                control.send(OFF)  # this push moves the version: no second checkpoint after this one
                t0 = time.perf_counter()
                c0.push_pull(g)  # while the file is written in the background
                during_push = time.perf_counter() - t0
                last = time.perf_counter()  # that wait was the push's, not a stall
            if s["server"].get("checkpoints", 0) > written:
                break
            if s["server"].get("checkpoint_failures", 0) > before["server"].get("checkpoint_failures", 0):
                raise RuntimeError("a checkpoint failed: see the shard's log")
        control.send(OFF)
        while s["checkpoint"]["writing"] is not None:
            s = c0.stats()[0]
        info = s["checkpoint"]
        quiet = _longest_gap(c0, min(info["seconds"], 5.0))  # the same, with no checkpoint
        runs.append(
            {
                "warmup": i == 0,
                "stall_s": max(gaps),
                "no_checkpoint_gap_s": quiet,
                "replies": len(gaps),
                "pause_s": info["pause_s"],
                "write_s": info["seconds"],
                "nbytes": info["nbytes"],
                "push_pull_idle_s": idle_push,
                "push_pull_during_write_s": during_push,
            }
        )
    return {"runs": runs}


def _longest_gap(client: Client, seconds: float) -> float:
    """The longest gap between consecutive ``stats`` replies over ``seconds`` (what the machine adds)."""
    last = start = time.perf_counter()
    longest = 0.0
    while last - start < seconds:
        client.stats()
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--floats", type=int, default=None, help="parameters of the shard (default 25,000,000: 100 MB)")
    p.add_argument("--workers", type=int, default=None, help="workers, each with a backup of its own (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="checkpoints measured per variant (default 5)")
    p.add_argument(
        "--last-op",
        choices=("push_pull", "push"),
        default="push_pull",
        help="the last request before each checkpoint: push_pull (default; its reply is a snapshot of the "
        "current weights, which the background writer takes instead of copying w) or push (w is copied too)",
    )
    p.add_argument("--quick", action="store_true", help="1M floats, 2 workers, 2 repeats (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    quick = {"floats": 1_000_000, "workers": 2, "repeats": 2}
    full = {"floats": 25_000_000, "workers": 8, "repeats": 5}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def _range(values: list[float], scale: float, fmt: str) -> str:
    lo, hi = min(values) * scale, max(values) * scale
    return f"{lo:{fmt}}-{hi:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    print(
        f"dcasgd-a shard of {a.floats:,} floats ({a.floats * 4 / 1e6:.0f} MB), {a.workers} workers, "
        f"{a.repeats} checkpoints each (after one warm-up), last request {a.last_op}; {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    report = {"argv": sys.argv, "args": {k: v for k, v in vars(a).items() if k != "out"}, "machine": platform.node()}
    rows = []
    for name, background in (("in the loop", False), ("background", True)):
        runs = [r for r in measure(a.floats, a.workers, a.repeats, background, a.last_op)["runs"] if not r["warmup"]]
        report[name] = runs
        during = [r["push_pull_during_write_s"] for r in runs if r["push_pull_during_write_s"] is not None]
        rows.append(
            (
                name,
                _range([r["stall_s"] for r in runs], 1e3, ".0f"),
                _range([r["no_checkpoint_gap_s"] for r in runs], 1e3, ".0f"),
                _range([r["pause_s"] for r in runs], 1e3, ".0f"),
                _range([r["write_s"] for r in runs], 1, ".2f"),
                f"{max(r['nbytes'] for r in runs) / 1e6:.0f}",
                _range([r["push_pull_idle_s"] for r in runs], 1e3, ".0f"),
                _range(during, 1e3, ".0f") if during else "-",
            )
        )
    head = ("checkpoint", "stall ms", "none ms", "pause ms", "write s", "file MB", "push_pull ms idle", "during write")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
