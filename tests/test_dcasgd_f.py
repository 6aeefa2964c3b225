"""dcasgd-f (the empirical Fisher of the shard's last K gradients, capped so that lr * lambda_max(F)
<= cap) against an independent float64 model of its formula, through the rule's reference and fast
versions, ``kernels.update``, the shard itself (per shard slice) and a resume from a checkpoint.

The float64 model shares no code with ``dcasgd.rules``: it keeps its own list of past gradients,
builds F as an explicit n x n matrix and takes its largest eigenvalue directly (the fast version
goes through the k x k Gram matrix).
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
    """One shard slice's dcasgd-f rule in float64: weights, momentum, the past gradients."""

    def __init__(self, w, *, rank, lam0, cap=1.0, centered=True, momentum=0.0):
        self.w, self.v = w.double().clone(), torch.zeros(len(w), dtype=torch.float64)
        self.past: list[torch.Tensor] = []
        self.rank, self.lam0, self.cap, self.centered, self.mu = rank, lam0, cap, centered, momentum
        self.scales: list[float] = []

    def step(self, g, w_bak, lr=LR):
        g, w_bak = g.double(), w_bak.double()
        self.past = (self.past + [g])[-self.rank :]
        k, lam = len(self.past), self.lam0
        f = sum(lam / k * torch.outer(x, x) for x in self.past)
        if self.centered:
            mean = sum(self.past) / k
            f = f - (lam - 1) * torch.outer(mean, mean)
        top = float(torch.linalg.eigvalsh(f)[-1])
        scale = min(1.0, self.cap / (lr * top)) if self.cap > 0 else 1.0
        self.scales.append(scale)
        d = g + scale * (f @ (self.w - w_bak))
        if self.mu > 0:
            self.v = self.mu * self.v + d
            d = self.v
        self.w = self.w - lr * d


CASES = [  # (rank, centered, cap, grad scale): the cap binds with 0.3 and 1.0, never with 0.01
    (1, False, 1.0, 0.3),
    (3, True, 1.0, 0.3),  # the ring wraps after 3 of the 6 steps
    (3, True, 0.25, 1.0),
    (8, True, 1.0, 0.01),  # never full in 6 steps; lr * tr F under the cap: no eigenvalue problem
    (3, False, 0.0, 0.3),  # no cap
]


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize(("rank", "centered", "cap", "scale"), CASES)
def test_rule_matches_float64_model_over_steps(rank, centered, cap, scale, reference, momentum):
    n = 200
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=gen)
    v = torch.zeros(n)
    model = F64(w, rank=rank, lam0=3.0, cap=cap, centered=centered, momentum=momentum)
    ring = GradientRing(rank, n, gram=True)
    for _ in range(6):
        g = scale * torch.randn(n, generator=gen)
        w_bak = w + 0.05 * torch.randn(n, generator=gen)
        rules.dcasgd_fisher_capped_step(
            w, g, w_bak, ring, lr=LR, lam0=3.0, cap=cap, centered=centered, momentum=momentum, momentum_buf=v,
            reference=reference,
        )  # fmt: skip
        model.step(g, w_bak)
        torch.testing.assert_close(w.double(), model.w, rtol=RTOL, atol=ATOL)
    assert ring.count == 6
    binds = any(s < 1.0 for s in model.scales)
    assert binds == (cap > 0 and scale >= 0.3)  # the cases test what they say


def test_top_eigenvalue_from_the_gram_matrix():
    gen = torch.Generator().manual_seed(3)
    n = 60
    for k, lam, centered in [(1, 12.0, True), (5, 12.0, True), (5, 3.0, False), (7, 1.0, True)]:
        rows = torch.randn(k, n, generator=gen).double()
        f = lam / k * rows.t() @ rows
        if centered:
            m = rows.mean(0)
            f = f - (lam - 1) * torch.outer(m, m)
        want = float(torch.linalg.eigvalsh(f)[-1])
        assert rules.fisher_top_eigenvalue(rows @ rows.t(), lam, centered) == pytest.approx(want, rel=1e-9)
    assert rules.fisher_top_eigenvalue(torch.zeros(0, 0), 12.0) == 0.0
    assert rules.fisher_cap_scale(0.1, 50.0, 1.0) == pytest.approx(0.2)
    assert rules.fisher_cap_scale(0.1, 5.0, 1.0) == 1.0
    assert rules.fisher_cap_scale(0.1, 500.0, 0.0) == 1.0


def test_ring_keeps_its_gram_matrix_across_wraps():
    gen = torch.Generator().manual_seed(4)
    ring = GradientRing(3, 40, gram=True)
    for _ in range(7):
        ring.add(torch.randn(40, generator=gen))
        torch.testing.assert_close(ring.gram, (ring.rows @ ring.rows.t()).double(), rtol=1e-6, atol=1e-5)
    assert GradientRing(3, 40).gram is None


def test_defaults_and_bad_config_are_refused():
    d = RuleConfig(mode="dcasgd-f")
    assert (d.fisher_lam0, d.fisher_cap, d.fisher_rank, d.fisher_centered) == (12.0, 1.0, 128, True)
    base = RuleConfig()  # dcasgd-a's and dcasgd-s's defaults are unchanged
    assert (base.lam0, base.staleness_power, base.clip, base.curvature) == (2.0, 0.5, 1.0, "diag")
    assert "dcasgd-f" in rules.MODES and "dcasgd-f" in rules.DC_MODES
    with pytest.raises(ValueError, match="fisher_lam0"):
        RuleConfig(mode="dcasgd-f", fisher_lam0=-1.0)
    with pytest.raises(ValueError, match="fisher_cap"):
        RuleConfig(mode="dcasgd-f", fisher_cap=float("inf"))
    t = torch.zeros(10)
    with pytest.raises(ValueError, match="Gram"):
        rules.dcasgd_fisher_capped_step(t, t.clone(), t.clone(), GradientRing(2, 10), lr=LR)
    with pytest.raises(ValueError, match="aliases"):
        rules.dcasgd_fisher_capped_step(t, t.clone(), t, GradientRing(2, 10, gram=True), lr=LR)


@pytest.mark.parametrize("momentum", [0.0, MU])
def test_kernel_update_takes_the_fallback_and_matches_reference(momentum):
    n = 500
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(n, generator=gen)
    w_bak, g = w0 + 0.05 * torch.randn(n, generator=gen), 0.3 * torch.randn(n, generator=gen)
    cfg = RuleConfig(mode="dcasgd-f", fisher_rank=4, fisher_lam0=6.0, momentum=momentum)
    w, v, snap, ring = w0.clone(), torch.zeros(n), torch.empty(n), GradientRing(4, n, gram=True)
    fused = kernels.update(
        "dcasgd-f", w, g, config=cfg, lr=LR, w_bak=w_bak, momentum_buf=v, snapshot=snap, staleness=7, ring=ring
    )
    assert fused is False and torch.equal(snap, w) and ring.count == 1
    ref, vr = w0.clone(), torch.zeros(n)
    rules.dcasgd_fisher_capped_step(
        ref, g, w_bak, GradientRing(4, n, gram=True), lr=LR, lam0=6.0, momentum=momentum, momentum_buf=vr,
        reference=True,
    )  # fmt: skip
    torch.testing.assert_close(w, ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(RuntimeError, match="Fisher"):
        kernels.update("dcasgd-f", w, g, config=cfg, lr=LR, w_bak=w_bak, momentum_buf=v, fused=True, ring=ring)
    with pytest.raises(ValueError, match="ring"):
        kernels.update("dcasgd-f", w, g, config=cfg, lr=LR, w_bak=w_bak, momentum_buf=v)


def test_prepare_compiles_nothing_for_the_mode():
    """dcasgd-f has no fused kernel: preparing a shard of it must not disable the kernel for the others."""
    assert kernels.prepare("dcasgd-f", wait=True) is None
    assert kernels._failed is None or "dcasgd-f" not in kernels._failed


def _req(op: str, worker: int, rid: int, n: int, **kw) -> Request:
    return Request(op=op, rid=rid, worker=worker, fp="fp", n=n, lo=0, hi=n, nbytes=4 * n, **kw)


@pytest.mark.parametrize("shards", [1, 3])
def test_shard_compensates_per_slice_and_resumes_with_a_fresh_ring(shards):
    """Two workers; worker 1's push lands 4 versions stale. Each shard slice keeps its own ring and
    Gram matrix (F and its cap are per slice), and a shard resumed from its checkpoint state starts
    its ring afresh."""
    from dcasgd.layout import shard_ranges

    n, rank = 120, 3
    cfg = RuleConfig(mode="dcasgd-f", lr=LR, fisher_rank=rank, fisher_lam0=5.0)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(n, generator=gen)
    grads = [0.5 * torch.randn(n, generator=gen) for _ in range(5)]
    pushes = [(0, 0), (0, 0), (0, 0), (0, 0), (1, 4)]  # (worker, staleness); worker 1 pushes on w0
    got, want, scales = [], [], []
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
            model.step(grads[i][lo:hi], bak)
        got.append(st.w.clone())
        want.append(model.w)
        scales += model.scales
    torch.testing.assert_close(torch.cat(got).double(), torch.cat(want), rtol=RTOL, atol=ATOL)
    assert min(scales) < 1.0  # the cap was exercised


def test_checkpoint_save_and_load_resume_the_mode_with_an_empty_ring(tmp_path):
    """A dcasgd-f shard written by ``checkpoint.save`` and read back by ``checkpoint.load`` keeps its
    weights and backups; its ring (and Gram matrix) start empty, and the next push matches a model
    whose past gradients were dropped at the same point. The file records the mode's settings."""
    from dcasgd import checkpoint

    n, rank = 64, 3
    cfg = ShardConfig(num_workers=2, rules=RuleConfig(mode="dcasgd-f", lr=LR, fisher_rank=rank, fisher_lam0=5.0))
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(n, generator=gen)
    grads = [0.5 * torch.randn(n, generator=gen) for _ in range(4)]
    model = F64(w0, rank=rank, lam0=5.0)
    st = ShardState(cfg)
    st.init(_req("init", 0, 1, n), w0)
    st.pull(0, 2)
    st.pull(1, 1)
    for i, (worker, g) in enumerate(zip([0, 0, 0, 1], grads, strict=True)):
        if i == 3:
            path = checkpoint.save(st, tmp_path)
            assert checkpoint.read_header(path)["identity"]["rules"]["fisher_lam0"] == 5.0
            st = checkpoint.load(tmp_path, cfg)
            assert st._ring.count == 0 and float(st._ring.gram.abs().sum()) == 0.0
            model.past = []
        bak = model.w.clone() if worker == 0 else w0.double()
        st.push(_req("push_pull", worker, 10 + i, n, seq=i + 1), g, 0.0)
        model.step(g, bak)
    torch.testing.assert_close(st.w.double(), model.w, rtol=RTOL, atol=ATOL)


def test_simulator_runs_the_mode_and_is_deterministic():
    from dcasgd.sim import SimConfig, simulate

    cfg = SimConfig(workers=8, mode="dcasgd-f", fisher_rank=16, epochs=0.3, batch_size=8)
    a, b = simulate(cfg), simulate(cfg)
    assert torch.equal(a.weights, b.weights) and not a.diverged
    tight = simulate(SimConfig(workers=8, mode="dcasgd-f", fisher_rank=16, fisher_cap=0.02, epochs=0.3, batch_size=8))
    assert not torch.equal(a.weights, tight.weights)


def test_command_line_flags_make_the_rule_and_launch_passes_them_on():
    from dcasgd import cli

    given = ["--fisher-lam0", "8", "--fisher-cap", "0.5", "--fisher-rank", "64"]
    parser = cli.build_parser()
    a = parser.parse_args(["server", "--num-workers", "2", "--mode", "dcasgd-f", *given])
    assert cli.rule_config(a) == RuleConfig(mode="dcasgd-f", fisher_lam0=8.0, fisher_cap=0.5, fisher_rank=64)
    defaults = cli.rule_config(parser.parse_args(["server", "--num-workers", "2", "--mode", "dcasgd-f"]))
    assert defaults == RuleConfig(mode="dcasgd-f")
    server_args = cli.launch_server_args(parser.parse_args(["launch", "--mode", "dcasgd-f", *given, "--", "true"]))
    server = parser.parse_args(["server", "--num-workers", "1", "--mode", "dcasgd-f", *server_args])
    assert (server.fisher_lam0, server.fisher_cap, server.fisher_rank) == (8.0, 0.5, 64)


def test_overlapped_pushes_are_compensated_against_the_version_they_name():
    """With overlap (keep=2) a worker computes on the reply before last: each push names that version
    (``base``) and dcasgd-f compensates against exactly those weights, as the other DC modes do."""
    n, rank = 40, 3
    cfg = RuleConfig(mode="dcasgd-f", lr=LR, fisher_rank=rank, fisher_lam0=5.0)
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(n, generator=gen)
    grads = [0.5 * torch.randn(n, generator=gen) for _ in range(4)]
    model = F64(w0, rank=rank, lam0=5.0)
    st = ShardState(ShardConfig(num_workers=1, rules=cfg))
    st.init(_req("init", 0, 1, n), w0)
    st.pull(0, 2, keep=2)
    held = {0: w0.double().clone()}  # version -> the weights the shard sent then
    for i, g in enumerate(grads):
        base = max(0, i - 1)  # step i's gradient was computed on the reply of push i - 1 (version i - 1)
        req = _req("push_pull", 0, 10 + i, n, seq=i + 1, base=base, keep=2)
        (reply,) = st.push(req, g, 0.0)
        model.step(g, held[base])
        held[reply.fields["version"]] = model.w.clone()
        assert reply.fields["staleness"] == i - base
    torch.testing.assert_close(st.w.double(), model.w, rtol=RTOL, atol=ATOL)
