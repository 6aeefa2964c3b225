"""The update rules (dcasgd.rules) against an independent float64 model of the paper's formulas.

Also pins the three known ways to get DC-ASGD wrong (DESIGN.md, "The algorithm"), each with a
test that fails on the mistaken implementation:

- one "previous weight" per parameter instead of one backup per worker;
- a backup that aliases ``w`` (the compensation term is then always zero);
- ``lam_t`` compounded step after step instead of ``lam0 / sqrt(ms + eps)``.

The reference below is plain float64 torch arithmetic written from the paper, not from the
library: it shares no code with ``dcasgd.rules``.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from conftest import ShardDriver
from torch import Tensor

from dcasgd import rules
from dcasgd.rules import MODES as ALL_MODES
from dcasgd.rules import RuleConfig
from dcasgd.shard import ShardConfig, ShardState

RTOL, ATOL = 1e-5, 1e-6  # float32 library vs float64 reference
MARGIN = 1e-3  # a "different" result must differ by this much (far above the tolerance)
LR = 0.05
MU = 0.9
STEPS = 5
SIZES = [1000, 1, 0]
MOMENTA = [0.0, MU]
MODES = ["async", "dcasgd", "dcasgd-a", "sync"]
DC_MODES = ["dcasgd", "dcasgd-a"]
SYNC_WORKERS = 3  # gradients averaged per sync step

# The paper's public defaults (Zheng et al., ICML 2017).
PAPER = {"lam": 0.04, "lam0": 2.0, "ms_decay": 0.95, "eps": 1e-7}

pytestmark = pytest.mark.timeout(30)


# --- the independent float64 reference -----------------------------------------------------


class Reference:
    """Float64 weights ``w`` with DC-ASGD-a's mean square ``ms`` and a momentum buffer ``v``.

    ``step(mode, grads, w_bak)`` applies one update of the paper; ``grads`` is a list (one
    gradient, or one per worker for sync).
    """

    def __init__(self, w0: Tensor, momentum: float = 0.0, lr: float = LR, **hyper: float) -> None:
        self.w = w0.double().clone()
        self.ms = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.momentum = momentum
        self.lr = lr
        self.hyper = {**PAPER, **hyper}

    def step(self, mode: str, grads: list[Tensor], w_bak: Tensor | None = None) -> None:
        g = grads[0].double()
        if mode == "async":
            d = g
        elif mode == "sync":
            d = sum(x.double() for x in grads) / len(grads)
        elif mode == "dcasgd":
            d = g + self.hyper["lam"] * g * g * (self.w - w_bak.double())
        elif mode == "dcasgd-a":
            m, eps = self.hyper["ms_decay"], self.hyper["eps"]
            self.ms = m * self.ms + (1 - m) * g * g
            lam_t = self.hyper["lam0"] / torch.sqrt(self.ms + eps)
            d = g + lam_t * g * g * (self.w - w_bak.double())
        else:
            raise AssertionError(mode)
        self._apply(d)

    def _apply(self, d: Tensor) -> None:
        if self.momentum > 0:
            self.v = self.momentum * self.v + d
            d = self.v
        self.w = self.w - self.lr * d


class CompoundingReference(Reference):
    """The mistake: ``lam_t <- lam_{t-1} / sqrt(ms_t + eps)``, starting from ``lam0``."""

    def __init__(self, w0: Tensor, **kwargs: float) -> None:
        super().__init__(w0, **kwargs)
        self.lam_t = torch.full_like(self.w, self.hyper["lam0"])

    def step(self, mode: str, grads: list[Tensor], w_bak: Tensor | None = None) -> None:
        assert mode == "dcasgd-a"
        g = grads[0].double()
        m, eps = self.hyper["ms_decay"], self.hyper["eps"]
        self.ms = m * self.ms + (1 - m) * g * g
        self.lam_t = self.lam_t / torch.sqrt(self.ms + eps)
        self._apply(g + self.lam_t * g * g * (self.w - w_bak.double()))


# --- the library under test ----------------------------------------------------------------


class Library:
    """Float32 state driven through ``dcasgd.rules``, mirroring :class:`Reference`."""

    def __init__(self, w0: Tensor, momentum: float = 0.0, reference: bool = False, lr: float = LR, **hyper):
        self.w = w0.clone()
        self.ms = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w) if momentum > 0 else None
        self.common = {"lr": lr, "momentum": momentum, "momentum_buf": self.v, "reference": reference}
        self.hyper = hyper  # passed to the DC rules; empty: the rules' own defaults

    def step(self, mode: str, grads: list[Tensor], w_bak: Tensor | None = None) -> None:
        g = grads[0]
        if mode == "async":
            rules.asgd_step(self.w, g, **self.common)
        elif mode == "sync":
            rules.ssgd_step(self.w, torch.stack(grads).sum(0), len(grads), **self.common)
        elif mode == "dcasgd":
            rules.dcasgd_step(self.w, g, w_bak, **self.common, **self.hyper)
        elif mode == "dcasgd-a":
            rules.dcasgd_adaptive_step(self.w, g, w_bak, self.ms, **self.common, **self.hyper)
        else:
            raise AssertionError(mode)


def draw(n: int, seed: int = 0, steps: int = STEPS, drift: float = 0.1) -> tuple[Tensor, Tensor, list[list[Tensor]]]:
    """Seeded float32 data: initial weights, a backup ``drift`` away, gradients per step."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen)
    w_bak = w0 + drift * torch.randn(n, generator=gen)
    grads = [[torch.randn(n, generator=gen) for _ in range(SYNC_WORKERS)] for _ in range(steps)]
    return w0, w_bak, grads


def run(model: Reference | Library, mode: str, w_bak: Tensor, grads: list[list[Tensor]]):
    for step_grads in grads:
        model.step(mode, step_grads if mode == "sync" else step_grads[:1], w_bak)
    return model


def assert_close(actual: Tensor, expected: Tensor, what: str = "w") -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_differs(actual: Tensor, wrong: Tensor, what: str) -> None:
    gap = (actual.double() - wrong.double()).abs().max().item()
    assert gap > MARGIN, f"{what}: result is within {gap:.3g} of the mistaken variant"


def assert_matches(lib: Library, ref: Reference, mode: str) -> None:
    assert_close(lib.w, ref.w)
    if lib.v is not None:
        assert_close(lib.v, ref.v, "momentum buffer")
    if mode == "dcasgd-a":
        assert_close(lib.ms, ref.ms, "ms")


# --- each rule against the reference --------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_rule_matches_paper_with_defaults(mode, reference, momentum, n):
    """Several steps of each rule, with the rules' own default hyperparameters."""
    w0, w_bak, grads = draw(n)
    lib = run(Library(w0, momentum, reference), mode, w_bak, grads)
    ref = run(Reference(w0, momentum), mode, w_bak, grads)
    assert_matches(lib, ref, mode)


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("mode", DC_MODES)
def test_rule_uses_given_hyperparameters(mode, reference, momentum):
    hyper = {"lam": 0.5} if mode == "dcasgd" else {"lam0": 0.7, "ms_decay": 0.8, "eps": 1e-3}
    w0, w_bak, grads = draw(1000, seed=1)
    lib = run(Library(w0, momentum, reference, lr=0.02, **hyper), mode, w_bak, grads)
    ref = run(Reference(w0, momentum, lr=0.02, **hyper), mode, w_bak, grads)
    assert_matches(lib, ref, mode)
    default = run(Reference(w0, momentum, lr=0.02), mode, w_bak, grads)
    assert_differs(lib.w, default.w, "hyperparameters ignored")


def test_defaults_are_the_papers():
    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(rules.dcasgd_step, "lam") == PAPER["lam"]
    for name in ("lam0", "ms_decay", "eps"):
        assert default(rules.dcasgd_adaptive_step, name) == PAPER[name], name
    config = RuleConfig()
    assert {k: getattr(config, k) for k in PAPER} == PAPER
    assert config.momentum == 0.0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("mode", MODES)
def test_fast_and_reference_paths_agree(mode, momentum, n):
    w0, w_bak, grads = draw(n, seed=2)
    fast = run(Library(w0, momentum, reference=False), mode, w_bak, grads)
    slow = run(Library(w0, momentum, reference=True), mode, w_bak, grads)
    torch.testing.assert_close(fast.w, slow.w, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fast.ms, slow.ms, rtol=RTOL, atol=ATOL)
    if momentum:
        torch.testing.assert_close(fast.v, slow.v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("mode", ["async", "dcasgd", "dcasgd-a"])
def test_rules_update_in_place_and_leave_inputs_alone(mode, reference):
    w0, w_bak, grads = draw(1000, seed=3, steps=1)
    lib = Library(w0, reference=reference)
    w_ptr, g, bak = lib.w.data_ptr(), grads[0][0], w_bak.clone()
    g_before = g.clone()
    lib.step(mode, [g], bak)
    assert lib.w.data_ptr() == w_ptr
    assert not torch.equal(lib.w, w0)
    assert torch.equal(g, g_before), "the gradient was modified"
    assert torch.equal(bak, w_bak), "the backup was modified"


@pytest.mark.parametrize("mode", DC_MODES)
def test_scratch_buffers_give_the_same_result(mode):
    w0, w_bak, grads = draw(1000, seed=4)
    allocating = run(Library(w0, MU), mode, w_bak, grads)
    with_scratch = run(Library(w0, MU, scratch=[torch.empty(1000), torch.empty(1000)]), mode, w_bak, grads)
    assert torch.equal(with_scratch.w, allocating.w)


@pytest.mark.parametrize("mode", DC_MODES)
def test_scratch_of_wrong_shape_is_refused(mode):
    w0, w_bak, grads = draw(10, steps=1)
    lib = Library(w0, scratch=[torch.empty(9), torch.empty(9)])
    with pytest.raises(ValueError, match="scratch"):
        lib.step(mode, grads[0], w_bak)


def test_momentum_without_buffer_is_refused():
    w0, _, grads = draw(10, steps=1)
    with pytest.raises(ValueError, match="momentum buffer"):
        rules.asgd_step(w0, grads[0][0], lr=LR, momentum=MU)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_sync_step_needs_a_gradient(reference):
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="at least one gradient"):
        rules.ssgd_step(w, torch.zeros(4), 0, lr=LR, reference=reference)


# --- mistake 3: lam_t compounded --------------------------------------------------------------


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_adaptive_lambda_is_not_compounded(reference):
    """lam_t is lam0 / sqrt(ms + eps) at every step, not the previous lam_t divided again."""
    w0, w_bak, grads = draw(1000, seed=5, steps=4)
    lib = run(Library(w0, reference=reference, lr=0.01), "dcasgd-a", w_bak, grads)
    right = run(Reference(w0, lr=0.01), "dcasgd-a", w_bak, grads)
    wrong = run(CompoundingReference(w0, lr=0.01), "dcasgd-a", w_bak, grads)
    assert torch.isfinite(wrong.w).all()
    assert_close(lib.w, right.w)
    assert_differs(lib.w, wrong.w, "lam_t compounded across steps")


# --- mistake 2: a backup aliasing w -----------------------------------------------------------


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("alias", [lambda w: w, lambda w: w[:], lambda w: w.view(-1)], ids=["same", "slice", "view"])
@pytest.mark.parametrize("mode", DC_MODES)
def test_backup_aliasing_w_is_refused(mode, alias, reference):
    w0, _, grads = draw(10, steps=1)
    lib = Library(w0, reference=reference)
    before = lib.w.clone()
    with pytest.raises(ValueError, match="aliases w"):
        lib.step(mode, grads[0], alias(lib.w))
    assert torch.equal(lib.w, before), "a refused step changed w"


# --- the shard, driven as server._dispatch drives it ------------------------------------------

FP = "test-layout"
SHARD_LR = 0.1  # large enough that the compensation term stands far above the tolerance


class Shard:
    """One :class:`ShardState` fed requests the way ``ShardServer._dispatch`` does.

    Every op goes through ``check`` first; weights in replies are copied out at once (the
    server hands them to ZeroMQ and holds the snapshot until sent).
    """

    def __init__(self, mode: str, num_workers: int, w0: Tensor, momentum: float = 0.0) -> None:
        rule_config = RuleConfig(mode=mode, lr=SHARD_LR, momentum=momentum)
        self.state = ShardState(ShardConfig(num_workers=num_workers, rules=rule_config))
        self.n = w0.numel()
        self.seq = [0] * num_workers
        self._call = ShardDriver(self.state, FP).call
        self._call("init", 0, w0, n=self.n, lo=0, hi=self.n)

    def pull(self, worker: int) -> Tensor:
        (reply,) = self._call("pull", worker)
        return reply.snapshot.tensor.clone()

    def push_pull(self, worker: int, g: Tensor) -> Tensor:
        self.seq[worker] += 1
        (reply,) = self._call("push_pull", worker, g, seq=self.seq[worker])
        return reply.snapshot.tensor.clone()


class PerWorkerCluster:
    """The paper: the shard keeps, per worker, the weights that worker last received."""

    def __init__(self, mode: str, num_workers: int, w0: Tensor, momentum: float = 0.0) -> None:
        self.mode = mode
        self.ref = Reference(w0, momentum, lr=SHARD_LR)
        self.backup: list[Tensor | None] = [None] * num_workers

    def pull(self, worker: int) -> Tensor:
        self.backup[worker] = self.ref.w.clone()
        return self.ref.w

    def push_pull(self, worker: int, g: Tensor) -> Tensor:
        self.ref.step(self.mode, [g], self.backup[worker])
        return self.pull(worker)


class PerParameterCluster(PerWorkerCluster):
    """The mistake: one "previous weight" per parameter, refreshed at every update (MXNet's
    DCASGD), so ``w - w_prev`` is the last update of anyone, not the drift since m pulled."""

    def __init__(self, mode: str, num_workers: int, w0: Tensor, momentum: float = 0.0) -> None:
        super().__init__(mode, num_workers, w0, momentum)
        self.previous = self.ref.w.clone()

    def push_pull(self, worker: int, g: Tensor) -> Tensor:
        previous, self.previous = self.previous, self.ref.w.clone()
        self.ref.step(self.mode, [g], previous)
        return self.ref.w


def interleaving(num_workers: int) -> list[int]:
    """Which worker pushes next: round robin, then out of order, with a repeat."""
    order = list(range(num_workers))
    return order * 2 + order[::-1] + [0, 0] + order[1:] + order


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("num_workers", [2, 3])
@pytest.mark.parametrize("mode", DC_MODES)
def test_shard_keeps_one_backup_per_worker(mode, num_workers, momentum):
    """Mistake 1: the compensation uses the drift since *this* worker pulled."""
    gen = torch.Generator().manual_seed(10 + num_workers)
    n = 1000
    w0 = torch.randn(n, generator=gen)
    shard = Shard(mode, num_workers, w0, momentum)
    right = PerWorkerCluster(mode, num_workers, w0, momentum)
    wrong = PerParameterCluster(mode, num_workers, w0, momentum)
    for worker in range(num_workers):
        assert_close(shard.pull(worker), right.pull(worker), f"pull by worker {worker}")
        wrong.pull(worker)
    for i, worker in enumerate(interleaving(num_workers)):
        g = torch.randn(n, generator=gen)
        got = shard.push_pull(worker, g)
        assert_close(got, right.push_pull(worker, g), f"push {i} by worker {worker}")
        wrong.push_pull(worker, g)
    assert_close(shard.state.w, right.ref.w)
    assert_differs(shard.state.w, wrong.ref.w, "one previous weight per parameter")


@pytest.mark.parametrize("mode", DC_MODES)
def test_shard_compensates_a_stale_gradient(mode):
    """Mistake 2 through the shard: a stale push is compensated, so it is not plain ASGD."""
    gen = torch.Generator().manual_seed(20)
    n = 1000
    w0, g0, g1 = (torch.randn(n, generator=gen) for _ in range(3))
    shard = Shard(mode, 2, w0)
    right = PerWorkerCluster(mode, 2, w0)
    for worker in (0, 1):
        shard.pull(worker)
        right.pull(worker)
    after_w1 = shard.push_pull(1, g1)
    right.push_pull(1, g1)
    after_w0 = shard.push_pull(0, g0)  # computed at w0, applied after worker 1 moved the model
    plain_asgd = after_w1.double() - SHARD_LR * g0.double()
    assert_close(after_w0, right.push_pull(0, g0))
    assert_differs(after_w0, plain_asgd, "compensation term is zero (backup aliases w?)")


# --- RuleConfig validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "Invalid learning rate: 0.0"),
        ("lr", -0.1, "Invalid learning rate: -0.1"),
        ("lr", math.nan, "Invalid learning rate: nan"),
        ("mode", "adam", "Invalid mode: 'adam' \\(choose from " + re.escape(", ".join(ALL_MODES)) + "\\)"),
        ("mode", "DCASGD", "Invalid mode: 'DCASGD'"),
        ("momentum", -0.1, "Invalid momentum: -0.1"),
        ("momentum", 1.0, "Invalid momentum: 1.0"),
        ("momentum", math.nan, "Invalid momentum: nan"),
        ("lam", -1.0, "Invalid lam: -1.0"),
        ("lam0", -1.0, "Invalid lam0: -1.0"),
        ("ms_decay", 1.0, "Invalid ms_decay: 1.0"),
        ("eps", 0.0, "Invalid eps: 0.0"),
    ],
)
def test_rule_config_refuses_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        RuleConfig(**{field: value})


@pytest.mark.parametrize("mode", MODES)
def test_rule_config_accepts_every_mode(mode):
    config = RuleConfig(mode=mode, lr=1e-3, momentum=0.99)
    assert (config.mode, config.lr, config.momentum) == (mode, 1e-3, 0.99)
