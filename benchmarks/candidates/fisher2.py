"""Scratch: bounds on the Fisher compensation (issue 13, round 2b; not shipped).

Replaces ``rules.dcasgd_fisher_step`` (which ``kernels`` calls through the module) with a
parametrised version, then runs ``simulate`` serially (one process, one thread). The base is
``mode="dcasgd-s", curvature="fisher", lam0=12, staleness_power=0, clip=0`` (K = 128, centred).
Parameters (JSON): ``kappa`` (||c|| <= kappa ||g||), ``cap`` and ``cap_by`` ("s" or "M"; scale F
so that lr * lambda_max(F) * (s or M) <= cap), ``spec`` ("eig": the k x k Gram matrix's exact
largest eigenvalue; "trace": tr F, an upper bound), ``rms`` (lam = lam0 * rms / sqrt(mean_j
|g_j|^2 / n), a reference RMS), ``clip``, ``lam0``, ``stats`` (print lr*lmax*s percentiles).
Usage: python benchmarks/candidates/fisher2.py NAME '{"json": "params"}' MODEL M [M ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from dcasgd import rules
from dcasgd.sim import SimConfig, simulate

P: dict = {}
ST: dict = {"x": []}


def lam_max(rows: torch.Tensor, gram: torch.Tensor, lam: float, centered: bool) -> float:
    """Largest eigenvalue of F = G^T A G (A = lam/k (I - J) + 1/k J, J = 11^T/k; uncentered A = lam/k I):
    that of A^1/2 Gram A^1/2 (k x k), by a warm-started power iteration."""
    k = rows.shape[0]
    gm = gram[:k, :k]

    def half(x):  # A^1/2 x, closed form
        if not centered:
            return x * (lam / k) ** 0.5
        mu = x.mean()
        return (x - mu) * (lam / k) ** 0.5 + mu * (1.0 / k) ** 0.5

    def b(x):
        return half(gm @ half(x))

    v = ST.get("v")
    if v is None or v.shape[0] != k:
        v = torch.ones(k, dtype=gm.dtype) if v is None else torch.cat([v, torch.ones(k - v.shape[0], dtype=gm.dtype)])
    for _ in range(P.get("iters", 4)):
        v = b(v)
        v = v / v.norm().clamp_min(1e-30)
    ST["v"] = v
    return float(v @ b(v))


def variant(w, g, w_bak, ring, *, lr, staleness, lam0=12.0, staleness_power=0.0, centered=True, clip=0.0, **kw):
    p = P
    lam = p.get("lam0", lam0)
    if ST.get("ring") is not ring:
        ST["ring"], ST["v"] = ring, None
        ST["gram"] = torch.zeros(ring.rows.shape[0], ring.rows.shape[0], dtype=torch.float64)
    rows = ring.add(g)
    k, n = rows.shape
    if "cap" in p or p.get("stats"):
        r = (ring.count - 1) % ring.rows.shape[0]
        dots = torch.mv(ring.rows, g).double()
        ST["gram"][r, :] = dots
        ST["gram"][:, r] = dots
    if "rms" in p:
        rms = float((rows.square().sum() / (k * n)).sqrt())
        lam = lam * p["rms"] / max(rms, 1e-12)
    d = w - w_bak
    a = torch.mv(rows, d)
    mean = a.mean()
    a.mul_(lam / k)
    if centered:
        a.sub_(mean * ((lam - 1.0) / k))
    c = torch.mv(rows.t(), a)
    scale = 1.0
    if "cap" in p or p.get("stats"):
        if p.get("spec", "eig") == "eig":
            lm = lam_max(rows, ST["gram"], lam, centered)
        else:
            lm = lam / k * float(rows.square().sum()) - (lam - 1.0) * float(rows.mean(0).square().sum())
        s = {"s": staleness, "M": ST["M"], "1": 1}[p.get("cap_by", "s")]
        x = lr * lm * max(s, 1)
        if p.get("stats"):
            ST["x"].append(x)
        if "cap" in p and x > p["cap"]:
            scale = p["cap"] / x
    if "kappa" in p:
        cn, gn = float(c.norm()), float(g.norm())
        if cn * scale > p["kappa"] * gn:
            scale = p["kappa"] * gn / cn
    if scale != 1.0:
        c.mul_(scale)
    cl = p.get("clip", 0.0)
    if cl > 0:
        b = cl * g.abs()
        c = torch.maximum(torch.minimum(c, b), -b)
    w.add_(g + c, alpha=-lr)


rules.dcasgd_fisher_step = variant


def run_one(model: str, m: int, seed: int):
    ST["M"] = m
    ST["x"] = []
    cfg = SimConfig(
        workers=m,
        mode="dcasgd-s",
        curvature="fisher",
        lam0=12.0,
        staleness_power=0.0,
        clip=0.0,
        lr=0.1,
        batch_size=8,
        hidden=32,
        epochs=20.0,
        seed=seed,
        model=model,
    )
    r = simulate(cfg)
    if P.get("stats") and ST["x"]:
        xs = sorted(ST["x"])
        q = [xs[int(f * (len(xs) - 1))] for f in (0.1, 0.5, 0.9, 0.99, 1.0)]
        print(f"  {model} M={m} s={seed}: lr*lmax*s p10/50/90/99/max " + " ".join(f"{v:.2f}" for v in q), flush=True)
    return r.final_accuracy, r.diverged


def main() -> None:
    torch.set_num_threads(1)
    name, params, model = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    ms = [int(x) for x in sys.argv[4:]] or [32, 64]
    seeds = params.pop("seeds", 3)
    P.update(params)
    t0 = time.time()
    out = []
    for m in ms:
        rs = [run_one(model, m, s) for s in range(seeds)]
        acc = [a for a, _ in rs]
        div = sum(d for _, d in rs)
        sd = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        out.append(
            f"M={m}: {statistics.fmean(acc):.3f}+/-{sd:.3f}"
            + (f" ({div} div)" if div else "")
            + " ["
            + " ".join(f"{a:.3f}" for a in acc)
            + "]"
        )
    line = f"{name:<28} {model} " + "  ".join(out) + f"  ({time.time() - t0:.0f} s)"
    print(line, flush=True)
    with open(__file__.replace("fisher2.py", "fisher2_log.txt"), "a") as f:
        f.write(line + "  " + json.dumps(params) + "\n")


if __name__ == "__main__":
    main()
