"""dcasgd-s (DC-ASGD-a whose lambda_0 follows the push's staleness, with an optional clip of the
compensation term) against an independent float64 model of its formula, through the rule's
reference and fast versions, the shard's update (fused kernel and fallback) and the shard itself.

The float64 model shares no code with ``dcasgd.rules``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dcasgd import MODES, kernels, rules
from dcasgd.protocol import Request
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

pytestmark = pytest.mark.timeout(60)

RTOL, ATOL = 1e-5, 1e-6
LR, MU = 0.05, 0.9


def f64_step(w, g, w_bak, ms, v, *, staleness, lam0, power, clip, m=0.95, eps=1e-7, momentum=0.0, lr=LR):
    """One dcasgd-s step in float64 on (w, ms, v), in place; written from the formula in the README."""
    ms.mul_(m).add_((1 - m) * g * g)
    lam = lam0 * (1 + staleness) ** power / (ms + eps).sqrt()
    c = lam * g * g * (w - w_bak)
    if clip > 0:
        c = torch.where(c.abs() > clip * g.abs(), clip * g.abs() * c.sign(), c)
    d = g + c
    if momentum > 0:
        v.mul_(momentum).add_(d)
        d = v
    w.sub_(lr * d)


def data(n: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    return {
        "w": w,
        "g": torch.randn(n, generator=gen),
        "w_bak": w + 0.5 * torch.randn(n, generator=gen),  # a large gap: the clip binds on many elements
        "ms": torch.rand(n, generator=gen),
        "v": torch.randn(n, generator=gen),
    }


CASES = [  # (staleness, power, clip)
    (0, 0.5, 0.0),
    (5, 0.5, 0.0),
    (31, 0.5, 2.0),
    (63, 0.0, 1.0),
    (7, 1.0, 4.0),
]


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize(("staleness", "power", "clip"), CASES)
def test_rule_matches_float64_model_over_steps(staleness, power, clip, reference, momentum):
    t = data(1000)
    w, ms, v = t["w"].clone(), t["ms"].clone(), t["v"].clone()
    w64, ms64, v64 = t["w"].double(), t["ms"].double(), t["v"].double()
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        g = torch.randn(1000, generator=gen)
        w_bak = w + 0.3 * torch.randn(1000, generator=gen)
        s = staleness + step
        rules.dcasgd_staleness_step(
            w, g, w_bak, ms, lr=LR, staleness=s, lam0=3.0, staleness_power=power, clip=clip,
            momentum=momentum, momentum_buf=v, reference=reference,
        )  # fmt: skip
        f64_step(w64, g.double(), w_bak.double(), ms64, v64, staleness=s, lam0=3.0, power=power, clip=clip,
                 momentum=momentum)  # fmt: skip
    torch.testing.assert_close(w.double(), w64, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ms.double(), ms64, rtol=RTOL, atol=ATOL)


def test_clip_binds_and_changes_the_step():
    t = data(1000)
    out = []
    for clip in (0.0, 1.0):
        w, ms = t["w"].clone(), t["ms"].clone()
        rules.dcasgd_staleness_step(w, t["g"], t["w_bak"], ms, lr=LR, staleness=31, lam0=4.0, clip=clip)
        out.append(w)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_staleness_zero_is_dcasgd_a():
    t = data(1000)
    a_w, a_ms = t["w"].clone(), t["ms"].clone()
    s_w, s_ms = t["w"].clone(), t["ms"].clone()
    rules.dcasgd_adaptive_step(a_w, t["g"], t["w_bak"], a_ms, lr=LR, lam0=3.0)
    rules.dcasgd_staleness_step(
        s_w, t["g"], t["w_bak"], s_ms, lr=LR, staleness=0, lam0=3.0, staleness_power=0.5, clip=0.0
    )
    assert torch.equal(a_w, s_w) and torch.equal(a_ms, s_ms)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("alias", [lambda w: w, lambda w: w[:], lambda w: w.view(-1)], ids=["same", "slice", "view"])
def test_backup_aliasing_w_is_refused(alias, reference):
    t = data(10)
    with pytest.raises(ValueError, match="aliases"):
        rules.dcasgd_staleness_step(t["w"], t["g"], alias(t["w"]), t["ms"], lr=LR, staleness=3, reference=reference)


def test_negative_staleness_and_bad_config_are_refused():
    t = data(10)
    with pytest.raises(ValueError, match="staleness"):
        rules.dcasgd_staleness_step(t["w"], t["g"], t["w_bak"], t["ms"], lr=LR, staleness=-1)
    with pytest.raises(ValueError, match="staleness_power"):
        RuleConfig(mode="dcasgd-s", staleness_power=-0.5)
    with pytest.raises(ValueError, match="clip"):
        RuleConfig(mode="dcasgd-s", clip=float("nan"))


def test_mode_is_listed_and_defaults_are_pinned():
    assert "dcasgd-s" in MODES
    d = RuleConfig(mode="dcasgd-s")
    # The defaults of the candidate study (docs/benchmarks.md, "32 and 64 workers: candidate rules").
    assert (d.lam0, d.staleness_power, d.clip, d.ms_decay) == (2.0, 0.5, 1.0, 0.95)


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("clip", [0.0, 2.0])
def test_kernel_update_matches_reference(clip, momentum):
    """kernels.update (the fused kernel, with or without the clip, and the fallback) against the rule's reference."""
    pytest.importorskip("numba")
    t = data(kernels.CHUNK + 7)
    cfg = RuleConfig(mode="dcasgd-s", lam0=3.0, clip=clip, momentum=momentum)
    outs = {}
    paths = ["fallback", "reference", "fused"]
    for path in paths:
        w, ms, v = t["w"].clone(), t["ms"].clone(), t["v"].clone()
        snap = torch.empty_like(w)
        if path == "reference":
            rules.dcasgd_staleness_step(
                w, t["g"], t["w_bak"], ms, lr=LR, staleness=31, lam0=3.0, clip=clip, momentum=momentum,
                momentum_buf=v, reference=True,
            )  # fmt: skip
            snap.copy_(w)
        else:
            fused = kernels.update(
                "dcasgd-s", w, t["g"], config=cfg, lr=LR, w_bak=t["w_bak"], ms=ms, momentum_buf=v,
                snapshot=snap, fused=path == "fused", staleness=31,
            )  # fmt: skip
            assert fused == (path == "fused")
        outs[path] = (w, ms, v, snap)
    for path in paths[1:]:
        for a, b in zip(outs["fallback"], outs[path], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _req(op: str, worker: int, rid: int, n: int, **kw) -> Request:
    return Request(op=op, rid=rid, worker=worker, fp="fp", n=n, lo=0, hi=n, nbytes=4 * n, **kw)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("momentum", [0.0, MU])
def test_shard_applies_the_push_staleness(momentum, shards):
    """Two workers; worker 1's gradient is 2 versions stale when it lands: the shard's rule uses staleness 2
    against worker 1's own backup, on every shard of a split vector, and a checkpoint round trip keeps ms."""
    from dcasgd.layout import shard_ranges

    n = 300
    cfg = RuleConfig(mode="dcasgd-s", lr=LR, lam0=3.0, clip=2.0, momentum=momentum)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    w64, ms64, v64 = w0.double(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    # worker 0 pushes twice (staleness 0, then 0), then worker 1 pushes (computed on w0: staleness 2)
    bak1 = w0.double()
    for g, s, bak in ((grads[0], 0, w64.clone()), (grads[1], 0, None), (grads[2], 2, bak1)):
        f64_step(w64, g.double(), w64.clone() if bak is None else bak, ms64, v64, staleness=s, lam0=3.0, power=0.5,
                 clip=2.0, momentum=momentum)  # fmt: skip
    got = []
    for lo, hi in shard_ranges(n, shards):
        size = hi - lo
        st = ShardState(ShardConfig(shard=0, num_shards=1, num_workers=2, rules=cfg))
        st.init(_req("init", 0, 1, size), w0[lo:hi])
        st.pull(0, 2)
        st.pull(1, 1)
        st.push(_req("push_pull", 0, 3, size, seq=1), grads[0][lo:hi], 0.0)
        st.push(_req("push_pull", 0, 4, size, seq=2), grads[1][lo:hi], 0.0)
        st = ShardState.from_state(st.config, st.export_state())  # resume from a checkpoint's state
        (reply,) = st.push(_req("push_pull", 1, 2, size, seq=1), grads[2][lo:hi], 0.0)
        assert reply.fields["staleness"] == 2
        got.append(st.w.clone())
    torch.testing.assert_close(torch.cat(got).double(), w64, rtol=RTOL, atol=ATOL)
