"""A local DC-ASGD job from scratch: 2 shards, 4 workers, softmax regression on scikit-learn's digits.

Every piece is a real process talking over 127.0.0.1: the shards are ``dcasgd server``
processes, each worker is a process with a :class:`dcasgd.Client`. Read it top to
bottom; it is the whole protocol a worker follows:

    init (worker 0) -> pull -> loop { gradient on a minibatch -> push_pull }

    python examples/quickstart.py [--mode dcasgd-a] [--workers 4] [--shards 2] [--epochs 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dcasgd import Client

FEATURES, CLASSES = 64, 10


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Digits 8x8 (shipped inside scikit-learn), scaled to [0, 1], split 75/25."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) * 3 // 4
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def logits(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model: one linear layer, weights and bias packed in one flat vector."""
    weight = flat[: FEATURES * CLASSES].view(CLASSES, FEATURES)
    bias = flat[FEATURES * CLASSES :]
    return x @ weight.T + bias


def worker(servers: list[str], rank: int, num_workers: int, epochs: int, lr: float, results: mp.Queue) -> None:
    x, y, x_test, y_test = load_digits()
    client = Client(servers, worker_id=rank)
    if rank == 0:
        client.init(torch.zeros(FEATURES * CLASSES + CLASSES))
    else:
        client.wait_initialized(timeout=30)
    w = client.pull()
    mine = torch.arange(rank, len(y), num_workers)  # this worker's share of the training set
    gen = torch.Generator().manual_seed(rank)
    for _ in range(epochs):
        for batch in mine[torch.randperm(len(mine), generator=gen)].split(32):
            w.requires_grad_(True)
            loss = F.cross_entropy(logits(w, x[batch]), y[batch])
            (g,) = torch.autograd.grad(loss, w)
            w = client.push_pull(g, lr=lr, out=w.detach())
    accuracy = (logits(client.pull(), x_test).argmax(1) == y_test).float().mean().item()
    results.put((rank, accuracy))
    client.close()


def start_shard(shard: int, num_shards: int, num_workers: int, mode: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dcasgd", "server", "--bind", "tcp://127.0.0.1:0", "--shard", str(shard),
           "--num-shards", str(num_shards), "--num-workers", str(num_workers), "--mode", mode,
           "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    endpoint = re.search(r"listening on (\S+)", proc.stdout.readline())
    if endpoint is None:
        proc.kill()
        raise RuntimeError(f"shard {shard} did not start")
    return proc, endpoint.group(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="dcasgd-a", choices=["sync", "async", "dcasgd", "dcasgd-a"])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.5)
    a = ap.parse_args()

    torch.set_num_threads(1)  # many small processes on few cores
    started = time.perf_counter()
    shards = [start_shard(s, a.shards, a.workers, a.mode) for s in range(a.shards)]
    servers = [endpoint for _, endpoint in shards]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args = (servers, a.workers, a.epochs, a.lr, results)
    procs = [ctx.Process(target=worker, args=(args[0], r, *args[1:])) for r in range(a.workers)]
    try:
        for p in procs:
            p.start()
        accuracies = dict(results.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for proc, _ in shards:
            proc.terminate()
            proc.wait(10)
    code = max((p.exitcode or 0) for p in procs)
    print(
        f"mode {a.mode}, {a.workers} workers, {a.shards} shards: {time.perf_counter() - started:.1f} s, "
        f"test accuracy {accuracies[0]:.3f}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
