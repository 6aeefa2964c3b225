"""The optimizer's device path in one run: what a session lent a GPU machine runs first.

Three parts, each on fresh ``dcasgd server`` processes on this host (``async``, lr 0.01):

1. **Bit for bit.** A small CNN (convolutions, BatchNorm, a linear layer: 4 parameter shapes)
   is built twice from one seed, once on ``--device`` and once on the CPU, each with its own
   ``DistributedOptimizer`` and its own shard. Every step attaches the same fixed gradients to
   both (no autograd: the device's arithmetic would differ) and steps. After ``--steps`` steps
   the device's parameters must equal the CPU's exactly: the device path only moves bytes
   (pinned host buffers, the side stream and its events), the shard does the arithmetic.
   Blocking and ``overlap=True``, float32 and bfloat16 wire (4 cases; ``--quick``: 2). On CUDA it also checks
   that the optimizer's host buffers are pinned, that it has a side stream, and that no
   ``torch.cuda.synchronize()`` (device-wide) ran inside ``step()``.
2. **Overlap with device work.** ResNet-50's parameters (``step_overhead.py``'s shapes,
   25.6M floats; ``--quick``: about 1M) on ``--device`` with fixed gradients. R = the median
   time inside a blocking ``step()`` with no compute; then each step first queues C = 1.5 x R
   of device work, then steps: on CUDA ``torch.cuda._sleep`` (the GPU is busy, the host is
   free, as with a real forward and backward), on the CPU a sleep. Period = wall time per step
   (on CUDA the clock stops after a final synchronize); busy = C / period, blocking against
   ``overlap=True``, float32 and bfloat16 wire.
3. **``examples/train_cifar10.py`` under ``dcasgd launch``** (1 shard, 2 workers, ``dcasgd-a``)
   on the CIFAR fixture (``examples/make_cifar_fixture.py``: random pixels, so only speed is
   measured), blocking and ``--overlap``: steps/s per worker.

Prints a table per part and PASS/MISS for part 1 (and, on CUDA, for busy >= 0.87 with
overlap in part 2: issue 10's target). Writes everything to ``--out``/gpu_check.json.

    python benchmarks/gpu_check.py                      # the whole check on cuda (about 5 min on one GPU)
    python benchmarks/gpu_check.py --device cpu --quick # the same plumbing on the CPU (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import make_params, shards  # noqa: E402  (ResNet-50's shapes, shard processes)

import dcasgd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LR = 0.01
BUSY_TARGET = 0.87


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def fixed_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + step)
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in params]


class SyncCounter:
    """Counts ``torch.cuda.synchronize`` calls while active (the device-wide wait the hot path must avoid)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = torch.cuda.synchronize

    def __enter__(self) -> SyncCounter:
        def counted(*args: Any, **kwargs: Any) -> None:
            self.calls += 1
            self._real(*args, **kwargs)

        torch.cuda.synchronize = counted
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize = self._real


def train_fixed(model: nn.Module, device: torch.device, endpoints: list[str], overlap: bool, steps: int) -> dict:
    """``steps`` optimizer steps with fixed gradients; the final parameters (on the CPU) and what was seen."""
    model = model.to(device)
    params = list(model.parameters())
    opt = dcasgd.DistributedOptimizer(params, lr=LR, servers=endpoints, worker_id=0, num_workers=1, overlap=overlap,
                                      timeout=60.0)  # fmt: skip
    seen: dict[str, Any] = {"device_syncs_in_step": 0}
    if device.type == "cuda":
        seen["pinned"] = bool(opt._grads.is_pinned() and all(b.is_pinned() for b in opt._bufs))
        seen["side_stream"] = opt._stream is not None
    try:
        for step in range(steps):
            for p, g in zip(params, fixed_grads(params, step), strict=True):
                p.grad = g.to(device)
            if device.type == "cuda":
                with SyncCounter() as sc:
                    opt.step()
                seen["device_syncs_in_step"] += sc.calls
            else:
                opt.step()
    finally:
        opt.close()  # with overlap: the last push is delivered and its reply loaded
    seen["weights"] = [p.detach().cpu().clone() for p in params]
    return seen


def part_bit_for_bit(device: torch.device, steps: int, logdir: Path, quick: bool) -> list[dict]:
    rows = []
    cases = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]
    for wire, overlap in cases[::3] if quick else cases:
        runs = {}
        for name, where in (("device", device), ("reference", torch.device("cpu"))):
            with shards(1, 1, "async", wire, 1, logdir) as endpoints:  # each its own job
                runs[name] = train_fixed(small_cnn(0), where, endpoints, overlap, steps)
        got, ref = runs["device"], runs["reference"]
        equal = all(torch.equal(a, b) for a, b in zip(got["weights"], ref["weights"], strict=True))
        moved = any(not torch.equal(a, b) for a, b in zip(got["weights"], small_cnn(0).parameters(), strict=True))
        ok = equal and moved and got["device_syncs_in_step"] == 0 and got.get("pinned", True)
        ok = ok and got.get("side_stream", True)
        rows.append({"wire": wire, "overlap": overlap, "equal": equal, "moved": moved, "pass": ok,
                     **{k: v for k, v in got.items() if k != "weights"}})  # fmt: skip
    return rows


def _device_work(device: torch.device, seconds: float, cycles_per_s: float) -> None:
    """Queue ``seconds`` of device work (CUDA: a spin kernel, the host returns at once) or sleep (CPU)."""
    if seconds <= 0:
        return
    if device.type == "cuda":
        torch.cuda._sleep(int(seconds * cycles_per_s))
    else:
        time.sleep(seconds)


def _cycles_per_second(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    torch.cuda._sleep(1000)  # warm up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1000.0)


def _timed_steps(opt, params, grads, device, compute_s: float, cps: float, steps: int) -> tuple[float, list[float]]:
    inside = []
    t0 = time.perf_counter()
    for _ in range(steps):
        _device_work(device, compute_s, cps)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        t = time.perf_counter()
        opt.step()
        inside.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.synchronize()  # after the timed loop: the device work queued last is in the period
    return (time.perf_counter() - t0) / steps, inside


def part_overlap(device: torch.device, model: str, steps: int, logdir: Path) -> list[dict]:
    cps = _cycles_per_second(device)
    params = [p.detach().to(device).requires_grad_() for _, p in make_params(model)]
    grads = [torch.randn(p.shape, device=device) * 1e-4 for p in params]
    rows = []
    for wire in ("float32", "bfloat16"):
        with shards(1, 1, "dcasgd-a", wire, 1, logdir) as endpoints:
            out: dict[str, Any] = {"wire": wire, "numel": sum(p.numel() for p in params)}
            for phase in ("calibration", "blocking", "overlap"):
                opt = dcasgd.DistributedOptimizer(params, lr=LR, servers=endpoints, worker_id=0, num_workers=1,
                                                  overlap=phase == "overlap", timeout=120.0)  # fmt: skip
                try:
                    compute = 0.0 if phase == "calibration" else 1.5 * out["R_s"]
                    _timed_steps(opt, params, grads, device, compute, cps, 2)  # warm-up
                    period, inside = _timed_steps(opt, params, grads, device, compute, cps, steps)
                finally:
                    opt.close()
                if phase == "calibration":
                    out["R_s"] = statistics.median(inside)
                else:
                    out[f"{phase}_period_s"] = period
                    out[f"{phase}_busy"] = compute / period
                    out["compute_s"] = compute
            rows.append(out)
    return rows


def part_cifar(steps: int, batch: int, logdir: Path) -> list[dict]:
    data = logdir / "cifar"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_cifar_fixture.py"), str(data), "--per-batch",
                    str(max(64, 2 * batch))], check=True, capture_output=True, timeout=120)  # fmt: skip
    rows = []
    for overlap in (False, True):
        result = logdir / f"cifar-{overlap}-{{worker}}.json"
        cmd = [sys.executable, "-m", "dcasgd", "launch", "--shards", "1", "--workers", "2", "--mode", "dcasgd-a", "--",
               sys.executable, str(ROOT / "examples" / "train_cifar10.py"), "--data-dir", str(data), "--max-steps",
               str(steps), "--batch-size", str(batch), "--log-every", str(10**9), "--result-file", str(result),
               *(["--overlap"] if overlap else [])]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"train_cifar10 under launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        workers = [json.loads(Path(str(result).format(worker=w)).read_text()) for w in range(2)]
        rows.append({"overlap": overlap, "workers": workers})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="part 1: float32 blocking and bfloat16 overlapped only; about 1M floats in part 2; 5 steps; "
                    "4 CIFAR steps of 16")  # fmt: skip
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    steps = 5 if a.quick else 20
    report: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "machine": {
        "platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}  # fmt: skip
    print(f"gpu_check on {report['machine']['device']} (torch {torch.__version__})")
    ok = True
    with tempfile.TemporaryDirectory(prefix="dcasgd-gpu-check-") as tmp:
        logdir = Path(tmp)
        if 1 in a.parts:
            rows = report["bit_for_bit"] = part_bit_for_bit(device, steps, logdir, a.quick)
            print("1. device path against the CPU path, bit for bit after", steps, "steps")
            for r in rows:
                extra = "" if device.type != "cuda" else (
                    f"  pinned {r['pinned']}  side stream {r['side_stream']}  "
                    f"device-wide syncs in step() {r['device_syncs_in_step']}")  # fmt: skip
                print(f"  {'PASS' if r['pass'] else 'MISS'}  {r['wire']:<8} overlap={r['overlap']!s:<5} "
                      f"equal {r['equal']}{extra}")  # fmt: skip
                ok = ok and r["pass"]
        if 2 in a.parts:
            rows = report["overlap"] = part_overlap(device, "tiny" if a.quick else "resnet50", steps, logdir)
            print(f"2. overlap with device work: C = 1.5 x R, {steps} steps")
            for r in rows:
                line = (f"  {r['wire']:<8} {r['numel']:,} floats  R {r['R_s'] * 1e3:7.1f} ms  busy blocking "
                        f"{r['blocking_busy']:.2f}  overlap {r['overlap_busy']:.2f}")  # fmt: skip
                if device.type == "cuda":
                    line = f"  {'PASS' if r['overlap_busy'] >= BUSY_TARGET else 'MISS'}" + line
                print(line)
        if 3 in a.parts:
            cifar_steps, batch = (4, 16) if a.quick else (60, 128)
            rows = report["cifar"] = part_cifar(cifar_steps, batch, logdir)
            print(f"3. examples/train_cifar10.py, 1 shard x 2 workers, {cifar_steps} steps of {batch}")
            for r in rows:
                rates = ", ".join(f"{w['steps_per_second']:.2f}" for w in r["workers"])
                print(f"  overlap={r['overlap']!s:<5} steps/s per worker: {rates}  on {r['workers'][0]['device']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {a.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
