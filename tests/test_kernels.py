"""The fused update (dcasgd.kernels) against the torch fallback and the rules' reference.

Every mode, momentum on and off, float32 and half-size gradients and backups, lengths that leave
a partial last chunk; the snapshot written in the same pass is bit for bit ``w.to(wire type)``;
the cheap non-finite check; the shard's push path on either path. The kernels compile once per
signature and numba keeps them on disk (beside dcasgd/kernels.py), so a second session is fast.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ShardDriver
from torch import Tensor

from dcasgd import kernels, rules
from dcasgd.protocol import ProtocolError
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState, Snapshot

pytest.importorskip("numba")
pytestmark = pytest.mark.timeout(120)

RTOL, ATOL = 1e-6, 1e-6  # float32 paths against each other; |w| ~ 1, so ATOL is rel 1e-6 of the scale
MODES = ["async", "dcasgd", "dcasgd-a", "dcasgd-s", "sync"]
HALF = [torch.bfloat16, torch.float16]
N = kernels.CHUNK + 7  # one full chunk and a partial one
LR, MU, COUNT = 0.05, 0.9, 3
STALENESS = 31  # dcasgd-s: the push's staleness (its lambda_0 is lam0 * sqrt(32); the clip binds on many elements)


def tensors(n: int, wire: torch.dtype, mode: str, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * (COUNT if mode == "sync" else 1)
    return {
        "w": w,
        "g": g if mode == "sync" else g.to(wire),  # sync: the round's float32 sum
        "w_bak": (w + 0.05 * torch.randn(n, generator=gen)).to(wire),
        "ms": torch.rand(n, generator=gen),
        "v": torch.randn(n, generator=gen),
    }


def run(path: str, mode: str, t: dict[str, Tensor], momentum: float, wire: torch.dtype | None, clip: float = 1.0):
    """One update on copies of ``t`` by ``path`` (fused, fallback, reference); returns the new tensors.
    ``clip``: dcasgd-s's (its default, 1, unless given)."""
    w, g, ms, v = (t[k].clone() for k in ("w", "g", "ms", "v"))
    cfg = RuleConfig(mode=mode, momentum=momentum, clip=clip)
    snap = torch.empty(w.shape, dtype=wire) if wire is not None else None
    if path == "reference":
        g32, w_bak = g.float(), t["w_bak"].float()
        if mode == "async":
            rules.asgd_step(w, g32, lr=LR, momentum=momentum, momentum_buf=v, reference=True)
        elif mode == "dcasgd":
            rules.dcasgd_step(w, g32, w_bak, lr=LR, momentum=momentum, momentum_buf=v, reference=True)
        elif mode == "dcasgd-a":
            rules.dcasgd_adaptive_step(w, g32, w_bak, ms, lr=LR, momentum=momentum, momentum_buf=v, reference=True)
        elif mode == "dcasgd-s":
            rules.dcasgd_staleness_step(w, g32, w_bak, ms, lr=LR, staleness=STALENESS, clip=clip, momentum=momentum,
                                        momentum_buf=v, reference=True)  # fmt: skip
        else:
            rules.ssgd_step(w, g, COUNT, lr=LR, momentum=momentum, momentum_buf=v, reference=True)
            g.zero_()
        if snap is not None:
            snap.copy_(w)
    else:
        fused = kernels.update(
            mode, w, g, config=cfg, lr=LR, w_bak=t["w_bak"], ms=ms, momentum_buf=v, count=COUNT,
            snapshot=snap, fused=path == "fused", staleness=STALENESS,
        )  # fmt: skip
        assert fused == (path == "fused")
    return {"w": w, "g": g, "ms": ms, "v": v, "snap": snap}


def assert_agree(mode: str, t: dict[str, Tensor], momentum: float, wire: torch.dtype | None, clip: float = 1.0) -> None:
    out = {p: run(p, mode, t, momentum, wire, clip) for p in ("fused", "fallback", "reference")}
    for name in ("w", "ms", "v", "g"):
        for other in ("fallback", "reference"):
            what = f"{name} vs {other}"
            torch.testing.assert_close(
                out["fused"][name], out[other][name], rtol=RTOL, atol=ATOL, msg=lambda m, what=what: f"{what}: {m}"
            )
    if mode in ("async", "sync"):  # the same operations, rounded the same way (one fma for w)
        for name in ("w", "v", "g"):
            assert torch.equal(out["fused"][name], out["fallback"][name]), name
    if wire is not None:  # the snapshot is the new w rounded to the wire type, bit for bit
        fused = out["fused"]
        assert fused["snap"].dtype == wire
        assert torch.equal(fused["snap"].view(torch.int16 if wire != torch.float32 else torch.int32),
                           fused["w"].to(wire).view(torch.int16 if wire != torch.float32 else torch.int32))  # fmt: skip


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("mode", MODES)
def test_fused_fallback_and_reference_agree_float32(mode, momentum):
    t = tensors(N, torch.float32, mode)
    assert_agree(mode, t, momentum, torch.float32)  # with the reply's snapshot
    if momentum > 0.0:
        assert_agree(mode, t, momentum, None)  # without (a push, not a push_pull)


@pytest.mark.parametrize("wire", HALF, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fused_reads_half_size_gradients_and_backups_and_writes_half_snapshots(mode, wire):
    assert_agree(mode, tensors(N, wire, mode), MU, wire)


@pytest.mark.parametrize("mode", ["dcasgd-a", "dcasgd-s"])
@pytest.mark.parametrize("n", [0, 1, 7, 1_000_003])
def test_lengths_that_leave_a_partial_last_chunk(n, mode):
    assert_agree(mode, tensors(n, torch.bfloat16, mode, seed=n), MU, torch.bfloat16)


@pytest.mark.parametrize("momentum", [0.0, MU])
@pytest.mark.parametrize("clip", [0.0, 0.25, 1.0, 4.0])
def test_dcasgd_s_clip_in_the_fused_pass(clip, momentum):
    """The clip (0: none) in the kernel's one pass, against the fallback and the reference; the data
    are such that the clip binds on some elements and not on others, so both branches are checked."""
    t = tensors(N, torch.float32, "dcasgd-s")
    lam_s = rules.staleness_lam0(RuleConfig().lam0, STALENESS, RuleConfig().staleness_power)
    ms = 0.95 * t["ms"] + 0.05 * t["g"] * t["g"]
    c = lam_s / (ms + 1e-7).sqrt() * t["g"] * t["g"] * (t["w"] - t["w_bak"])
    if clip > 0:
        binds = (c.abs() > clip * t["g"].abs()).float().mean().item()
        assert 0.002 < binds < 0.95, binds  # some hundreds of elements either way
    assert_agree("dcasgd-s", t, momentum, torch.float32, clip=clip)
    assert_agree("dcasgd-s", t, momentum, None, clip=clip)


def test_a_float32_backup_with_a_half_size_gradient():
    """The per-parameter ablation: its backup is float32 whatever the wire."""
    t = tensors(N, torch.bfloat16, "dcasgd")
    t["w_bak"] = t["w_bak"].float() + 1e-3
    assert_agree("dcasgd", t, MU, torch.bfloat16)


@pytest.mark.parametrize("wire", HALF, ids=str)
def test_half_conversions_are_exact_over_the_whole_range(wire):
    """Decoding every finite 16-bit pattern and rounding float32 values of every scale (subnormals,
    ties, overflow to Inf) give what torch gives, bit for bit: ``w - 1*g`` is one rounding (the
    momentum buffer starts at zero, so ``v = g`` exactly)."""
    cfg = RuleConfig(momentum=MU)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    g = bits.view(wire)
    g = g[torch.isfinite(g.float())]
    w, v, snap = torch.zeros(g.numel()), torch.zeros(g.numel()), torch.empty(g.numel(), dtype=wire)
    kernels.update("async", w, g, config=cfg, lr=1.0, momentum_buf=v, snapshot=snap, fused=True)
    assert torch.equal(w, -g.float())
    gen = torch.Generator().manual_seed(1)
    scales = torch.logspace(-45, 38, 4000, dtype=torch.float64).float()
    x = torch.cat([scales * torch.randn(4000, generator=gen).sign(), torch.rand(4000, generator=gen) * 70000])
    x = torch.cat([x, g.float() + torch.finfo(torch.float32).eps * g.float()])  # next to 16-bit values
    w, v, snap = x.clone(), torch.zeros(x.numel()), torch.empty(x.numel(), dtype=wire)
    g = torch.zeros(x.numel(), dtype=wire)
    kernels.update("async", w, g, config=cfg, lr=1.0, momentum_buf=v, snapshot=snap, fused=True)
    assert torch.equal(snap.view(torch.int16), x.to(wire).view(torch.int16))


def test_aliasing_is_refused_on_both_paths():
    w = torch.randn(10)
    for fused in (True, False):
        for mode in ("dcasgd", "dcasgd-a", "dcasgd-s"):
            with pytest.raises(ValueError, match="aliases w"):
                kernels.update(mode, w, torch.randn(10), config=RuleConfig(mode=mode), lr=LR, w_bak=w,
                               ms=torch.zeros(10), fused=fused)  # fmt: skip
        with pytest.raises(ValueError, match="snapshot buffer aliases"):
            kernels.update("async", w, torch.randn(10), config=RuleConfig(), lr=LR, snapshot=w, fused=fused)


def test_the_cheap_finite_check_is_exact():
    g = torch.randn(100_003)
    assert kernels.finite(g) and kernels.finite(torch.empty(0))
    for bad in (float("inf"), float("-inf"), float("nan")):
        h = g.clone()
        h[77_777] = bad
        assert not kernels.finite(h)
        assert not kernels.finite(h.to(torch.bfloat16))
    huge = torch.full((1000,), 3e38)
    assert not torch.isfinite(huge.sum()), "a sum would overflow here"
    assert kernels.finite(huge), "the min/max check has no sum to overflow"
    assert kernels.finite(torch.full((1000,), 60000.0, dtype=torch.float16))
    assert not kernels.finite(huge, kernels.GRADIENT_LIMIT) and kernels.finite(huge / 1e21, kernels.GRADIENT_LIMIT)


# --- the shard's push path -------------------------------------------------------------------


def shard(mode: str, wire: str = "float32", **kw) -> ShardDriver:
    cfg = ShardConfig(num_workers=3, rules=RuleConfig(mode=mode, lr=LR, momentum=MU), wire_dtype=wire, **kw)
    d = ShardDriver(ShardState(cfg))
    d.call("init", 0, torch.randn(N, generator=torch.Generator().manual_seed(1)), n=N, lo=0, hi=N)
    return d


def test_a_non_finite_gradient_or_one_whose_square_overflows_is_refused_whole():
    d = shard("dcasgd-a")
    d.call("pull", 0)
    w = d.state.w.clone()
    g = torch.randn(N)
    g[N - 1] = float("inf")
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        d.call("push_pull", 0, g, seq=1)
    assert torch.equal(d.state.w, w) and d.state.version == 0 and d.state.last_seq[0] == 0
    assert d.state.non_finite == 1 and torch.equal(d.state._ms, torch.zeros(N))
    # 3e19 is finite, but g*g overflows float32: the mean square and then the weights would be NaN.
    with pytest.raises(ProtocolError, match="beyond 1e"):
        d.call("push", 0, torch.full((N,), 3e19), seq=1, lr=1e-40)
    assert torch.equal(d.state.w, w) and torch.equal(d.state._ms, torch.zeros(N)) and d.state.non_finite == 2
    d.call("push", 0, torch.full((N,), 1e18), seq=1, lr=1e-40)  # at the limit: applied, and stays finite
    assert d.state.version == 1 and bool(torch.isfinite(d.state.w).all()) and bool(torch.isfinite(d.state._ms).all())
    a = shard("async")  # no square in ASGD: a huge finite gradient is applied
    a.call("pull", 0)
    a.call("push", 0, torch.full((N,), 3e38), seq=1, lr=1e-40)
    assert a.state.version == 1 and a.state.non_finite == 0


@pytest.mark.parametrize(
    ("mode", "wire", "kw"),
    [
        ("dcasgd-a", "bfloat16", {}),
        ("dcasgd-s", "float32", {}),
        ("dcasgd-s", "bfloat16", {}),
        ("dcasgd", "float32", {"compensation": "per-parameter"}),
        ("async", "float32", {}),
        ("sync", "bfloat16", {}),
    ],
)
def test_the_shard_gives_the_same_numbers_fused_or_not(mode, wire, kw, monkeypatch):
    """Interleaved pushes, push_pulls and pulls (overlapped workers keep two backups); the backups
    a worker holds are never written while held."""
    runs = []
    for fused in (True, False):
        monkeypatch.setenv("DCASGD_FUSED", "1" if fused else "0")
        d = shard(mode, wire, **kw)
        for w in range(3):
            d.call("pull", w, keep=2)
        sent: list[tuple[Snapshot, Tensor]] = []  # each snapshot sent, and its contents then
        for step in range(4):
            for w in range(3):
                g = torch.randn(N, generator=torch.Generator().manual_seed(10 * step + w)).to(getattr(torch, wire))
                op = "push" if (w == 2 and step % 2) else "push_pull"
                for reply in d.call(op, w, g, seq=step + 1, keep=2):
                    if reply.snapshot is not None:
                        sent.append((reply.snapshot, reply.snapshot.tensor.clone()))
            held = [s for s in (*d.state.backup, *d.state.previous) if s is not None]
            for snap, contents in sent:
                if any(snap is h for h in held):
                    assert torch.equal(snap.tensor, contents), "a held backup was written"
        stats = d.state.stats()
        assert stats["fused"] is fused
        assert set(stats["phase_seconds"]) == {"check", "rule", "snapshot"}
        assert stats["phase_seconds"]["rule"] > 0 and stats["phase_seconds"]["check"] > 0
        runs.append(d.state)
    a, b = runs
    assert a.version == b.version
    # Over several steps, a half-size wire turns an ulp of float32 into one of the snapshot now and
    # then (a rounding tie broken the other way), which the compensation term then carries.
    # The adaptive modes divide by sqrt(ms), which the two paths round differently (an ulp), and over
    # twelve steps the compensation carries it too: up to about 1e-5 here in float32 (dcasgd-a alike).
    atol = ATOL if mode in ("async", "sync") or (wire == "float32" and mode not in kernels.MS_MODES) else 1e-2
    if wire == "float32" and mode in kernels.MS_MODES:
        atol = 1e-4
    for x, y in ((a.w, b.w), (a._ms, b._ms), (a._momentum, b._momentum)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=atol)
    cur_a, cur_b = a._snapshot(), b._snapshot()
    assert cur_a.version == cur_b.version
    torch.testing.assert_close(cur_a.tensor.float(), cur_b.tensor.float(), rtol=2**-7, atol=atol)


def test_without_numba_the_fallback_serves():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from dcasgd import kernels, rules\n"
        "kernels.prepare('dcasgd-a', wait=True)\n"
        "w = torch.ones(5)\n"
        "assert not kernels.update('async', w, torch.ones(5), config=rules.RuleConfig(), lr=0.5)\n"
        "assert torch.equal(w, torch.full((5,), 0.5)), w\n"
        "print(kernels._failed)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ImportError" in out.stdout or "ModuleNotFoundError" in out.stdout
