"""Scratch: prototype candidate rules for issue 13 inside the real ShardState (not shipped).

Monkeypatches ``kernels.update`` for mode dcasgd-s with a parametrised Python rule and
``ShardState._record`` to learn the pushing worker. One shard, so one rule state per run.
Usage: python benchmarks/candidates/proto.py NAME '{"json": "params"}' [M ...]   (prints one line per M)
"""

from __future__ import annotations

import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from dcasgd import kernels, shard
from dcasgd.sim import SimConfig, simulate

P: dict = {}
ST: dict = {}

_orig_update = kernels.update
_orig_record = shard.ShardState._record


def _record(self, worker, seq, base=None):
    ST["worker"] = worker
    ST["M"] = self.config.num_workers
    return _orig_record(self, worker, seq, base)


def rule(w, g, w_bak, lr, staleness, snapshot):
    p = P
    n = w.numel()
    M = ST["M"]
    k = ST["worker"]
    if "ms" not in ST:
        ST["ms"] = torch.zeros(n)
        ST["msw"] = torch.zeros(M, n)
        ST["v"] = torch.zeros(n)
        ST["u"] = torch.zeros(n)
        ST["step"] = torch.zeros(n)  # EMA of |update| per element
        ST["s_ema"] = 0.0
        ST["pg"] = None
        ST["pw"] = None
        ST["num"] = torch.zeros(n)
        ST["den"] = torch.zeros(n)
        ST["t"] = 0
    ST["t"] += 1
    md = p.get("ms_decay", 0.95)
    gg = g * g
    if p.get("ms_per_worker"):
        msw = ST["msw"][k]
        if ST.get("seen_" + str(k)) is None:
            msw.copy_(gg)
            ST["seen_" + str(k)] = 1
        else:
            msw.mul_(md).add_(gg, alpha=1 - md)
        ms = msw
    else:
        ST["ms"].mul_(md).add_(gg, alpha=1 - md)
        ms = ST["ms"]
    s = staleness
    ST["s_ema"] = 0.9 * ST["s_ema"] + 0.1 * s if ST["t"] > 1 else float(s)
    lam_s = p.get("lam0", 2.0) * (1.0 + s) ** p.get("power", 0.5)
    delta = w - w_bak
    comp = p.get("comp", "diag")
    if comp == "diag":
        c = lam_s / torch.sqrt(ms + 1e-7) * gg * delta
    elif comp == "diagc":  # DC-ASGD-c style constant lambda
        c = lam_s * gg * delta
    elif comp == "rank1":  # lam * g (g . delta) / sqrt(sum ms)
        c = lam_s * g * torch.dot(g, delta) / torch.sqrt(ms.sum() + 1e-7)
    elif comp == "rank1c":
        c = lam_s * g * torch.dot(g, delta)
    elif comp == "secant":
        # diagonal secant from successive pushes: h = EMA(dg*dw)/EMA(dw*dw), clamped >= 0
        if ST["pg"] is not None:
            dg = g - ST["pg"]
            dw = w_bak - ST["pw"]
            b = p.get("sec_decay", 0.99)
            ST["num"].mul_(b).add_(dg * dw, alpha=1 - b)
            ST["den"].mul_(b).add_(dw * dw, alpha=1 - b)
        ST["pg"] = g.clone()
        ST["pw"] = w_bak.clone()
        h = (ST["num"] / (ST["den"] + 1e-12)).clamp_(min=0.0, max=p.get("hmax", 1e9))
        c = p.get("lam0", 1.0) * h * delta
    elif comp == "gate":  # d = g * clamp(1 + lam * g.delta, lo, hi) (+ optional diag DC after)
        r = 1.0 + lam_s * torch.dot(g, delta).item()
        r = min(max(r, p.get("lo", 0.0)), p.get("hi", 2.0))
        ST.setdefault("rs", []).append(r)
        if p.get("gate_dc"):
            lam2 = p["gate_dc"] * (1.0 + s) ** 0.5
            c2 = lam2 / torch.sqrt(ms + 1e-7) * gg * delta
            bound = g.abs()
            c2 = torch.maximum(torch.minimum(c2, bound), -bound)
            c = (r - 1.0) * g + c2
        else:
            c = (r - 1.0) * g
    elif comp == "gate_layer":  # per-tensor gate: block-diagonal rank-1
        c = torch.empty_like(g)
        for lo_, hi_ in ((0, 2048), (2048, 2080), (2080, 2400), (2400, 2410)):
            gs, ds = g[lo_:hi_], delta[lo_:hi_]
            r = 1.0 + lam_s * torch.dot(gs, ds).item()
            r = min(max(r, p.get("lo", 0.0)), p.get("hi", 2.0))
            c[lo_:hi_] = (r - 1.0) * gs
    elif comp == "rankK":  # c = lam/K * sum_j g_j (g_j . delta) over the last K pushed gradients
        K = p["K"]
        if "hist" not in ST:
            ST["hist"] = torch.zeros(K, n)
            ST["hn"] = 0
        ST["hist"][ST["hn"] % K] = g
        ST["hn"] += 1
        H = ST["hist"][: min(ST["hn"], K)]
        coef = H @ delta
        c = lam_s / H.shape[0] * (coef @ H)
        if p.get("centered"):
            mvec = H.mean(0)
            c = c - (lam_s - 1.0) * mvec * torch.dot(mvec, delta)
        if p.get("gate_first"):
            r = min(max(1.0 + lam_s * torch.dot(g, delta).item(), 0.0), 2.0)
            c = c + 0.0
            g = g * r
    elif comp == "diagms":  # c = lam * ms * delta (mean square as the Fisher diagonal)
        c = lam_s * ms * delta
    elif comp == "none":
        c = torch.zeros_like(g)
    else:
        raise ValueError(comp)
    clip = p.get("clip", 1.0)
    if p.get("trust"):  # gap-trust: scale c by 1 / (1 + gap / (trust * typical step))
        gap = delta.abs() / (ST["step"] * max(ST["s_ema"], 1.0) * p["trust"] + 1e-12)
        c = c / (1.0 + gap)
    if clip > 0:
        bound = clip * g.abs()
        c = torch.maximum(torch.minimum(c, bound), -bound)
    d = g + c
    if p.get("gap_aware"):  # Barkai: divide by max(1, |delta| / (typical per-update step))
        ga = delta.abs() / (ST["step"] * p["gap_aware"] + 1e-12)
        d = d / torch.clamp(ga, min=1.0)
    lr_eff = lr
    if p.get("lr_power"):
        lr_eff = lr / (1.0 + s) ** p["lr_power"]
    mu = p.get("momentum", 0.0)
    w_old = w.clone()
    if mu != 0.0:
        ST["v"].mul_(mu).add_(d)
        w.add_(ST["v"], alpha=-lr_eff)
    else:
        w.add_(d, alpha=-lr_eff)
    dw_applied = w - w_old
    sd = p.get("step_decay", 0.99)
    if ST["t"] == 1:
        ST["step"].copy_(dw_applied.abs())
    else:
        ST["step"].mul_(sd).add_(dw_applied.abs(), alpha=1 - sd)
    la = p.get("lookahead", 0.0)
    if snapshot is not None:
        if la:
            tau = float(M - 1) if p.get("la_known") else ST["s_ema"]
            beta = p.get("la_beta", None)
            if beta is None:
                beta = 1.0 - 1.0 / max(tau, 1.0)
            ST["u"].mul_(beta).add_(dw_applied, alpha=1 - beta)
            snapshot.copy_(w + la * tau * ST["u"])
        else:
            snapshot.copy_(w)


def _update(
    mode,
    w,
    g,
    *,
    config,
    lr,
    w_bak=None,
    ms=None,
    momentum_buf=None,
    count=1,
    snapshot=None,
    scratch=None,
    g32=None,
    fused=None,
    staleness=0,
):
    if mode != "dcasgd-s":
        return _orig_update(
            mode,
            w,
            g,
            config=config,
            lr=lr,
            w_bak=w_bak,
            ms=ms,
            momentum_buf=momentum_buf,
            count=count,
            snapshot=snapshot,
            scratch=scratch,
            g32=g32,
            fused=fused,
            staleness=staleness,
        )
    rule(w, g, w_bak, lr, staleness, snapshot)
    return False


def run_one(args):
    params, m, seed = args
    torch.set_num_threads(1)
    kernels.update = _update
    shard.kernels.update = _update
    shard.ShardState._record = _record
    P.clear()
    P.update(params)
    ST.clear()
    mode = params.get("mode", "dcasgd-s")
    fields = {
        k: params[k] for k in ("lam0", "clip", "staleness_power", "momentum") if k in params and mode != "dcasgd-s"
    }
    cfg = SimConfig(
        workers=m, mode=mode, lr=params.get("lr", 0.1), batch_size=8, hidden=32, epochs=20.0, seed=seed, **fields
    )
    r = simulate(cfg)
    rs = ST.get("rs")
    if rs and params.get("show_r"):
        z = sum(x == 0.0 for x in rs) / len(rs)
        two = sum(x == 2.0 for x in rs) / len(rs)
        print(f"M={m} seed={seed}: mean r {sum(rs) / len(rs):.3f}, zero {z:.3f}, at 2 {two:.3f}", flush=True)
    return r.final_accuracy, r.diverged


def main():
    name, params = sys.argv[1], json.loads(sys.argv[2])
    ms = [int(x) for x in sys.argv[3:]] or [32, 64]
    seeds = params.pop("seeds", 3)
    jobs = [(params, m, s) for m in ms for s in range(seeds)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        res = list(pool.map(run_one, jobs))
    out = []
    for i, m in enumerate(ms):
        rs = res[i * seeds : (i + 1) * seeds]
        acc = [a for a, _ in rs]
        div = sum(d for _, d in rs)
        out.append(
            f"M={m}: {statistics.fmean(acc):.3f}+/-{statistics.pstdev(acc):.3f}"
            + (f" ({div} div)" if div else "")
            + " ["
            + " ".join(f"{a:.3f}" for a in acc)
            + "]"
        )
    line = f"{name:<40} " + "  ".join(out)
    print(line, flush=True)
    with open("/work/wt-rule13b/benchmarks/candidates/log.txt", "a") as f:
        f.write(line + "  " + json.dumps(params) + "\n")


if __name__ == "__main__":
    main()
