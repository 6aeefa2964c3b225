"""Speedup with M workers: real local clusters on the digits task, and the simulator for larger M.

For each mode and each M in --workers, one job on a fresh :class:`dcasgd.launch.LocalCluster`
(--shards shard processes, M processes of ``benchmarks/digits_worker.py``). The total work is
fixed in epochs over the whole training set (with M workers each takes 1/M of the steps), the
lr is constant. Worker 0 records test accuracy against seconds since every worker passed a
start barrier (so process start-up is not counted). For each run:

    time to target   the first time worker 0's test accuracy reached --target (on the weights
                     it had just received)
    speedup          T(mode, M=1) / T(mode, M): the same mode on one worker is the baseline
    vs sync@1        T(sync, M=1) / T(mode, M)
    final accuracy   on the shards' weights once the last worker finished (after --epochs)

This machine has two cores, so a worker's compute is emulated: --compute-ms T pads each step's
forward and backward pass with a sleep to at least T ms (the gradient is still computed for
real; sleeping workers leave the cores free, so M workers run in parallel). --straggler K makes
the last worker K times slower when M > 1. --simulate runs the same grid through
:mod:`dcasgd.sim` (virtual time in units of one batch's compute time; seconds = units * T) for
larger M (--sim-workers), with the same compute model; the simulator has no communication cost.

SSGD averages M gradients into one step, so by default its lr is scaled linearly with M (the
usual rule for large minibatches, Goyal et al. 2017), up to --max-sync-lr (beyond about 0.8
SSGD on this task ends below the target or diverges); --sync-lr-scale none turns that off.

Prints a table and writes under --out: speedup.json (the exact arguments, the machine and its
load, every run's raw curve, the summary) and two plots: speedup.png (speedup vs M per mode,
with the linear ideal) and accuracy_vs_time.png (worker 0's test accuracy vs wall time per mode
at the largest M, with sync at M=1 for reference).

    python benchmarks/speedup.py --compute-ms 20 --straggler 4      # modes x M in 1 2 4 8 (~7 min here)
    python benchmarks/speedup.py --quick                            # M in 1 2 4, fewer epochs (~2 min)
    python benchmarks/speedup.py --quick --simulate                 # plus the simulator up to M=64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dcasgd import MODES, RuleConfig
from dcasgd.launch import LocalCluster

WORKER = Path(__file__).resolve().parent / "digits_worker.py"
DEFAULTS = {"workers": [1, 2, 4, 8], "epochs": 20.0, "target": 0.95}
QUICK = {"workers": [1, 2, 4], "epochs": 12.0, "target": 0.93}
SIM_WORKERS = [1, 2, 4, 8, 16, 32, 64]
RUN_TIMEOUT = 600.0  # seconds one job may take before it is stopped and recorded as failed
TAIL_LINES = 30  # lines of a failed job's output kept in the JSON and printed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--workers", type=int, nargs="+", help=f"M values (default {DEFAULTS['workers']})")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--epochs", type=float, help=f"passes over the training set, all workers together "
                    f"(default {DEFAULTS['epochs']:g}, quick {QUICK['epochs']:g})")  # fmt: skip
    ap.add_argument("--target", type=float, help=f"test accuracy to reach (default {DEFAULTS['target']}, "
                    f"quick {QUICK['target']})")  # fmt: skip
    ap.add_argument("--compute-ms", type=float, default=20.0, help="each step computes for at least this long")
    ap.add_argument("--straggler", type=float, default=1.0, help="the last worker is K times slower (M > 1)")
    ap.add_argument("--lr", type=float, default=0.1, help="constant lr (ASGD at M=8 with 20 ms steps diverges at 0.3)")
    ap.add_argument("--sync-lr-scale", choices=["linear", "none"], default="linear", help="sync: lr * M or lr")
    ap.add_argument("--max-sync-lr", type=float, default=0.8, help="cap on the scaled sync lr")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=2, help="worker 0's steps between two test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compensation", choices=["per-worker", "per-parameter"], default="per-worker",
                    help="DC modes: the paper's backup per worker, or the per-parameter ablation")  # fmt: skip
    d = RuleConfig()
    ap.add_argument("--lam0", type=float, default=d.lam0, help=f"dcasgd-a and dcasgd-s lambda_0 (default {d.lam0})")
    ap.add_argument("--staleness-power", type=float, default=d.staleness_power, metavar="P",
                    help=f"dcasgd-s: lambda_0 * (1 + staleness)**P (default {d.staleness_power})")  # fmt: skip
    ap.add_argument("--clip", type=float, default=d.clip, metavar="C",
                    help=f"dcasgd-s: compensation clipped to C*|g|, 0: none (default {d.clip})")  # fmt: skip
    ap.add_argument(
        "--fisher-lam0", type=float, default=d.fisher_lam0, help=f"dcasgd-f lambda (default {d.fisher_lam0})"
    )
    ap.add_argument("--fisher-cap", type=float, default=d.fisher_cap,
                    help=f"dcasgd-f: lr * lambda_max(F) capped at this, 0: none (default {d.fisher_cap})")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK['workers']}, {QUICK['epochs']:g} epochs, "
                    f"target {QUICK['target']} (unless given)")  # fmt: skip
    ap.add_argument("--simulate", action="store_true", help="also run the grid in dcasgd.sim, for --sim-workers")
    ap.add_argument("--sim-workers", type=int, nargs="+", default=SIM_WORKERS)
    ap.add_argument("--out", type=Path, default=Path("results/speedup"))
    a = ap.parse_args(argv)
    preset = QUICK if a.quick else DEFAULTS
    for key in ("workers", "epochs", "target"):
        if getattr(a, key) is None:
            setattr(a, key, preset[key])
    if min(a.workers) < 1 or a.shards < 1:
        ap.error("--workers and --shards must be >= 1")
    try:
        RuleConfig(lr=a.lr, lam0=a.lam0, staleness_power=a.staleness_power, clip=a.clip, fisher_lam0=a.fisher_lam0,
                   fisher_cap=a.fisher_cap)  # fmt: skip
    except ValueError as exc:
        ap.error(str(exc))
    return a


def rule_args(a: argparse.Namespace) -> list[str]:
    """The rule's hyperparameters as ``dcasgd server`` options (the simulator gets the same values)."""
    return ["--lam0", str(a.lam0), "--staleness-power", str(a.staleness_power), "--clip", str(a.clip),
            "--fisher-lam0", str(a.fisher_lam0), "--fisher-cap", str(a.fisher_cap)]  # fmt: skip


def lr_for(mode: str, workers: int, a: argparse.Namespace) -> float:
    """The constant lr of one run: ``--lr``, or for sync scaled with M (capped)."""
    if mode == "sync" and a.sync_lr_scale == "linear":
        return max(a.lr, min(a.lr * workers, a.max_sync_lr))
    return a.lr


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """The first time in ``curve`` (rows ``[seconds, accuracy, ...]``) at which accuracy >= target."""
    return next((row[0] for row in curve if row[1] >= target), None)


def run_real(mode: str, workers: int, a: argparse.Namespace, tmp: Path) -> dict:
    """One job on a fresh local cluster; returns worker 0's curve and what the job measured."""
    lr = lr_for(mode, workers, a)
    run_dir = tmp / f"{mode}-{workers}"
    command = [
        sys.executable, str(WORKER), "--epochs", str(a.epochs), "--lr", str(lr), "--batch-size", str(a.batch_size),
        "--hidden", str(a.hidden), "--weight-decay", str(a.weight_decay), "--seed", str(a.seed),
        "--compute-ms", str(a.compute_ms), "--straggler", str(a.straggler), "--eval-every", str(a.eval_every),
        "--ready-dir", str(run_dir / "ready"), "--result-file", str(run_dir / "result-{worker}.json"),
    ]  # fmt: skip
    log = io.StringIO()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    code, error = 1, None
    server_args = ["--log-level", "WARNING", "--compensation", a.compensation, *rule_args(a)]
    with LocalCluster(command, shards=a.shards, workers=workers, mode=mode, server_args=server_args,
                      output=log) as cluster:  # fmt: skip
        try:
            cluster.start_servers()
            cluster.start_workers()
            code = cluster.wait(timeout=RUN_TIMEOUT)
        except Exception as exc:  # a launch error or a timeout: record it, go on with the next run
            error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - started
    results = sorted((json.loads(p.read_text()) for p in run_dir.glob("result-*.json")), key=lambda r: r["worker"])
    first = next((r for r in results if r["worker"] == 0), None)
    last = max(results, key=lambda r: r["finished_at"], default=None)
    curve = first["curve"] if first else []
    run = {
        "mode": mode, "workers": workers, "lr": lr, "exit_code": code, "error": error, "wall_seconds": wall,
        "train_seconds": max((r["seconds"] for r in results), default=None),
        "time_to_target": time_to_target(curve, a.target),
        "final_accuracy": last["test_accuracy"] if last and len(results) == workers else None,
        "curve_fields": ["seconds", "test_accuracy", "gradients_applied"], "curve": curve,
        "per_worker": [{k: r[k] for k in ("worker", "steps", "seconds", "test_accuracy", "straggler")}
                       for r in results],
        "load_average_before": load_before,
    }  # fmt: skip
    if code != 0 or error or len(results) != workers:
        run["output_tail"] = log.getvalue().splitlines()[-TAIL_LINES:]
    return run


def run_sim(mode: str, workers: int, a: argparse.Namespace) -> dict:
    """The same job in the simulator; times are converted to seconds with --compute-ms (1 unit if 0)."""
    from dcasgd.sim import SimConfig, simulate

    straggle = a.straggler != 1.0 and workers > 1
    config = SimConfig(
        workers=workers, mode=mode, lr=lr_for(mode, workers, a), batch_size=a.batch_size, epochs=a.epochs,
        compute="straggler" if straggle else "equal", jitter=0.0, straggler_k=a.straggler if straggle else 1.0,
        stragglers=1 if straggle else 0, seed=a.seed, hidden=a.hidden, shards=a.shards, eval_every=1.0,
        weight_decay=a.weight_decay, compensation=a.compensation, lam0=a.lam0, staleness_power=a.staleness_power,
        clip=a.clip, fisher_lam0=a.fisher_lam0, fisher_cap=a.fisher_cap,
    )  # fmt: skip
    result = simulate(config)
    unit = a.compute_ms / 1000.0 if a.compute_ms > 0 else 1.0
    curve = [[t * unit, acc, updates] for t, updates, acc in result.history]
    return {
        "mode": mode, "workers": workers, "lr": config.lr, "time_unit_seconds": unit,
        "time_to_target": time_to_target(curve, a.target), "final_accuracy": result.final_accuracy,
        "mean_staleness": result.mean_staleness, "max_staleness": result.max_staleness,
        "curve_fields": ["seconds", "test_accuracy", "updates"], "curve": curve, "config": result.to_dict()["config"],
        "wall_seconds": result.wall_seconds,
    }  # fmt: skip


def summarize(runs: list[dict]) -> list[dict]:
    """One row per run: time to target, speedup over the same mode and over sync at M=1, final accuracy."""
    t1 = {r["mode"]: r["time_to_target"] for r in runs if r["workers"] == 1}
    sync1 = t1.get("sync")

    def ratio(base: float | None, t: float | None) -> float | None:
        return base / t if base is not None and t else None

    rows = []
    for r in runs:
        t = r["time_to_target"]
        rows.append({"mode": r["mode"], "workers": r["workers"], "lr": r["lr"], "time_to_target": t,
                     "speedup": ratio(t1.get(r["mode"]), t), "speedup_vs_sync1": ratio(sync1, t),
                     "final_accuracy": r["final_accuracy"], "train_seconds": r.get("train_seconds"),
                     "wall_seconds": r["wall_seconds"]})  # fmt: skip
    return rows


def format_table(rows: list[dict], target: float, unit: str = "s") -> str:
    def f(v: float | None, spec: str, missing: str = "-") -> str:
        return missing if v is None else format(v, spec)

    lines = [f"{'mode':<9} {'M':>3} {'lr':>5} {f'to {target:g} ' + unit:>11} {'speedup':>8} {'vs sync@1':>9} "
             f"{'final acc':>9} {'train s':>8} {'wall s':>7}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['mode']:<9} {r['workers']:>3} {r['lr']:>5.2g} {f(r['time_to_target'], '.2f', 'not reached'):>11} "
            f"{f(r['speedup'], '.2f'):>8} {f(r['speedup_vs_sync1'], '.2f'):>9} {f(r['final_accuracy'], '.3f'):>9} "
            f"{f(r['train_seconds'], '.1f'):>8} {f(r['wall_seconds'], '.1f'):>7}"
        )
    return "\n".join(lines)


def straggler_check(rows: list[dict], a: argparse.Namespace) -> dict | None:
    """At the largest M: how much sooner each async mode reached the target than sync (expected >= 2x).

    Per mode: ``sync_over_mode`` when both reached it; when only the mode did, sync's whole run
    divided by the mode's time is a lower bound (``sync_over_mode_at_least``). The verdict is
    None when it cannot be told (neither reached the target) or there is no straggler.
    """
    m = max(a.workers)
    at = {r["mode"]: r for r in rows if r["workers"] == m}
    if m < 2 or "sync" not in at or len(at) < 2:
        return None
    t_sync, sync_run = at["sync"]["time_to_target"], at["sync"]["train_seconds"]
    ratios, verdicts = {}, []
    for mode, r in at.items():
        if mode == "sync":
            continue
        t = r["time_to_target"]
        v = {"time_to_target": t, "sync_over_mode": None, "sync_over_mode_at_least": None}
        if t is not None and t_sync is not None:
            v["sync_over_mode"] = t_sync / t
            verdicts.append(v["sync_over_mode"] >= 2.0)
        elif t is not None and sync_run:
            v["sync_over_mode_at_least"] = sync_run / t
            verdicts.append(True if v["sync_over_mode_at_least"] >= 2.0 else None)
        else:
            verdicts.append(False if t_sync is not None else None)
        ratios[mode] = v
    holds = False if False in verdicts else (None if None in verdicts else True)
    if a.straggler <= 1.0:
        holds = None  # the expectation is about a job with a straggler
    return {"workers": m, "straggler": a.straggler, "sync_time_to_target": t_sync, "sync_train_seconds": sync_run,
            "ratios": ratios, "async_at_least_2x_sooner": holds}  # fmt: skip


def plot(rows: list[dict], runs: list[dict], sim_rows: list[dict], a: argparse.Namespace, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: f"C{i}" for i, m in enumerate(MODES)}
    paths = []
    panels = [("local cluster (wall time)", rows)] + ([("simulator (virtual time)", sim_rows)] if sim_rows else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, panel) in zip(axes[0], panels, strict=True):
        ms = sorted({r["workers"] for r in panel})
        ax.plot(ms, ms, "k--", lw=1, label="linear (ideal)")
        for mode in a.modes:
            pts = [(r["workers"], r["speedup"]) for r in panel if r["mode"] == mode and r["speedup"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[mode], label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("workers M")
        ax.set_ylabel(f"speedup to test accuracy {a.target:g} (vs same mode, M=1)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"digits MLP, compute {a.compute_ms:g} ms/step, straggler x{a.straggler:g}, {a.epochs:g} epochs",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    paths.append(out / "speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    m = max(a.workers)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = next((r for r in runs if r["mode"] == "sync" and r["workers"] == 1 and r["curve"]), None)
    if ref is not None and m > 1:
        ax.plot([c[0] for c in ref["curve"]], [c[1] for c in ref["curve"]], color="0.6", ls=":", label="sync, M=1")
    for r in runs:
        if r["workers"] == m and r["curve"]:
            ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], color=colors[r["mode"]], label=r["mode"])
    ax.axhline(a.target, color="k", lw=0.8, ls="--", label=f"target {a.target:g}")
    ax.set_ylim(max(0.0, a.target - 0.4), 1.0)
    ax.set_xlabel("seconds since start (worker 0)")
    ax.set_ylabel("test accuracy (worker 0's weights)")
    ax.set_title(f"M={m}, compute {a.compute_ms:g} ms/step, straggler x{a.straggler:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "load_average_start": os.getloadavg()}  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory(prefix="dcasgd-speedup-") as tmp:
        for mode in a.modes:
            for m in sorted(a.workers):
                run = run_real(mode, m, a, Path(tmp))
                runs.append(run)
                reached = f"{run['time_to_target']:.2f} s" if run["time_to_target"] is not None else "not reached"
                print(f"{mode:<9} M={m:<2} to {a.target:g}: {reached:>11}  wall {run['wall_seconds']:5.1f} s"
                      f"  (load {run['load_average_before']:.2f})", flush=True)  # fmt: skip
                if "output_tail" in run:
                    print(f"  failed (exit code {run['exit_code']}, {run['error']}):", *run["output_tail"], sep="\n  ")
    rows = summarize(runs)
    print(f"\nlocal clusters: {a.shards} shard(s), compute {a.compute_ms:g} ms/step, straggler x{a.straggler:g}, "
          f"{a.epochs:g} epochs, lr {a.lr:g} (sync: {a.sync_lr_scale}), target {a.target:g}")  # fmt: skip
    print(format_table(rows, a.target))
    check = straggler_check(rows, a)
    if check is not None:
        parts = []
        for mode, v in check["ratios"].items():
            if v["sync_over_mode"] is not None:
                parts.append(f"{mode} {v['sync_over_mode']:.2f}x")
            elif v.get("sync_over_mode_at_least") is not None:
                parts.append(f"{mode} >= {v['sync_over_mode_at_least']:.2f}x (sync never reached it)")
            else:
                parts.append(f"{mode} did not reach it")
        verdict = f"; at least 2x for every async mode: {check['async_at_least_2x_sooner']}" if a.straggler > 1 else ""
        print(f"\nM={check['workers']}, straggler x{check['straggler']:g}: reached {a.target:g} sooner than sync by: "
              f"{', '.join(parts)}{verdict}")  # fmt: skip

    sim_runs, sim_rows = [], []
    if a.simulate:
        for mode in a.modes:
            for m in sorted(a.sim_workers):
                sim_runs.append(run_sim(mode, m, a))
        sim_rows = summarize(sim_runs)
        unit = "s" if a.compute_ms > 0 else "units"
        print(f"\nsimulator (virtual time, 1 batch = {a.compute_ms:g} ms; no communication cost):")
        print(format_table(sim_rows, a.target, unit))

    a.out.mkdir(parents=True, exist_ok=True)
    machine["load_average_end"] = os.getloadavg()
    machine["total_seconds"] = time.perf_counter() - started
    report = {"argv": sys.argv[1:] if argv is None else argv,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "machine": machine,
              "summary": rows, "straggler_check": check, "runs": runs,
              "simulation": {"summary": sim_rows, "runs": sim_runs} if a.simulate else None}  # fmt: skip
    (a.out / "speedup.json").write_text(json.dumps(report, indent=1))
    paths = plot(rows, runs, sim_rows, a, a.out)
    print(f"\nwrote {a.out / 'speedup.json'}, {', '.join(str(p) for p in paths)} "
          f"in {machine['total_seconds']:.0f} s")  # fmt: skip
    return 0 if all(r["exit_code"] == 0 and not r["error"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
