"""One worker of ``benchmarks/speedup.py``: ``examples/train_digits.py`` with a stopwatch and emulated compute.

The same MLP, data split and per-worker shards of the training set as the example,
with three changes for measuring speedup:

- **Fixed total work.** ``--epochs`` counts passes over the *whole* training set:
  with M workers each takes ``len(train) // (M * batch)`` steps per epoch, so every M
  computes about the same number of gradients in all. The lr is constant (no
  schedule), the same for every M and mode.
- **Emulated compute.** ``--compute-ms T`` pads each step's forward and backward pass
  with a sleep to at least T ms of wall time (the gradient itself is still computed
  for real); the push and pull come on top, as they would after real compute. A
  sleeping worker leaves the cores free, so M workers run in parallel on a machine
  with fewer than M cores. ``--straggler K`` makes the last worker K times slower (its
  steps take at least K*T ms); it applies only when the job has more than one worker.
- **A stopwatch on worker 0.** Every worker first waits at a barrier (``--ready-dir``)
  so that the clocks start together, after every process has imported torch. Worker 0
  evaluates test accuracy on the weights it has just received every ``--eval-every``
  steps (inside its padded step time) and records ``(seconds since the start, test
  accuracy, gradients applied)``; the gradients applied are read from shard 0's
  counters. At the end every worker pulls the shards' final weights and writes its
  ``--result-file`` (JSON; ``{worker}`` is replaced by the worker id), with shard 0's
  staleness histogram as it stood then (``shard_staleness``: the last worker's is the job's).

Run it through ``benchmarks/speedup.py``, or by hand::

    dcasgd launch --workers 4 --mode async -- python benchmarks/digits_worker.py --compute-ms 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import dcasgd

BARRIER_POLL = 0.005  # seconds between two looks at the barrier folder
BARRIER_TIMEOUT = 300.0  # seconds to wait for every worker to arrive


def wait_for_all(ready_dir: Path, worker: int, workers: int) -> None:
    """A barrier between processes: announce this worker with a file, wait until all ``workers`` did."""
    ready_dir.mkdir(parents=True, exist_ok=True)
    (ready_dir / f"ready-{worker}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while sum(1 for _ in ready_dir.glob("ready-*")) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {worker}: not every worker reached the barrier in {BARRIER_TIMEOUT:.0f} s")
        time.sleep(BARRIER_POLL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=10, help="passes over the whole training set, by all workers")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1, help="constant")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute-ms", type=float, default=0.0, help="each step's compute takes at least this long")
    ap.add_argument("--straggler", type=float, default=1.0, help="the last worker's steps take this many times longer")
    ap.add_argument("--eval-every", type=int, default=5, help="worker 0 measures test accuracy every N steps")
    ap.add_argument("--ready-dir", type=Path, help="barrier folder shared by the job's workers (none: no barrier)")
    ap.add_argument("--result-file", help="write this worker's results here as JSON; {worker} -> worker id")
    args = ap.parse_args()

    # Data: the same seeded 75/25 split on every worker, as in examples/train_digits.py.
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    cut = len(y) * 3 // 4
    x_train, y_train, x_test, y_test = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    opt = dcasgd.DistributedOptimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    me, workers = opt.worker_id, opt.num_workers

    mine = torch.arange(me, len(y_train), workers)
    steps_per_epoch = len(y_train) // (workers * args.batch_size)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    slow = args.straggler if workers > 1 and me == workers - 1 else 1.0
    step_seconds = args.compute_ms * slow / 1000.0
    shuffle = torch.Generator().manual_seed(args.seed + me)

    def test_accuracy() -> float:
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    def gradients_applied() -> int:
        return sum(opt.client.stats()[0]["updates"])

    if args.ready_dir is not None:
        wait_for_all(args.ready_dir, me, workers)
    started = time.perf_counter()
    curve: list[tuple[float, float, int]] = []  # (seconds, test accuracy, gradients applied), worker 0 only
    steps = 0
    while steps < total_steps:
        order = mine[torch.randperm(len(mine), generator=shuffle)]
        for batch in order[: steps_per_epoch * args.batch_size].split(args.batch_size):
            if steps >= total_steps:
                break
            t0 = time.perf_counter()
            if me == 0 and steps % args.eval_every == 0:  # the weights the last step brought back
                curve.append((t0 - started, test_accuracy(), gradients_applied()))
            opt.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            pad = step_seconds - (time.perf_counter() - t0)
            if pad > 0:
                time.sleep(pad)  # emulated compute: this step takes at least compute-ms (x straggler)
            opt.step()
            steps += 1
    trained = time.perf_counter() - started

    opt.pull()  # the shards' latest weights; in async modes other workers may still be pushing
    final = test_accuracy()
    staleness = opt.client.stats()[0]["staleness"]  # shard 0's histogram so far: [[staleness, pushes], ...]
    if me == 0:
        curve.append((time.perf_counter() - started, final, gradients_applied()))
    print(f"worker {me}: {steps} steps in {trained:.2f} s, test accuracy {final:.3f}")
    if args.result_file:
        result = {"worker": me, "workers": workers, "steps": steps, "seconds": trained, "test_accuracy": final,
                  "straggler": slow, "curve": curve, "finished_at": time.time(),
                  "shard_staleness": staleness}  # fmt: skip
        Path(args.result_file.format(worker=me)).write_text(json.dumps(result))
    opt.close()


if __name__ == "__main__":
    main()
