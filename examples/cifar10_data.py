"""CIFAR-10's python batches (``cifar-10-python.tar.gz``, extracted), for ``train_cifar10.py`` and
``benchmarks/staleness.py --data-dir``: the loader and the per-channel normalization."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(data_dir: str | Path) -> tuple[torch.Tensor, ...]:
    """uint8 images N x 3 x 32 x 32 and int64 labels: train (every ``data_batch_*``), then test.

    ``data_dir``: the folder with the batches, or the one holding ``cifar-10-batches-py``.
    Raises FileNotFoundError when neither has them.
    """
    root = Path(data_dir).expanduser()
    if not (root / "test_batch").exists():
        root = root / "cifar-10-batches-py"  # the tarball's folder, if we were given its parent
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").exists():
        raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_*, test_batch) in {data_dir}")

    def read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = []
        for file in files:
            with open(file, "rb") as f:
                batches.append(pickle.load(f, encoding="bytes"))
        x = torch.cat([torch.as_tensor(b[b"data"]).view(-1, 3, 32, 32) for b in batches])
        y = torch.cat([torch.as_tensor(b[b"labels"], dtype=torch.int64) for b in batches])
        return x, y

    return *read(train_files), *read([root / "test_batch"])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32, scaled to [0, 1] and standardized per channel."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std
