"""``dcasgd demo``: the README's main job, :mod:`dcasgd.train_digits` on a local cluster.

Starts the shards and workers with :class:`dcasgd.launch.LocalCluster`, shows a
progress bar of the gradients the shards have applied, and ends with one line per
run: mode, workers, wall time, test accuracy (measured by the worker that finished
last, on the shards' final weights). ``--compare`` runs every mode back to back,
prints them as a table and plots test accuracy against wall time (matplotlib).

The workers run ``python -m dcasgd.train_digits``, the installed package's own module,
so the demo needs no source checkout (``examples/train_digits.py`` runs the same code).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .client import DcasgdError, fetch_stats
from .launch import LocalCluster
from .rules import MODES

EPOCHS = 60  # dcasgd.train_digits's default (not imported from it: that imports torch); the bar needs it

TRAIN = "dcasgd.train_digits"  # the workers' module (python -m)
PLOT = "dcasgd-demo-compare.png"  # --compare's picture, in the current directory unless told otherwise
_POLL = 0.2  # seconds between two looks at the shards' counters for the progress bar


@dataclass
class RunResult:
    mode: str
    workers: int
    shards: int
    seconds: float
    test_accuracy: float | None
    exit_code: int
    # (seconds since the run started, test accuracy) after each epoch of the worker that finished
    # last, and its final accuracy on the shards' final weights at the end
    curve: list[tuple[float, float]] = field(default_factory=list)

    def line(self) -> str:
        acc = f"{self.test_accuracy:.3f}" if self.test_accuracy is not None else "n/a"
        status = "" if self.exit_code == 0 else f"  (failed, exit code {self.exit_code})"
        return (
            f"mode {self.mode:<8}  workers {self.workers}  shards {self.shards}  "
            f"wall {self.seconds:6.1f} s  test accuracy {acc}{status}"
        )


def expected_updates(workers: int, epochs: int, batch_size: int) -> int:
    """Gradients the whole job pushes: train_digits.py's steps per epoch, times epochs, times workers."""
    from sklearn.datasets import load_digits

    train = len(load_digits().target) * 3 // 4  # train_digits.py's split
    return workers * epochs * (train // (workers * batch_size))


def run(mode: str, *, workers: int = 4, shards: int = 2, epochs: int = EPOCHS, batch_size: int = 32,
        extra: list[str] | None = None, server_args: list[str] | None = None,
        progress: bool = True) -> RunResult:  # fmt: skip
    """Train :mod:`dcasgd.train_digits` once on a fresh local cluster; returns what the last worker measured.

    ``extra``: more arguments for the workers' module; ``server_args``: more ``dcasgd server`` options
    for every shard (``--lam0``, ``--staleness-power``, ``--clip``, ...).
    """
    with tempfile.TemporaryDirectory(prefix="dcasgd-demo-") as tmp:
        result_file = str(Path(tmp) / "result-{worker}.json")
        command = [sys.executable, "-m", TRAIN, "--epochs", str(epochs), "--batch-size", str(batch_size),
                   "--result-file", result_file, *(extra or [])]  # fmt: skip
        started, started_at = time.perf_counter(), time.time()
        with LocalCluster(
            command, shards=shards, workers=workers, mode=mode, server_args=server_args or (), quiet=True
        ) as cluster:
            cluster.start_servers()
            cluster.start_workers()
            done = threading.Event()
            bar = threading.Thread(
                target=_progress, args=(cluster.endpoints[0], expected_updates(workers, epochs, batch_size), mode, done)
            )
            if progress:
                bar.start()
            try:
                code = cluster.wait()
            finally:
                done.set()
                if progress:
                    bar.join()
        seconds = time.perf_counter() - started
        results = [json.loads(p.read_text()) for p in Path(tmp).glob("result-*.json")]
    last = max(results, key=lambda r: r["finished_at"], default=None)
    if last is None:
        return RunResult(mode, workers, shards, seconds, None, code)
    points = [*last.get("curve", []), [last["finished_at"], last["test_accuracy"]]]
    curve = [(at - started_at, acc) for at, acc in points]
    return RunResult(mode, workers, shards, seconds, last["test_accuracy"], code, curve)


def _progress(endpoint: str, total: int, mode: str, done: threading.Event) -> None:
    """A tqdm bar of the gradients shard 0 has applied (every push reaches every shard)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=mode, unit="grad", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        while not done.wait(_POLL):
            try:
                applied = sum(fetch_stats(endpoint, timeout=1.0)["updates"])
            except DcasgdError:
                continue  # the shard may be starting or stopping; the bar just waits
            bar.update(applied - bar.n)


def plot(results: list[RunResult], path: str | Path) -> Path:
    """Test accuracy against wall time, one line per run, as a PNG at ``path``; returns its absolute path.

    Raises ImportError when matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in results:
        if r.curve:
            xs, ys = zip(*r.curve, strict=True)
            ax.plot(xs, ys, marker=".", markersize=3, label=f"{r.mode} ({r.workers} workers)")
    ax.set_xlabel("wall time since the cluster started (s)")
    ax.set_ylabel("test accuracy (last worker to finish)")
    ax.set_title("dcasgd demo --compare: digits MLP")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = Path(path).resolve()
    fig.savefig(path, dpi=120)
    return path


def main(mode: str, compare: bool, workers: int, shards: int, epochs: int | None, plot_path: str = PLOT,
         server_args: list[str] | None = None, compare_modes: list[str] | None = None) -> int:  # fmt: skip
    """The ``dcasgd demo`` command; returns the first failing run's exit code, else 0.

    ``server_args``: ``dcasgd server`` options for every shard of every run (the rule's hyperparameters).
    ``compare_modes``: with ``compare``, the modes to run, in this order (None: every mode).
    """
    epochs = EPOCHS if epochs is None else epochs
    modes = list(compare_modes or MODES) if compare else [mode]
    results = []
    for m in modes:
        r = run(m, workers=workers, shards=shards, epochs=epochs, server_args=server_args)
        print(r.line(), flush=True)
        results.append(r)
    if compare:
        print()
        print(f"{'mode':<9} {'workers':>7} {'wall s':>7} {'test acc':>8}")
        for r in results:
            acc = f"{r.test_accuracy:.3f}" if r.test_accuracy is not None else "n/a"
            print(f"{r.mode:<9} {r.workers:>7} {r.seconds:>7.1f} {acc:>8}")
        try:
            print(f"plot: {plot(results, plot_path)}  (test accuracy against wall time)")
        except ImportError:
            print('plot: not drawn: matplotlib is not installed (pip install matplotlib or "dcasgd[bench]")')
    return next((r.exit_code for r in results if r.exit_code != 0), 0)
