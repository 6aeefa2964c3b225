"""What a step costs the accelerator: the blocking round trip against ``overlap=True``, float32 against bfloat16 wire.

A worker here is a process holding ResNet-50's parameters (torchvision's shapes, written out
below: 25,557,032 floats; no torchvision needed) and a ``dcasgd.DistributedOptimizer`` on
``dcasgd server`` processes. Each step sets nothing (a fixed small random ``.grad`` per
parameter is attached once: no autograd), sleeps C ms to emulate the accelerator's forward and
backward (GPU time costs the host no CPU) and calls ``opt.step()``. For each configuration
(1 and 2 shards, 1 and 2 workers, float32 and bfloat16 wire; --configs picks some of them), on
fresh shards, three phases run one after the other. Payloads travel in ZeroMQ frames, as between
hosts (the shards run with ``--no-shared-memory``; ``--shared-memory``: as workers on a shard's own
host get them by default, see docs/protocol.md):

    R            blocking, C = 0: the time spent inside ``opt.step()``, median over the timed
                 steps (of every worker): the blocking step's round trip. Bytes per step per
                 worker come from the shards' own counters (``server.bytes_in`` + ``bytes_out``)
                 over these steps.
    blocking     overlap=False, C = --ratio x R (R of this very configuration and repeat)
    overlap      overlap=True, the same C (blocking and overlap swap order every other repeat)

    period       wall time of the timed steps / steps, per worker (sleep + step)
    busy         C / period: the fraction of time the accelerator would compute

Every configuration runs --repeats times, interleaved (repeat 1 of all, then repeat 2, ...),
and the table gives the median with the min-max range over repeats. With 2 workers each
worker has its own row. The targets (issue 10) are checked and printed PASS or MISS:

    with C = 1.5 x R, overlapped busy >= 0.87 (blocking is about C / (C + R) = 0.6)
    bfloat16 halves the bytes per step and cuts R by >= 35% (against float32, same shards/workers)

Writes under --out: step_overhead.json (arguments, machine, every phase's raw step times,
the summary, the checks) and step_overhead.png (busy per configuration, blocking vs overlap;
R float32 vs bfloat16).

    python benchmarks/step_overhead.py            # ResNet-50, 8 configurations x 3 repeats, 15 steps per phase
    python benchmarks/step_overhead.py --quick    # 1M floats, 1 repeat, 8 steps (a smoke run)
    python benchmarks/step_overhead.py --repeats 1 --steps 10 --warmup 1   # what fitted here (~10 min, loaded)
    python benchmarks/step_overhead.py --quick --configs 1x1 2x2          # only these shards x workers (both wires)

How long a run takes depends on R, which on a shared 2-core machine depends on the load:
ResNet-50's R was 0.5-1.4 s here at load averages 5-10 (every phase then takes seconds per step).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dcasgd import DistributedOptimizer
from dcasgd.client import fetch_stats

RESNET50_NUMEL = 25_557_032
DEFAULTS = {"model": "resnet50", "repeats": 3, "steps": 15, "warmup": 2}
# A smoke run: every configuration once, on a model of about a million floats.
QUICK = {"model": "tiny", "repeats": 1, "steps": 8, "warmup": 2}
WIRES = ("float32", "bfloat16")
SHARDS_X_WORKERS = ["1x1", "1x2", "2x1", "2x2"]  # --configs' default: every one, as run since issue 10
TARGET_BUSY = 0.87  # overlapped busy at C = 1.5 R
TARGET_R_CUT = 0.35  # bfloat16 cuts R by at least this much
START_TIMEOUT = 60.0  # seconds for a shard to report its endpoint
PHASE_TIMEOUT = 600.0  # seconds for a worker to answer within one phase


# --- the model: shapes only ------------------------------------------------------------------


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """torchvision's ``resnet50()`` parameters, in its order: names and shapes (25,557,032 floats)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)),
                                                  ("bn1.bias", (64,))]  # fmt: skip
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            width, out = planes, planes * 4  # Bottleneck, expansion 4
            for name, shape in [("conv1", (width, inplanes, 1, 1)), ("conv2", (width, width, 3, 3)),
                                ("conv3", (out, width, 1, 1))]:  # fmt: skip
                shapes.append((pre + name + ".weight", shape))
                shapes += [(pre + name.replace("conv", "bn") + ".weight", (shape[0],)),
                           (pre + name.replace("conv", "bn") + ".bias", (shape[0],))]  # fmt: skip
            if b == 0:  # stride 2, or (layer1) 64 -> 256 channels
                shapes += [(pre + "downsample.0.weight", (out, inplanes, 1, 1)),
                           (pre + "downsample.1.weight", (out,)), (pre + "downsample.1.bias", (out,))]  # fmt: skip
            inplanes = out
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def tiny_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """About a million floats (999,144) in a few parameters: for --quick."""
    return [("conv1.weight", (256, 3, 7, 7)), ("bn1.weight", (256,)), ("bn1.bias", (256,)),
            ("fc.weight", (1000, 960)), ("fc.bias", (1000,))]  # fmt: skip


MODELS = {"resnet50": resnet50_shapes, "tiny": tiny_shapes}


def make_params(model: str, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of ``model``, initialized at random (no module, no autograd graph)."""
    gen = torch.Generator().manual_seed(seed)
    named = [(name, nn.Parameter(torch.randn(shape, generator=gen) * 0.05)) for name, shape in MODELS[model]()]
    if model == "resnet50":
        total = sum(p.numel() for _, p in named)
        assert total == RESNET50_NUMEL, f"ResNet-50 has {RESNET50_NUMEL} parameters, these shapes {total}"
    return named


# --- workers: one process each, driven over a pipe ---------------------------------------------


def _worker_main(conn, worker_id: int, model: str, threads: int) -> None:
    """A worker process: holds the parameters and a fixed gradient; runs the phases it is sent."""
    torch.set_num_threads(threads)
    named = make_params(model)
    gen = torch.Generator().manual_seed(1000 + worker_id)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-4  # attached once: every step pushes it again
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            conn.send(("done", _run_phase(conn, named, worker_id, **cmd)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _run_phase(conn, named, worker_id: int, *, servers: list[str], num_workers: int, overlap: bool,
               compute_ms: float, steps: int, warmup: int, lr: float) -> dict:  # fmt: skip
    """Warm up, say "ready", wait for "go", time ``steps`` steps; the optimizer is closed before returning."""
    opt = DistributedOptimizer(named, lr=lr, servers=servers, worker_id=worker_id, num_workers=num_workers,
                               overlap=overlap, timeout=120.0)  # fmt: skip
    try:
        compute = compute_ms / 1000.0
        for _ in range(warmup):
            if compute:
                time.sleep(compute)
            opt.step()
        conn.send(("ready", None))
        if conn.recv() != "go":
            raise RuntimeError("expected go")
        inside = []
        t0 = time.perf_counter()
        for _ in range(steps):
            if compute:
                time.sleep(compute)  # the accelerator's forward and backward
            t = time.perf_counter()
            opt.step()
            inside.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
    finally:
        opt.close()  # with overlap: delivers the last push, after the timing
    return {"worker": worker_id, "wall": wall, "period": wall / steps, "step_seconds": inside}


class Workers:
    """Long-lived worker processes (spawned once); ``phase`` runs one phase on the first M of them."""

    def __init__(self, count: int, model: str, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for w in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, w, model, threads), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _recv(self, w: int, want: str):
        if not self.conns[w].poll(PHASE_TIMEOUT):
            raise TimeoutError(f"worker {w} did not answer within {PHASE_TIMEOUT:.0f} s")
        kind, value = self.conns[w].recv()
        if kind == "error":
            raise RuntimeError(f"worker {w} failed:\n{value}")
        if kind != want:
            raise RuntimeError(f"worker {w} said {kind!r}, expected {want!r}")
        return value

    def phase(self, num_workers: int, endpoints: list[str], **cmd) -> tuple[list[dict], list[dict], list[dict]]:
        """Run a phase on workers 0..M-1; returns (their results, shard stats at go, shard stats at the end)."""
        ws = range(num_workers)
        for w in ws:
            self.conns[w].send({"servers": endpoints, "num_workers": num_workers, **cmd})
        for w in ws:
            self._recv(w, "ready")
        before = [fetch_stats(ep, timeout=30.0) for ep in endpoints]  # every worker waits: nothing in flight
        for w in ws:
            self.conns[w].send("go")
        results = [self._recv(w, "done") for w in ws]
        after = [fetch_stats(ep, timeout=30.0) for ep in endpoints]
        return results, before, after

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


# --- shards ------------------------------------------------------------------------------------


@contextmanager
def shards(
    num_shards: int, num_workers: int, mode: str, wire: str, threads: int, logdir: Path, shared_memory: bool = False
) -> Iterator[list[str]]:
    """``num_shards`` fresh ``dcasgd server`` processes; yields their endpoints, stops them on exit.

    ``shared_memory``: let workers hand payloads over in shared memory; off, every payload crosses
    the socket in frames, as between hosts.
    """
    procs, endpoints = [], []
    try:
        for s in range(num_shards):
            cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", "tcp://127.0.0.1:0", "--shard", str(s),
                   "--num-shards", str(num_shards), "--num-workers", str(num_workers), "--mode", mode,
                   "--wire-dtype", wire, "--threads", str(threads), "--log-level", "WARNING",
                   *(() if shared_memory else ("--no-shared-memory",))]  # fmt: skip
            with open(logdir / f"shard{s}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True))
        for s, p in enumerate(procs):  # they start in parallel; read each one's line in turn
            endpoints.append(_endpoint(p, logdir / f"shard{s}.log"))
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            p.stdout.close()


def _endpoint(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                return line.rsplit("listening on ", 1)[1].strip()
    raise RuntimeError(f"shard did not start (exit code {proc.poll()}):\n{log.read_text()}")


def _bytes(stats: list[dict]) -> int:
    return sum(s["server"]["bytes_in"] + s["server"]["bytes_out"] for s in stats)


# --- one configuration, the summary, the checks ------------------------------------------------


def run_config(workers: Workers, shards_: int, m: int, wire: str, repeat: int, a: argparse.Namespace,
               logdir: Path) -> dict:  # fmt: skip
    """The three phases on fresh shards; the raw result of one configuration and repeat."""
    common = {"steps": a.steps, "warmup": a.warmup, "lr": a.lr}
    threads = a.shard_threads
    load = os.getloadavg()[0]
    with shards(shards_, m, a.mode, wire, threads, logdir, a.shared_memory) as endpoints:
        cal, before, after = workers.phase(m, endpoints, overlap=False, compute_ms=0.0, **common)
        r = statistics.median(t for res in cal for t in res["step_seconds"])
        bytes_per_step = (_bytes(after) - _bytes(before)) / (a.steps * m)
        compute_ms = a.ratio * r * 1e3
        runs = {}
        for overlap in (False, True) if repeat % 2 == 0 else (True, False):
            res, _, _ = workers.phase(m, endpoints, overlap=overlap, compute_ms=compute_ms, **common)
            runs["overlap" if overlap else "blocking"] = res
    return {"shards": shards_, "workers": m, "wire": wire, "repeat": repeat, "shard_threads": threads,
            "load_average_before": load, "R": r, "compute_ms": compute_ms, "bytes_per_step": bytes_per_step,
            "calibration": cal, "blocking": runs["blocking"], "overlap": runs["overlap"]}  # fmt: skip


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per configuration and worker, in the order the configurations ran: medians and ranges over repeats."""
    rows = []
    for shards_, m, wire in dict.fromkeys((r["shards"], r["workers"], r["wire"]) for r in runs):
        mine = [r for r in runs if (r["shards"], r["workers"], r["wire"]) == (shards_, m, wire)]
        for w in range(m):
            pb = [r["blocking"][w]["period"] for r in mine]
            po = [r["overlap"][w]["period"] for r in mine]
            rows.append({"config": f"{shards_} shard{'s' if shards_ > 1 else ''}, {m} worker{'s' if m > 1 else ''}, "
                                   f"{wire}" + (f", w{w}" if m > 1 else ""),  # fmt: skip
                         "shards": shards_, "workers": m, "wire": wire, "worker": w,
                         "R_ms": _spread([r["R"] * 1e3 for r in mine]),
                         "R_worker_ms": _spread([statistics.median(r["calibration"][w]["step_seconds"]) * 1e3
                                                 for r in mine]),
                         "compute_ms": _spread([r["compute_ms"] for r in mine]),
                         "period_blocking_ms": _spread([p * 1e3 for p in pb]),
                         "period_overlap_ms": _spread([p * 1e3 for p in po]),
                         "busy_blocking": _spread([r["compute_ms"] / 1e3 / p for r, p in zip(mine, pb, strict=True)]),
                         "busy_overlap": _spread([r["compute_ms"] / 1e3 / p for r, p in zip(mine, po, strict=True)]),
                         "bytes_per_step": _spread([r["bytes_per_step"] for r in mine])})  # fmt: skip
    return rows


def checks(rows: list[dict], ratio: float) -> dict:
    """The issue's targets, on medians over repeats."""
    busy = [{"config": r["config"], "busy_overlap": r["busy_overlap"]["median"],
             "busy_blocking": r["busy_blocking"]["median"], "pass": r["busy_overlap"]["median"] >= TARGET_BUSY}
            for r in rows]  # fmt: skip
    wire = []
    for shards_, m in sorted({(r["shards"], r["workers"]) for r in rows}):
        first = {r["wire"]: r for r in rows if (r["shards"], r["workers"], r["worker"]) == (shards_, m, 0)}
        if not {"float32", "bfloat16"} <= first.keys():
            continue
        f32, b16 = first["float32"], first["bfloat16"]
        bytes_ratio = b16["bytes_per_step"]["median"] / f32["bytes_per_step"]["median"]
        cut = 1.0 - b16["R_ms"]["median"] / f32["R_ms"]["median"]
        wire.append({"shards": shards_, "workers": m, "bytes_ratio": bytes_ratio,
                     "bytes_pass": 0.49 <= bytes_ratio <= 0.51, "R_float32_ms": f32["R_ms"]["median"],
                     "R_bfloat16_ms": b16["R_ms"]["median"], "R_cut": cut,
                     "R_cut_pass": cut >= TARGET_R_CUT})  # fmt: skip
    return {"ratio": ratio, "target_busy_overlap": TARGET_BUSY, "target_R_cut": TARGET_R_CUT, "busy": busy,
            "wire": wire}  # fmt: skip


def _fmt(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    med, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    if len(s["values"]) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':<34} {'R ms':>20} {'C ms':>20} {'period blk ms':>21} {'period ovl ms':>21} "
            f"{'busy blk':>17} {'busy ovl':>17} {'MB/step':>8}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(f"{r['config']:<34} {_fmt(r['R_worker_ms']):>20} {_fmt(r['compute_ms']):>20} "
                     f"{_fmt(r['period_blocking_ms']):>21} {_fmt(r['period_overlap_ms']):>21} "
                     f"{_fmt(r['busy_blocking'], digits=2):>17} {_fmt(r['busy_overlap'], digits=2):>17} "
                     f"{r['bytes_per_step']['median'] / 1e6:>8.1f}")  # fmt: skip
    return "\n".join(lines)


def format_checks(c: dict) -> str:
    lines = [f"target: with C = {c['ratio']:g} x R, overlapped busy >= {c['target_busy_overlap']}"]
    for b in c["busy"]:
        lines.append(f"  {'PASS' if b['pass'] else 'MISS'}  {b['config']:<34} busy {b['busy_overlap']:.2f} "
                     f"(blocking {b['busy_blocking']:.2f})")  # fmt: skip
    lines.append(f"target: bfloat16 halves the bytes per step and cuts R by >= {c['target_R_cut']:.0%}")
    for w in c["wire"]:
        lines.append(f"  {'PASS' if w['bytes_pass'] else 'MISS'}  {w['shards']} shard(s), {w['workers']} worker(s): "
                     f"bytes bfloat16 / float32 = {w['bytes_ratio']:.3f}")  # fmt: skip
        lines.append(f"  {'PASS' if w['R_cut_pass'] else 'MISS'}  {w['shards']} shard(s), {w['workers']} worker(s): "
                     f"R {w['R_float32_ms']:.1f} -> {w['R_bfloat16_ms']:.1f} ms, cut {w['R_cut']:.0%}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], c: dict, a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    xs = range(len(rows))
    width = 0.4
    for k, (key, label, color) in enumerate([("busy_blocking", "blocking", "C0"), ("busy_overlap", "overlap", "C1")]):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows, strict=True)],
               [r[key]["max"] - m for m, r in zip(med, rows, strict=True)]]  # fmt: skip
        ax.bar([x + (k - 0.5) * width for x in xs], med, width, yerr=err, capsize=3, color=color, label=label)
    ax.axhline(TARGET_BUSY, color="k", ls="--", lw=0.8, label=f"target {TARGET_BUSY}")
    ax.set_xticks(list(xs), [r["config"].replace(", ", "\n", 1) for r in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.2)
    ax.set_ylabel(f"accelerator busy = C / period (C = {a.ratio:g} x R)")
    ax.set_title(f"{a.model} ({a.numel / 1e6:.1f}M floats), {a.mode}: median, min-max over {a.repeats} repeat(s)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)

    labels = [f"{w['shards']}s {w['workers']}w" for w in c["wire"]]
    xs2 = range(len(labels))
    ax2.bar([x - 0.2 for x in xs2], [w["R_float32_ms"] for w in c["wire"]], 0.4, color="C2", label="float32")
    ax2.bar([x + 0.2 for x in xs2], [w["R_bfloat16_ms"] for w in c["wire"]], 0.4, color="C4", label="bfloat16")
    ax2.set_xticks(list(xs2), labels, fontsize=8)
    ax2.set_ylabel("R: blocking step, ms (median)")
    ax2.set_title("wire type")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shards_x_workers(text: str) -> tuple[int, int]:
    """``"2x1"`` -> ``(2, 1)``: a configuration's shards and workers, each >= 1."""
    try:
        shards_, workers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SHARDSxWORKERS such as 2x1, got {text!r}") from None
    if shards_ < 1 or workers < 1:
        raise argparse.ArgumentTypeError(f"shards and workers must be >= 1, got {text!r}")
    return shards_, workers


def configurations(a: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(shards, workers, wire) in run order: each of --configs with float32, then bfloat16."""
    return [(shards_, workers, wire) for shards_, workers in a.configs for wire in WIRES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` fills in :data:`QUICK` for those not given, otherwise :data:`DEFAULTS` apply."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given explicitly")
    ap.add_argument("--model", choices=list(MODELS), help=f"parameter shapes (default {DEFAULTS['model']})")
    ap.add_argument("--repeats", type=int, help=f"runs of each configuration (default {DEFAULTS['repeats']})")
    ap.add_argument("--steps", type=int, help=f"timed steps per phase and worker (default {DEFAULTS['steps']})")
    ap.add_argument("--warmup", type=int, help=f"untimed steps first, per phase (default {DEFAULTS['warmup']})")
    ap.add_argument("--configs", nargs="+", type=shards_x_workers, metavar="SxW",
                    default=[shards_x_workers(c) for c in SHARDS_X_WORKERS],
                    help="shards x workers to run, each with both wire types, e.g. --configs 1x1 2x2 "
                    f"(default: {' '.join(SHARDS_X_WORKERS)})")  # fmt: skip
    ap.add_argument("--shared-memory", action="store_true",
                    help="payloads in shared memory, as on a shard's own host (default: frames)")  # fmt: skip
    ap.add_argument("--ratio", type=float, default=1.5, help="emulated compute C = ratio x R (default 1.5)")
    ap.add_argument("--mode", choices=["async", "dcasgd", "dcasgd-a"], default="dcasgd-a", help="update rule")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--worker-threads", type=int, default=1,
                    help="torch threads per worker (default 1, as dcasgd launch and torchrun set)")  # fmt: skip
    ap.add_argument("--shard-threads", type=int, default=1,
                    help="torch threads per shard (default 1, as dcasgd launch sets: two threads per shard on a "
                    "loaded 2-core machine made the round trip 3x slower here)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("results/step_overhead"))
    a = ap.parse_args(argv)
    a.configs = list(dict.fromkeys(a.configs))  # a configuration given twice runs once
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else value)
    if a.repeats < 1 or a.steps < 1 or a.warmup < 1:
        ap.error("--repeats, --steps and --warmup must be >= 1")
    a.numel = sum(torch.Size(s).numel() for _, s in MODELS[a.model]())
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the shards and workers started here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "load_average_start": os.getloadavg(),
               "compute": "emulated (sleep); not run on a GPU"}  # fmt: skip
    configs = configurations(a)
    print(f"{a.model}: {a.numel:,} floats, {a.mode}, {len(configs)} configurations x {a.repeats} repeat(s), "
          f"{a.steps} timed steps after {a.warmup} per phase, C = {a.ratio:g} x R", flush=True)  # fmt: skip
    runs = []
    workers = Workers(max(m for _, m, _ in configs), a.model, a.worker_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dcasgd-step-") as tmp:
            for repeat in range(a.repeats):
                for shards_, m, wire in configs:
                    run = run_config(workers, shards_, m, wire, repeat, a, Path(tmp))
                    runs.append(run)
                    periods = ", ".join(f"w{b['worker']} {b['period'] * 1e3:.1f}/{o['period'] * 1e3:.1f}"
                                        for b, o in zip(run["blocking"], run["overlap"], strict=True))  # fmt: skip
                    print(f"repeat {repeat}: {shards_} shard(s), {m} worker(s), {wire:<8}  R {run['R'] * 1e3:6.1f} ms"
                          f"  C {run['compute_ms']:6.1f} ms  period blocking/overlap ms: {periods}"
                          f"  (load {run['load_average_before']:.2f})", flush=True)  # fmt: skip
    finally:
        workers.close()
    rows = summarize(runs)
    c = checks(rows, a.ratio)
    print(f"\nmedian (min-max over {a.repeats} repeats); R: the blocking step with C = 0; MB/step: in + out "
          "at the shards, per worker step")  # fmt: skip
    print(format_table(rows))
    print()
    print(format_checks(c))
    a.out.mkdir(parents=True, exist_ok=True)
    machine["load_average_end"] = os.getloadavg()
    machine["total_seconds"] = time.perf_counter() - started
    report = {"argv": sys.argv[1:] if argv is None else argv,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "machine": machine,
              "summary": rows, "checks": c, "runs": runs}  # fmt: skip
    (a.out / "step_overhead.json").write_text(json.dumps(report, indent=1))
    plot(rows, c, a, a.out / "step_overhead.png")
    print(f"\nwrote {a.out / 'step_overhead.json'}, {a.out / 'step_overhead.png'} in {machine['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
