"""dcasgd-s with ``curvature="fisher"`` (the compensation's Hessian is the empirical Fisher of the
shard's last K gradients) against an independent float64 model of its formula, through the rule's
reference and fast versions, the shard's update and the shard itself (per shard slice).

The float64 model shares no code with ``dcasgd.rules``: it keeps its own list of past gradients
and builds F as an explicit matrix.
"""

from __future__ import annotations

import pytest
import torch

from dcasgd import kernels, rules
from dcasgd.protocol import Request
from dcasgd.rules import GradientRing, RuleConfig
from dcasgd.shard import ShardConfig, ShardState

pytestmark = pytest.mark.timeout(60)

RTOL, ATOL = 1e-6, 1e-6
LR, MU = 0.05, 0.9


class F64:
    """One shard slice's dcasgd-s fisher rule in float64: weights, momentum, the past gradients."""

    def __init__(self, w, *, rank, lam0, power=0.0, centered=True, clip=0.0, momentum=0.0):
        self.w, self.v = w.double().clone(), torch.zeros(len(w), dtype=torch.float64)
        self.past: list[torch.Tensor] = []
        self.rank, self.lam0, self.power = rank, lam0, power
        self.centered, self.clip, self.mu = centered, clip, momentum

    def step(self, g, w_bak, staleness, lr=LR):
        g, w_bak = g.double(), w_bak.double()
        self.past = (self.past + [g])[-self.rank :]
        lam = self.lam0 * (1 + staleness) ** self.power
        k = len(self.past)
        f = sum(lam / k * torch.outer(x, x) for x in self.past)
        if self.centered:
            mean = sum(self.past) / k
            f = f - (lam - 1) * torch.outer(mean, mean)
        c = f @ (self.w - w_bak)
        if self.clip > 0:
            c = torch.where(c.abs() > self.clip * g.abs(), self.clip * g.abs() * c.sign(), c)
        d = g + c
        if self.mu > 0:
            self.v = self.mu * self.v + d
            d = self.v
        self.w = self.w - lr * d


CASES = [  # (rank, centered, clip, power)
    (1, False, 0.0, 0.0),
    (3, True, 0.0, 0.0),  # the ring wraps after 3 of the 6 steps
    (3, False, 1.0, 0.5),
    (8, True, 2.0, 0.0),  # never full in 6 steps
]


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize(("rank", "centered", "clip", "power"), CASES)
def test_rule_matches_float64_model_over_steps(rank, centered, clip, power, reference, momentum):
    n = 200
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=gen)
    v = torch.zeros(n)
    model = F64(w, rank=rank, lam0=3.0, power=power, centered=centered, clip=clip, momentum=momentum)
    ring = GradientRing(rank, n)
    for step in range(6):
        g = 0.3 * torch.randn(n, generator=gen)
        w_bak = w + 0.05 * torch.randn(n, generator=gen)
        rules.dcasgd_fisher_step(
            w, g, w_bak, ring, lr=LR, staleness=step + 2, lam0=3.0, staleness_power=power, centered=centered,
            clip=clip, momentum=momentum, momentum_buf=v, reference=reference,
        )  # fmt: skip
        model.step(g, w_bak, step + 2)
        torch.testing.assert_close(w.double(), model.w, rtol=RTOL, atol=ATOL)
    assert ring.count == 6


def test_rank_one_with_clip_one_scales_the_gradient():
    """Uncentered rank 1 with clip 1 is a step-size gate: d = g * clamp(1 + lam * g.(w - w_bak), 0, 2)."""
    gen = torch.Generator().manual_seed(1)
    n, lam = 300, 8.0
    for scale in (0.01, -0.01, 0.2, -0.2):  # small gap: the gate inside (0, 2); large: at 0 or 2
        w = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen)
        w_bak = w - scale * g + 0.001 * torch.randn(n, generator=gen)
        expect = w.double() - LR * g.double() * min(max(1 + lam * float(g.double() @ (w - w_bak).double()), 0), 2)
        rules.dcasgd_fisher_step(
            w, g, w_bak, GradientRing(1, n), lr=LR, staleness=5, lam0=lam, centered=False, clip=1.0
        )
        torch.testing.assert_close(w.double(), expect, rtol=RTOL, atol=ATOL)


def test_centering_changes_the_step_and_no_gap_is_plain_sgd():
    gen = torch.Generator().manual_seed(2)
    n = 100
    w0, w_bak = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    out = []
    for centered in (True, False):
        w, ring = w0.clone(), GradientRing(4, n)
        for g in grads:
            rules.dcasgd_fisher_step(w, g, w_bak, ring, lr=LR, staleness=3, lam0=12.0, centered=centered)
        out.append(w)
    assert (out[0] - out[1]).abs().max() > 1e-3
    w, ring = w0.clone(), GradientRing(4, n)
    rules.dcasgd_fisher_step(w, grads[0], w0.clone(), ring, lr=LR, staleness=3)
    torch.testing.assert_close(w, w0 - LR * grads[0], rtol=0, atol=1e-7)  # d = g exactly; one rounding apart


def test_bad_config_and_inputs_are_refused():
    t = torch.zeros(10)
    with pytest.raises(ValueError, match="curvature"):
        RuleConfig(mode="dcasgd-s", curvature="kfac")
    with pytest.raises(ValueError, match="dcasgd-s option"):
        RuleConfig(mode="dcasgd-a", curvature="fisher")
    with pytest.raises(ValueError, match="fisher_rank"):
        RuleConfig(mode="dcasgd-s", curvature="fisher", fisher_rank=0)
    with pytest.raises(ValueError, match="aliases"):
        rules.dcasgd_fisher_step(t, t.clone(), t, GradientRing(2, 10), lr=LR, staleness=1)
    with pytest.raises(ValueError, match="ring rows"):
        GradientRing(2, 10, torch.zeros(3, 10))
    d = RuleConfig(mode="dcasgd-s")  # off by default: dcasgd-s is unchanged
    assert (d.curvature, d.fisher_rank, d.fisher_centered) == ("diag", 128, True)


@pytest.mark.parametrize("momentum", [0.0, MU])
def test_kernel_update_takes_the_fallback_and_matches_reference(momentum):
    n = 500
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(n, generator=gen)
    w_bak, g = w0 + 0.05 * torch.randn(n, generator=gen), 0.3 * torch.randn(n, generator=gen)
    cfg = RuleConfig(mode="dcasgd-s", curvature="fisher", fisher_rank=4, lam0=6.0, clip=0.0, momentum=momentum)
    w, v, snap, ring = w0.clone(), torch.zeros(n), torch.empty(n), GradientRing(4, n)
    fused = kernels.update(
        "dcasgd-s", w, g, config=cfg, lr=LR, w_bak=w_bak, ms=torch.zeros(n), momentum_buf=v, snapshot=snap,
        staleness=7, ring=ring,
    )  # fmt: skip
    assert fused is False and torch.equal(snap, w) and ring.count == 1
    ref, vr = w0.clone(), torch.zeros(n)
    rules.dcasgd_fisher_step(
        ref, g, w_bak, GradientRing(4, n), lr=LR, staleness=7, lam0=6.0, staleness_power=cfg.staleness_power,
        momentum=momentum, momentum_buf=vr, reference=True,
    )  # fmt: skip
    torch.testing.assert_close(w, ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(RuntimeError, match="Fisher"):
        kernels.update("dcasgd-s", w, g, config=cfg, lr=LR, w_bak=w_bak, ms=torch.zeros(n), momentum_buf=v,
                       fused=True, ring=ring)  # fmt: skip
    with pytest.raises(ValueError, match="ring"):
        kernels.update("dcasgd-s", w, g, config=cfg, lr=LR, w_bak=w_bak, ms=torch.zeros(n), momentum_buf=v)


def _req(op: str, worker: int, rid: int, n: int, **kw) -> Request:
    return Request(op=op, rid=rid, worker=worker, fp="fp", n=n, lo=0, hi=n, nbytes=4 * n, **kw)


@pytest.mark.parametrize("shards", [1, 3])
def test_shard_compensates_against_each_workers_backup_per_slice(shards):
    """Two workers; worker 1's third push lands 4 versions stale. Each shard slice keeps its own ring
    (F is block-diagonal by shard), and a resumed shard starts its ring afresh."""
    from dcasgd.layout import shard_ranges

    n, rank = 120, 3
    cfg = RuleConfig(mode="dcasgd-s", lr=LR, curvature="fisher", fisher_rank=rank, lam0=5.0, staleness_power=0.0,
                     clip=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(n, generator=gen)
    grads = [0.5 * torch.randn(n, generator=gen) for _ in range(5)]
    # pushes: (worker, staleness); worker 0 pushes four times, worker 1 once, on w0
    pushes = [(0, 0), (0, 0), (0, 0), (0, 0), (1, 4)]
    got, want = [], []
    for lo, hi in shard_ranges(n, shards):
        size = hi - lo
        model = F64(w0[lo:hi], rank=rank, lam0=5.0)
        st = ShardState(ShardConfig(num_workers=2, rules=cfg))
        st.init(_req("init", 0, 1, size), w0[lo:hi])
        st.pull(0, 2)
        st.pull(1, 1)
        for i, (worker, staleness) in enumerate(pushes):
            if i == 3:  # resume from a checkpoint's state: the ring is not kept
                st = ShardState.from_state(st.config, st.export_state())
                model.past = []
            bak = model.w.clone() if worker == 0 else w0[lo:hi].double()
            (reply,) = st.push(_req("push_pull", worker, 10 + i, size, seq=i + 1), grads[i][lo:hi], 0.0)
            assert reply.fields["staleness"] == staleness
            model.step(grads[i][lo:hi], bak, staleness)
        got.append(st.w.clone())
        want.append(model.w)
    torch.testing.assert_close(torch.cat(got).double(), torch.cat(want), rtol=RTOL, atol=ATOL)


def test_simulator_runs_the_option_and_is_deterministic():
    from dcasgd.sim import SimConfig, simulate

    cfg = SimConfig(workers=8, mode="dcasgd-s", curvature="fisher", fisher_rank=16, lam0=12.0, staleness_power=0.0,
                    clip=0.0, epochs=0.3, batch_size=8)  # fmt: skip
    a, b = simulate(cfg), simulate(cfg)
    assert torch.equal(a.weights, b.weights) and not a.diverged
    plain = simulate(SimConfig(workers=8, mode="dcasgd-s", epochs=0.3, batch_size=8))
    assert not torch.equal(a.weights, plain.weights)
