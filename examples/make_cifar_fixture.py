"""Write a tiny CIFAR-10 in the real python format, to try ``train_cifar10.py`` without the 170 MB download.

Random pixels and labels, so nothing is learned (expect about 0.1 test accuracy): it checks the
plumbing and measures speed. Writes ``DIR/cifar-10-batches-py/data_batch_1 ... data_batch_N`` and
``test_batch``: pickled dicts with ``b"data"`` (uint8, N x 3072) and ``b"labels"`` (0-9), as in
the real batches.

    python examples/make_cifar_fixture.py /tmp/cifar-tiny
    python examples/make_cifar_fixture.py /tmp/cifar-bench --per-batch 1280   # full batches of 128 for 4 workers
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch


def write_cifar10(root: str | Path, train_batches: int = 2, per_batch: int = 64, test: int = 32) -> Path:
    """Write ``train_batches`` files of ``per_batch`` training images and ``test`` test images; returns the folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    names = [f"data_batch_{i + 1}" for i in range(train_batches)] + ["test_batch"]
    for name, n in zip(names, [per_batch] * train_batches + [test], strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": torch.randint(0, 10, (n,), generator=gen).tolist(),
            b"data": torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=gen).numpy(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="where to write cifar-10-batches-py (give this DIR to train_cifar10.py --data-dir)")
    ap.add_argument("--train-batches", type=int, default=2, help="data_batch_* files (default 2; the real set has 5)")
    ap.add_argument("--per-batch", type=int, default=64, help="images per training file (default 64; real: 10000)")
    ap.add_argument("--test", type=int, default=32, help="images in test_batch (default 32; real: 10000)")
    a = ap.parse_args()
    folder = write_cifar10(a.dir, a.train_batches, a.per_batch, a.test)
    print(f"wrote {a.train_batches} x {a.per_batch} training and {a.test} test images (random) to {folder}")
