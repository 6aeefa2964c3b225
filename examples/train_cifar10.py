"""ResNet-20 on CIFAR-10, the DC-ASGD paper's first experiment; the only distributed line is the optimizer.

Reads the python version of CIFAR-10 (``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html, extracted: ``data_batch_1`` ... ``data_batch_5``
and ``test_batch``). Runs on the GPU when there is one. Augmentation as in He et al.:
4-pixel zero padding, a random 32x32 crop and a random horizontal flip.

    dcasgd launch --shards 2 --workers 4 --mode dcasgd-a -- \\
        python examples/train_cifar10.py --data-dir ~/data/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from cifar10_data import load_cifar10, normalize  # examples/cifar10_data.py, next to this script
from resnet import resnet20  # examples/resnet.py

import dcasgd


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the 4-pixel zero-padded image, then a random horizontal flip."""
    n, dev = len(x), x.device
    top, left = torch.randint(0, 9, (2, n, 1), generator=gen).to(dev)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    rows = (top + torch.arange(32, device=dev))[:, None, :, None]  # n x 1 x 32 x 1
    cols = (left + torch.arange(32, device=dev))[:, None, None, :]  # n x 1 x 1 x 32
    image, channel = torch.arange(n, device=dev)[:, None, None, None], torch.arange(3, device=dev)[:, None, None]
    crops = F.pad(x, (4, 4, 4, 4))[image, channel, rows, cols]
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--data-dir", required=True, help="the folder with the batches, or the one holding cifar-10-batches-py")
ap.add_argument("--epochs", type=int, default=160)
ap.add_argument("--batch-size", type=int, default=128)
ap.add_argument("--lr", type=float, default=0.1, help="divided by 10 after 50%% and 75%% of the epochs")
ap.add_argument("--weight-decay", type=float, default=1e-4)
ap.add_argument("--max-steps", type=int, help="stop after this many steps (quick runs, tests)")
ap.add_argument("--log-every", type=int, default=100, help="worker 0 prints the loss every this many steps")
ap.add_argument("--overlap", action="store_true", help="the next batch computes while this gradient travels")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--result-file", help="write this worker's accuracy and timing here as JSON; {worker} -> worker id")
args = ap.parse_args()
started = time.perf_counter()

# Workers that share a host (and see the same GPUs) spread over them by worker id, like LOCAL_RANK.
gpus = torch.cuda.device_count()
device = torch.device(f"cuda:{dcasgd.env.resolve().worker_id % gpus}" if gpus else "cpu")
torch.backends.cudnn.benchmark = True
try:
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_cifar10(args.data_dir))
except FileNotFoundError as exc:
    raise SystemExit(str(exc)) from None

torch.manual_seed(args.seed)  # the same initial weights everywhere (worker 0's are the ones used)
model = resnet20().to(device)
opt = dcasgd.DistributedOptimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, overlap=args.overlap)
schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [args.epochs // 2, args.epochs * 3 // 4], gamma=0.1)

# This worker's share of the training set, and the same number of steps per epoch on every
# worker: in sync mode a round waits for one gradient from each.
mine = torch.arange(opt.worker_id, len(y_train), opt.num_workers)
steps_per_epoch = max(1, len(y_train) // (opt.num_workers * args.batch_size))
gen = torch.Generator().manual_seed(args.seed + opt.worker_id)  # shuffling and augmentation

model.train()
steps, total = 0, min(args.epochs * steps_per_epoch, args.max_steps or float("inf"))
train_started = time.perf_counter()
while steps < total:
    order = mine[torch.randperm(len(mine), generator=gen)]
    for batch in order[: steps_per_epoch * args.batch_size].to(device).split(args.batch_size):
        opt.zero_grad()
        loss = F.cross_entropy(model(normalize(augment(x_train[batch], gen))), y_train[batch])
        loss.backward()
        opt.step()  # push the gradient, load the shards' new weights into the model
        steps += 1
        if opt.worker_id == 0 and steps % args.log_every == 0:
            rate = steps / (time.perf_counter() - train_started)
            print(f"step {steps}: loss {loss.item():.3f}, lr {schedule.get_last_lr()[0]:g}, {rate:.1f} steps/s")
        if steps == total:
            break
    schedule.step()
steps_per_second = steps / (time.perf_counter() - train_started)

# The shards hold the weights, but BatchNorm's running mean and variance are buffers, not
# parameters: they never travel, and each worker evaluates with the statistics it gathered itself.
opt.pull()
model.eval()
with torch.no_grad():
    predictions = torch.cat([model(normalize(x)).argmax(1) for x in x_test.split(1000)])
accuracy = (predictions == y_test).float().mean().item()
seconds = time.perf_counter() - started
print(f"worker {opt.worker_id}: {steps} steps, {steps_per_second:.2f} steps/s on {device}")
print(f"worker {opt.worker_id}: test accuracy {accuracy:.3f}")
if args.result_file:
    result = {"worker": opt.worker_id, "test_accuracy": accuracy, "steps": steps, "seconds": seconds}
    result.update(steps_per_second=steps_per_second, device=str(device), overlap=args.overlap, finished_at=time.time())
    with open(args.result_file.format(worker=opt.worker_id), "w") as f:
        json.dump(result, f)
opt.close()
