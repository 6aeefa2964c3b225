"""``dcasgd demo``: the README's main job, ``examples/train_digits.py`` on a local cluster.

Starts the shards and workers with :class:`dcasgd.launch.LocalCluster`, shows a
progress bar of the gradients the shards have applied, and ends with one line per
run: mode, workers, wall time, test accuracy (measured by the worker that finished
last, on the shards' final weights). ``--compare`` runs the four modes back to back.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .client import DcasgdError, fetch_stats
from .launch import LocalCluster
from .rules import MODES

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
EPOCHS = 60  # train_digits.py's default; the progress bar needs to know it
_POLL = 0.2  # seconds between two looks at the shards' counters for the progress bar


@dataclass
class RunResult:
    mode: str
    workers: int
    shards: int
    seconds: float
    test_accuracy: float | None
    exit_code: int

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
        extra: list[str] | None = None, progress: bool = True) -> RunResult:  # fmt: skip
    """Train ``train_digits.py`` once on a fresh local cluster; returns what the last worker measured."""
    if not SCRIPT.exists():
        raise DcasgdError(f"{SCRIPT} not found: dcasgd demo runs from a source checkout (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="dcasgd-demo-") as tmp:
        result_file = str(Path(tmp) / "result-{worker}.json")
        command = [sys.executable, str(SCRIPT), "--epochs", str(epochs), "--batch-size", str(batch_size),
                   "--result-file", result_file, *(extra or [])]  # fmt: skip
        started = time.perf_counter()
        with LocalCluster(command, shards=shards, workers=workers, mode=mode, quiet=True) as cluster:
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
    return RunResult(mode, workers, shards, seconds, last["test_accuracy"] if last else None, code)


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


def main(mode: str, compare: bool, workers: int, shards: int, epochs: int | None) -> int:
    """The ``dcasgd demo`` command; returns the first failing run's exit code, else 0."""
    epochs = EPOCHS if epochs is None else epochs
    modes = list(MODES) if compare else [mode]
    results = []
    for m in modes:
        r = run(m, workers=workers, shards=shards, epochs=epochs)
        print(r.line(), flush=True)
        results.append(r)
    if compare:
        print()
        print(f"{'mode':<9} {'workers':>7} {'wall s':>7} {'test acc':>8}")
        for r in results:
            acc = f"{r.test_accuracy:.3f}" if r.test_accuracy is not None else "n/a"
            print(f"{r.mode:<9} {r.workers:>7} {r.seconds:>7.1f} {acc:>8}")
    return next((r.exit_code for r in results if r.exit_code != 0), 0)
