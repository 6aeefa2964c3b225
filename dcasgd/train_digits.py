"""An ordinary PyTorch training script; the only distributed line is the optimizer.

A small MLP on scikit-learn's digits (8x8 images, shipped with scikit-learn). Each worker
trains on its own share of the training set; the shards hold the weights. Run it as a job:

    dcasgd launch --shards 2 --workers 4 --mode dcasgd-a -- python -m dcasgd.train_digits

(``examples/train_digits.py`` runs this same code from a source checkout.) ``dcasgd launch``
starts the shards and sets DCASGD_SERVERS, DCASGD_WORKER_ID and DCASGD_NUM_WORKERS for each
worker, which is all DistributedOptimizer needs. It ships inside the package so that
``dcasgd demo`` runs from an installed wheel.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from .optim import DistributedOptimizer

EPOCHS = 60  # the default number of epochs (dcasgd demo's progress bar needs it too)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.3, help="divided by 10 after 50%% and 75%% of the epochs")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--result-file",
        help="write this worker's accuracy and timing here as JSON; {worker} -> worker id. It also holds "
        "'curve': [unix time, test accuracy of the weights this worker holds] after every epoch",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    started = time.perf_counter()

    # Data: the same seeded 75/25 split on every worker, so the test set is the same everywhere.
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    cut = len(y) * 3 // 4
    x_train, y_train, x_test, y_test = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]

    torch.manual_seed(args.seed)  # the same initial weights everywhere (worker 0's are the ones used)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    opt = DistributedOptimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [args.epochs // 2, args.epochs * 3 // 4], gamma=0.1)

    def test_accuracy() -> float:
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    # This worker's share of the training set. Every worker takes the same number of steps per
    # epoch: in sync mode a round waits for one gradient from each worker.
    mine = torch.arange(opt.worker_id, len(y_train), opt.num_workers)
    steps_per_epoch = len(y_train) // (opt.num_workers * args.batch_size)
    shuffle = torch.Generator().manual_seed(args.seed + opt.worker_id)

    steps, curve = 0, []
    for _ in range(args.epochs):
        order = mine[torch.randperm(len(mine), generator=shuffle)]
        for batch in order[: steps_per_epoch * args.batch_size].split(args.batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step()  # push the gradient, load the shards' new weights into the model
            steps += 1
        schedule.step()
        if args.result_file:  # the weights the last reply brought: a point of dcasgd demo --compare's plot
            curve.append([time.time(), test_accuracy()])

    opt.pull()  # the shards' latest weights, with every worker's updates so far
    accuracy = test_accuracy()
    seconds = time.perf_counter() - started
    print(f"worker {opt.worker_id}: test accuracy {accuracy:.3f}")
    if args.result_file:
        result = {"worker": opt.worker_id, "test_accuracy": accuracy, "steps": steps, "seconds": seconds}
        with open(args.result_file.format(worker=opt.worker_id), "w") as f:
            json.dump({**result, "finished_at": time.time(), "curve": curve}, f)
    opt.close()


if __name__ == "__main__":
    main()
