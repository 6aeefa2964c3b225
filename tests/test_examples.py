"""The example scripts, run as users run them: ``dcasgd launch`` with real shard and worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def launch(tmp_path: Path, shards: int, workers: int, mode: str, *command: str, timeout: float) -> list[dict]:
    """Run ``dcasgd launch``; assert it exits 0 and return every worker's result file, in worker order."""
    results = tmp_path / "results"
    results.mkdir()
    cmd = [sys.executable, "-m", "dcasgd", "launch", "--shards", str(shards), "--workers", str(workers),
           "--mode", mode, "--log-level", "WARNING", "--", sys.executable, *command,
           "--result-file", str(results / "worker{worker}.json")]  # fmt: skip
    # launch stops every child it started, also when it is itself stopped on a timeout (SIGKILL reaches
    # the children through PR_SET_PDEATHSIG).
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for w in range(workers):
        assert f"[worker{w}] worker {w}: test accuracy " in proc.stdout, proc.stdout
    files = [results / f"worker{w}.json" for w in range(workers)]
    assert all(f.exists() for f in files), proc.stdout + proc.stderr
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.timeout(90)
def test_cifar10_runs_under_launch(tmp_path):
    # The fixture writer the README points to, run as a user runs it.
    made = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_cifar_fixture.py"), str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "cifar-10-batches-py").iterdir()) == [
        "data_batch_1", "data_batch_2", "test_batch"
    ]  # fmt: skip
    script = str(EXAMPLES / "train_cifar10.py")
    # --data-dir names the parent of cifar-10-batches-py, as after extracting the tarball there.
    args = [script, "--data-dir", str(tmp_path / "data"), "--max-steps", "3", "--batch-size", "16", "--log-every", "1",
            "--overlap"]  # fmt: skip
    results = launch(tmp_path, 1, 2, "dcasgd-a", *args, timeout=80)
    assert [r["worker"] for r in results] == [0, 1]
    for r in results:
        assert r["steps"] == 3
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["steps_per_second"] > 0
        assert r["device"] in ("cpu", "cuda") and r["overlap"] is True


@pytest.mark.timeout(90)
def test_digits_learns_under_launch(tmp_path):
    script = str(EXAMPLES / "train_digits.py")
    results = launch(tmp_path, 1, 2, "dcasgd-a", script, "--epochs", "8", timeout=80)
    steps = 8 * (1347 // (2 * 32))  # 75 % of the 1797 digits, split between 2 workers, batches of 32
    assert [r["steps"] for r in results] == [steps, steps]
    for r in results:
        assert r["test_accuracy"] > 0.85, r  # seen: 0.94-0.96


@pytest.mark.timeout(30)
def test_resnet20_shape_and_size():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from resnet import resnet20
    finally:
        sys.path.remove(str(EXAMPLES))

    # He et al. 2016, table 6: ResNet-20 has 0.27 M parameters. Option A shortcuts have none;
    # option B's two 1x1 projections (with BatchNorm) add 2,752.
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert sum(p.numel() for p in resnet20(shortcut="B").parameters()) == 272_474
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convolutions and the fully connected layer
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
