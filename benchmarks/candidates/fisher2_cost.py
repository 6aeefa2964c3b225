"""Scratch: time of one push (1M floats, full ring of K = 128, one thread) for dcasgd-f against the
uncapped Fisher option of dcasgd-s and dcasgd-s's diagonal rule (torch fallback). Median of 10."""

import statistics
import time

import torch

from dcasgd import rules

torch.set_num_threads(1)
n, k = 1 << 20, 128
gen = torch.Generator().manual_seed(0)
w, w_bak, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
scratch = [torch.empty(n), torch.empty(n)]


def timed(step, reps=10):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


ring_f = rules.GradientRing(k, n, torch.randn(k, n, generator=gen), count=k, gram=True)
ring_s = rules.GradientRing(k, n, ring_f.rows.clone(), count=k)
ms = torch.rand(n)
r = {
    "dcasgd-f (cap binds: eigenvalue problem each push)": timed(
        lambda: rules.dcasgd_fisher_capped_step(w, g, w_bak, ring_f, lr=0.1, scratch=scratch)
    ),
    "dcasgd-s fisher (uncapped, K 128)": timed(
        lambda: rules.dcasgd_fisher_step(w, g, w_bak, ring_s, lr=0.1, staleness=31, scratch=scratch)
    ),
    "dcasgd-s diag (defaults, torch fallback)": timed(
        lambda: rules.dcasgd_staleness_step(w, g, w_bak, ms, lr=0.1, staleness=31, scratch=scratch)
    ),
}
gram = ring_f.gram.clone()
r["k x k eigenvalue problem alone"] = timed(lambda: rules.fisher_top_eigenvalue(gram, 12.0))
for name, ms_ in r.items():
    print(f"{name:<55} {ms_:8.1f} ms")
