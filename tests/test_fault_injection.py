"""Fault injection: a shard SIGKILLed mid-training comes back with --resume, a worker is killed and
restarted; training finishes as well as an undisturbed run, and no push is applied twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _read_endpoint, stop_process

from dcasgd.client import DcasgdError, fetch_stats

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
WORKERS, SHARDS, EPOCHS = 3, 2, 30


class Job:
    """Shards with checkpoints and worker processes of train_digits.py, each a real process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.ckpt = tmp / "ckpt"
        self.shards: dict[int, subprocess.Popen] = {}
        self.workers: dict[int, subprocess.Popen] = {}
        self.endpoints: list[str] = []

    def start_shard(self, s: int, bind: str = "tcp://127.0.0.1:0", *extra: str) -> str:
        log = self.tmp / f"shard{s}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", bind, "--shard", str(s), "--num-shards",
               str(SHARDS), "--num-workers", str(WORKERS), "--mode", "dcasgd-a", "--threads", "1",
               "--checkpoint-dir", str(self.ckpt / str(s)), "--checkpoint-every", "0.2", *extra]  # fmt: skip
        with open(log, "w") as err:
            self.shards[s] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        return _read_endpoint(self.shards[s], log)

    def start_worker(self, w: int) -> None:
        env = {**os.environ, "DCASGD_SERVERS": ",".join(self.endpoints), "DCASGD_WORKER_ID": str(w),
               "DCASGD_NUM_WORKERS": str(WORKERS), "OMP_NUM_THREADS": "1"}  # fmt: skip
        out = open(self.tmp / f"worker{w}-{time.monotonic_ns()}.log", "w")
        cmd = [sys.executable, str(TRAIN), "--epochs", str(EPOCHS), "--result-file", str(self.tmp / "w{worker}.json")]
        self.workers[w] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()

    def applied(self, s: int) -> int:
        try:
            return sum(fetch_stats(self.endpoints[s], timeout=1.0)["updates"])
        except DcasgdError:
            return -1

    def wait_until(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
            time.sleep(0.05)  # polling another process's progress, with a deadline

    def finish(self, timeout: float = 120.0) -> float:
        """Wait for the workers; the test accuracy of the one that finished last."""
        for w, p in self.workers.items():
            logs = "\n".join(f.read_text()[-2000:] for f in sorted(self.tmp.glob(f"worker{w}-*.log")))
            assert p.wait(timeout) == 0, logs
        results = [json.loads((self.tmp / f"w{w}.json").read_text()) for w in range(WORKERS)]
        return max(results, key=lambda r: r["finished_at"])["test_accuracy"]

    def stop(self) -> None:
        for p in [*self.workers.values(), *self.shards.values()]:
            stop_process(p)


def run_job(tmp: Path, disturb: bool) -> tuple[float, list[dict]]:
    job = Job(tmp)
    try:
        job.endpoints = [job.start_shard(s) for s in range(SHARDS)]
        for w in range(WORKERS):
            job.start_worker(w)
        if disturb:
            job.wait_until(lambda: job.applied(1) > 300, "training under way")
            job.shards[1].send_signal(signal.SIGKILL)
            job.shards[1].wait(10)
            job.start_shard(1, job.endpoints[1], "--resume")  # same address: the workers' settings stay valid
            job.wait_until(lambda: job.applied(1) > 900, "training goes on after the shard restart")
            job.workers[2].send_signal(signal.SIGKILL)
            job.workers[2].wait(10)
            job.start_worker(2)  # same id: continues its seq numbers from what the shards say
        accuracy = job.finish()
        stats = [fetch_stats(ep, timeout=5.0) for ep in job.endpoints]
        return accuracy, stats
    finally:
        job.stop()


@pytest.mark.timeout(240)
def test_training_survives_a_killed_shard_and_a_killed_worker(tmp_path):
    calm, _ = run_job(tmp_path / "calm", disturb=False)
    shaken, stats = run_job(tmp_path / "shaken", disturb=True)
    assert abs(shaken - calm) <= 0.02, f"accuracy {shaken:.3f} after faults vs {calm:.3f} undisturbed"
    assert stats[1]["resumed_from_version"] is not None
    for shard in stats:
        for w in range(WORKERS):
            # seqs only grow and a push is applied at most once: never more applied pushes than seqs
            assert shard["updates"][w] <= shard["last_seq"][w], shard
