"""The shard's update, side by side: fused kernel, torch fallback, and the memcpy bound.

For each rule on ``--n`` float32 elements, times ``dcasgd.kernels.update`` with the fused
kernel and with the plain-torch fallback, and the bound: a memcpy that moves as many bytes as
the update must (read g, w, w_bak, ms, v; write w, ms, v, snapshot), half read and half
written, so its working set is the update's too. Prints milliseconds per update as
min-median-max over ``--repeats`` runs, at each thread count, and fused / bound (of the minima,
then of the medians: other programs on the machine inflate the rest).

    python benchmarks/kernels.py --n 10000000 --threads 1 2 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dcasgd import kernels, rules

# (label, mode, momentum, snapshot)
CASES = [
    ("async", "async", 0.0, False),
    ("async + momentum", "async", 0.9, False),
    ("dcasgd", "dcasgd", 0.0, False),
    ("dcasgd-a", "dcasgd-a", 0.0, False),
    ("dcasgd-a + snapshot", "dcasgd-a", 0.0, True),
    ("dcasgd-a + momentum + snapshot", "dcasgd-a", 0.9, True),
    ("dcasgd-s (clip 1)", "dcasgd-s", 0.0, False),
    ("dcasgd-s (clip 1) + snapshot", "dcasgd-s", 0.0, True),
    ("sync + momentum", "sync", 0.9, False),
]


def moved_bytes(mode: str, momentum: float, snapshot: bool, itemsize: int) -> int:
    """Bytes per element the update must read and write (w, ms, v float32; g, w_bak, snapshot wire type)."""
    n = itemsize + 4 + 4  # read g, read and write w
    if mode == "sync":
        n = 4 + 4 + 4 + 4  # the round's float32 sum is read and zeroed
    if mode in ("dcasgd", "dcasgd-a", "dcasgd-s"):
        n += itemsize
    if mode in ("dcasgd-a", "dcasgd-s"):
        n += 8
    if momentum > 0:
        n += 8
    if snapshot:
        n += itemsize
    return n


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def fmt(ms: list[float]) -> str:
    return f"{min(ms):6.1f}-{statistics.median(ms):6.1f}-{max(ms):6.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--wire", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cases", nargs="+", metavar="MODE", help="only the cases of these modes (default: all)")
    args = ap.parse_args()
    cases = [c for c in CASES if args.cases is None or c[1] in args.cases]
    wire = getattr(torch, args.wire)
    itemsize = torch.empty(0, dtype=wire).element_size()
    t = time.perf_counter()
    for mode in dict.fromkeys(c[1] for c in cases):
        kernels.prepare(mode, wire, wait=True, momentum=any(c[2] > 0 for c in cases if c[1] == mode))
    print(f"kernels ready in {time.perf_counter() - t:.2f} s (import numba, compile or load from cache)")
    n = args.n
    w, ms, v = torch.randn(n), torch.rand(n), torch.zeros(n)
    g = (torch.randn(n) * 1e-3).to(wire)
    w_bak = (w + 1e-3 * torch.randn(n)).to(wire)
    snap = torch.empty(n, dtype=wire)
    g32, scratch = torch.empty(n), [torch.empty(n), torch.empty(n)]
    grad_sum = torch.randn(n) * 1e-3
    most = max(moved_bytes(mode, mu, snap, itemsize) for _, mode, mu, snap in cases) * n // 2
    src, dst = torch.ones(most, dtype=torch.uint8), torch.zeros(most, dtype=torch.uint8)
    print(f"n = {n:,} elements, wire {args.wire}; ms per update, min-median-max of {args.repeats}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        copy = timed(lambda: dst.copy_(src), args.repeats)
        rate = 2 * src.numel() / (min(copy) * 1e-3) / 1e9  # GB/s, read + write
        check = timed(lambda: kernels.finite(g), args.repeats)
        exact = timed(lambda: bool(torch.isfinite(g).all()), args.repeats)
        print(f"\n{threads} thread(s): memcpy of {2 * most / 1e6:.0f} MB moved at up to {rate:.1f} GB/s")
        print(f"  non-finite check: kernels.finite(g) {fmt(check)}, torch.isfinite(g).all() {fmt(exact)}")
        print(f"  {'case':32s} {'fused':>20s} {'fallback':>20s} {'bound (memcpy)':>20s} {'fused/bound':>11s}")
        for label, mode, mu, with_snap in cases:
            cfg = rules.RuleConfig(mode=mode, momentum=mu)
            gg = grad_sum if mode == "sync" else g
            kw = dict(config=cfg, lr=1e-6, w_bak=w_bak, ms=ms, momentum_buf=v, count=2, scratch=scratch, g32=g32)
            kw["snapshot"] = snap if with_snap else None
            kw["staleness"] = 31  # dcasgd-s: lambda_0 * sqrt(32); the others ignore it
            fused = timed(lambda: kernels.update(mode, w, gg, fused=True, **kw), args.repeats)  # noqa: B023
            fallback = timed(lambda: kernels.update(mode, w, gg, fused=False, **kw), args.repeats)  # noqa: B023
            half = moved_bytes(mode, mu, with_snap, itemsize) * n // 2
            bound = timed(lambda: dst[:half].copy_(src[:half]), args.repeats)  # noqa: B023
            ratio = f"{min(fused) / min(bound):.2f}, {statistics.median(fused) / statistics.median(bound):.2f}"
            print(f"  {label:32s} {fmt(fused):>20s} {fmt(fallback):>20s} {fmt(bound):>20s} {ratio:>11s}")


if __name__ == "__main__":
    main()
