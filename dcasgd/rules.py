"""The update rules of SSGD, ASGD, DC-ASGD-c and DC-ASGD-a as pure functions.

Every rule updates flat float32 tensors in place and never sees a socket or a
shard. The shape follows ``torch/optim/sgd.py``: a public function per rule that
dispatches to a readable reference (``_reference_*``, allocating, one line per
formula of the paper) or to the fast version used by the server (in place, no
allocation when scratch buffers are given). Tests check one against the other.

Notation (Zheng et al., ICML 2017): ``w`` the shard's weights, ``g`` a worker's
gradient, ``w_bak`` the copy of ``w`` that worker last received, ``ms`` the
running mean square of gradients (DC-ASGD-a only), ``v`` the momentum buffer.

- async:    w <- w - lr * g
- dcasgd:   w <- w - lr * (g + lam * g*g*(w - w_bak))
- dcasgd-a: ms <- m*ms + (1-m)*g*g;  lam_t = lam0 / sqrt(ms + eps)
            w <- w - lr * (g + lam_t * g*g*(w - w_bak))
- dcasgd-s: DC-ASGD-a whose strength follows the staleness s of the push (versions the
            weights moved since the gradient's weights were sent):
            ms <- m*ms + (1-m)*g*g;  lam_t = lam0 * (1 + s)**p / sqrt(ms + eps)
            c = lam_t * g*g*(w - w_bak), clipped to [-clip*|g|, clip*|g|] when clip > 0
            w <- w - lr * (g + c)
- dcasgd-s with ``curvature="fisher"``: the Hessian in the compensation is an empirical Fisher
            of the shard's last K pushed gradients g_1..g_k (the push's own included), not g*g:
            F = lam/k * sum_j g_j g_j^T - (lam - 1) * m m^T  (m = mean of the g_j; centered)
            c = F (w - w_bak), clipped as above when clip > 0;  w <- w - lr * (g + c)
            (lam = lam0 * (1 + s)**p; uncentered: F = lam/k * sum_j g_j g_j^T). Over a slice
            of the model (one shard's), so F is block-diagonal by shard.
- dcasgd-f: the same Fisher compensation (constant lam = fisher_lam0, centred), its strength
            capped so that lr * F can never overshoot the stale gap: with lambda_max the largest
            eigenvalue of F (from the k x k Gram matrix of the g_j),
            c = min(1, cap / (lr * lambda_max)) * F (w - w_bak);  w <- w - lr * (g + c)
- sync:     w <- w - lr * (sum of gradients / count)

With momentum ``mu > 0`` the (compensated) gradient ``d`` goes through
``v <- mu*v + d; w <- w - lr*v``. ``v`` starts at zero, so the first step is
``v = d``, as in ``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("sync", "async", "dcasgd", "dcasgd-a", "dcasgd-s", "dcasgd-f")
CURVATURES = ("diag", "fisher")  # dcasgd-s's estimate of the Hessian in the compensation term
DC_MODES = frozenset({"dcasgd", "dcasgd-a", "dcasgd-s", "dcasgd-f"})  # modes that compensate with a backup


@dataclass(frozen=True)
class RuleConfig:
    """Hyperparameters of the rules, with the paper's public defaults.

    ``lr`` is the default learning rate when a push does not carry one;
    ``lam`` is DC-ASGD-c's constant lambda; ``lam0``, ``ms_decay`` and ``eps``
    are DC-ASGD-a's lambda_0, m and epsilon (dcasgd-s uses them too); ``staleness_power``
    (p) and ``clip`` are dcasgd-s's: lam_t grows as (1 + staleness)**p, and the compensation
    term is clipped to ``clip`` times |g| element-wise (0: no clip); ``momentum`` is the
    server-side mu. ``curvature`` (dcasgd-s): ``"diag"``, DC-ASGD-a's ``lam_t * g*g``, or
    ``"fisher"``, the empirical Fisher of the shard's last ``fisher_rank`` gradients scaled by
    lam = lam0 * (1 + staleness)**p (no mean square), centered (``fisher_centered``: the mean
    gradient's outer product counted once, not lam times) or not. With a minibatch of B samples,
    B * E[g g^T] - (B - 1) * E[g] E[g]^T is the per-sample Fisher, so lam0 near the workers' batch
    size is the principled strength. ``fisher_rank`` and ``fisher_centered`` also serve dcasgd-f,
    whose own defaults are ``fisher_lam0`` (its constant lam; dcasgd-f reads neither ``lam0``,
    ``staleness_power`` nor ``clip``) and ``fisher_cap`` (lr * F's largest eigenvalue is capped
    at this; 0: no cap).
    """

    mode: str = "async"
    lr: float = 0.1
    lam: float = 0.04
    lam0: float = 2.0
    ms_decay: float = 0.95
    eps: float = 1e-7
    momentum: float = 0.0
    staleness_power: float = 0.5
    clip: float = 1.0
    curvature: str = "diag"
    fisher_rank: int = 128
    fisher_centered: bool = True
    fisher_lam0: float = 12.0
    fisher_cap: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Invalid mode: {self.mode!r} (choose from {', '.join(MODES)})")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if not (self.lam >= 0.0 and math.isfinite(self.lam)):
            raise ValueError(f"Invalid lam: {self.lam}")
        if not (self.lam0 >= 0.0 and math.isfinite(self.lam0)):
            raise ValueError(f"Invalid lam0: {self.lam0}")
        if not 0.0 <= self.ms_decay < 1.0:
            raise ValueError(f"Invalid ms_decay: {self.ms_decay}")
        if not self.eps > 0.0:
            raise ValueError(f"Invalid eps: {self.eps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum: {self.momentum}")
        if not (self.staleness_power >= 0.0 and math.isfinite(self.staleness_power)):
            raise ValueError(f"Invalid staleness_power: {self.staleness_power}")
        if not (self.clip >= 0.0 and math.isfinite(self.clip)):
            raise ValueError(f"Invalid clip: {self.clip}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {self.curvature!r} (choose from {', '.join(CURVATURES)})")
        if self.curvature != "diag" and self.mode != "dcasgd-s":
            raise ValueError(f"curvature={self.curvature!r} is a dcasgd-s option, not {self.mode}'s")
        if not (isinstance(self.fisher_rank, int) and self.fisher_rank >= 1):
            raise ValueError(f"Invalid fisher_rank: {self.fisher_rank}")
        if not (self.fisher_lam0 >= 0.0 and math.isfinite(self.fisher_lam0)):
            raise ValueError(f"Invalid fisher_lam0: {self.fisher_lam0}")
        if not (self.fisher_cap >= 0.0 and math.isfinite(self.fisher_cap)):
            raise ValueError(f"Invalid fisher_cap: {self.fisher_cap}")


def _check_momentum(momentum: float, momentum_buf: Tensor | None) -> None:
    if momentum > 0.0 and momentum_buf is None:
        raise ValueError("momentum > 0 needs a momentum buffer")


def _apply_direction(w: Tensor, d: Tensor, lr: float, momentum: float, momentum_buf: Tensor | None) -> None:
    """w <- w - lr*d, or through the momentum buffer when momentum > 0."""
    if momentum > 0.0:
        momentum_buf.mul_(momentum).add_(d)
        w.add_(momentum_buf, alpha=-lr)
    else:
        w.add_(d, alpha=-lr)


def _scratch(w: Tensor, scratch: list[Tensor] | None, count: int) -> list[Tensor]:
    if scratch is None:
        return [torch.empty_like(w) for _ in range(count)]
    if len(scratch) < count or any(s.shape != w.shape for s in scratch[:count]):
        raise ValueError(f"need {count} scratch tensors shaped like w {tuple(w.shape)}")
    return scratch


# --- async ---------------------------------------------------------------------------


def asgd_step(
    w: Tensor,
    g: Tensor,
    *,
    lr: float,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    reference: bool = False,
) -> None:
    """ASGD: ``w <- w - lr * g`` in place. ``w``, ``g``: 1-D float32, same length."""
    _check_momentum(momentum, momentum_buf)
    if reference:
        _reference_asgd(w, g, lr, momentum, momentum_buf)
    else:
        _apply_direction(w, g, lr, momentum, momentum_buf)


def _reference_asgd(w, g, lr, momentum, momentum_buf):
    d = g.clone()
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- DC-ASGD-c -----------------------------------------------------------------------


def dcasgd_step(
    w: Tensor,
    g: Tensor,
    w_bak: Tensor,
    *,
    lr: float,
    lam: float = 0.04,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    reference: bool = False,
) -> None:
    """DC-ASGD-c: ``w <- w - lr * (g + lam * g*g*(w - w_bak))`` in place.

    ``w_bak`` is this worker's backup (the weights it last received); it must
    not alias ``w``. ``scratch``: one tensor shaped like ``w`` to avoid an
    allocation per call.
    """
    if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
        raise ValueError("w_bak aliases w: the compensation term would always be zero")
    _check_momentum(momentum, momentum_buf)
    if reference:
        _reference_dcasgd(w, g, w_bak, lr, lam, momentum, momentum_buf)
        return
    (s,) = _scratch(w, scratch, 1)[:1]
    torch.sub(w, w_bak, out=s)
    s.mul_(g)
    torch.addcmul(g, s, g, value=lam, out=s)  # s = g + lam * g*g*(w - w_bak)
    _apply_direction(w, s, lr, momentum, momentum_buf)


def _reference_dcasgd(w, g, w_bak, lr, lam, momentum, momentum_buf):
    d = g + lam * g * g * (w - w_bak)
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- DC-ASGD-a -----------------------------------------------------------------------


def dcasgd_adaptive_step(
    w: Tensor,
    g: Tensor,
    w_bak: Tensor,
    ms: Tensor,
    *,
    lr: float,
    lam0: float = 2.0,
    ms_decay: float = 0.95,
    eps: float = 1e-7,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    reference: bool = False,
) -> None:
    """DC-ASGD-a in place: update ``ms`` with ``g``, then compensate with lam0/sqrt(ms+eps).

    ``ms`` (mean square, one per element, starts at zero) is updated *before*
    ``lam_t`` is formed, and ``lam_t`` is recomputed from ``ms`` at every step,
    never compounded. ``scratch``: two tensors shaped like ``w``.
    """
    if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
        raise ValueError("w_bak aliases w: the compensation term would always be zero")
    _check_momentum(momentum, momentum_buf)
    if reference:
        _reference_dcasgd_adaptive(w, g, w_bak, ms, lr, lam0, ms_decay, eps, momentum, momentum_buf)
        return
    s, t = _scratch(w, scratch, 2)[:2]
    torch.mul(g, g, out=t)
    ms.lerp_(t, 1.0 - ms_decay)  # ms = m*ms + (1-m)*g*g
    torch.sub(w, w_bak, out=s)
    s.mul_(t)  # g*g*(w - w_bak)
    torch.add(ms, eps, out=t)
    t.rsqrt_()  # lam_t / lam0
    torch.addcmul(g, s, t, value=lam0, out=s)  # s = g + lam_t * g*g*(w - w_bak)
    _apply_direction(w, s, lr, momentum, momentum_buf)


def _reference_dcasgd_adaptive(w, g, w_bak, ms, lr, lam0, ms_decay, eps, momentum, momentum_buf):
    ms.copy_(ms_decay * ms + (1.0 - ms_decay) * g * g)
    lam_t = lam0 / torch.sqrt(ms + eps)
    d = g + lam_t * g * g * (w - w_bak)
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- DC-ASGD-s (staleness-scaled DC-ASGD-a) -----------------------------------------


def staleness_lam0(lam0: float, staleness: int, power: float) -> float:
    """dcasgd-s's lambda_0 for one push: ``lam0 * (1 + staleness)**power`` (staleness >= 0)."""
    if staleness < 0:
        raise ValueError(f"Invalid staleness: {staleness}")
    return lam0 * (1.0 + staleness) ** power


def dcasgd_staleness_step(
    w: Tensor,
    g: Tensor,
    w_bak: Tensor,
    ms: Tensor,
    *,
    lr: float,
    staleness: int,
    lam0: float = 2.0,
    staleness_power: float = 0.5,
    clip: float = 1.0,
    ms_decay: float = 0.95,
    eps: float = 1e-7,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    reference: bool = False,
) -> None:
    """DC-ASGD-s in place: DC-ASGD-a with lam0 scaled by ``(1 + staleness)**staleness_power``.

    ``staleness``: versions between the weights the gradient was computed on (``w_bak``) and
    ``w``, as the shard counts them. ``clip > 0`` bounds the compensation term element-wise
    to ``clip * |g|`` (so a large gap cannot turn the step around by more than that).
    ``ms`` as in :func:`dcasgd_adaptive_step`; ``scratch``: two tensors shaped like ``w``.
    """
    if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
        raise ValueError("w_bak aliases w: the compensation term would always be zero")
    _check_momentum(momentum, momentum_buf)
    lam_s = staleness_lam0(lam0, staleness, staleness_power)
    if reference:
        _reference_dcasgd_staleness(w, g, w_bak, ms, lr, lam_s, clip, ms_decay, eps, momentum, momentum_buf)
        return
    if clip <= 0.0:  # the same passes as DC-ASGD-a with a stronger lam0
        dcasgd_adaptive_step(
            w,
            g,
            w_bak,
            ms,
            lr=lr,
            lam0=lam_s,
            ms_decay=ms_decay,
            eps=eps,
            momentum=momentum,
            momentum_buf=momentum_buf,
            scratch=scratch,
        )
        return
    s, t = _scratch(w, scratch, 2)[:2]
    torch.mul(g, g, out=t)
    ms.lerp_(t, 1.0 - ms_decay)
    torch.sub(w, w_bak, out=s)
    s.mul_(t)  # g*g*(w - w_bak)
    torch.add(ms, eps, out=t)
    t.rsqrt_()
    s.mul_(t).mul_(lam_s)  # c = lam_t * g*g*(w - w_bak)
    torch.abs(g, out=t)
    t.mul_(clip)
    torch.minimum(s, t, out=s)
    t.neg_()
    torch.maximum(s, t, out=s)  # c clipped to [-clip*|g|, clip*|g|]
    s.add_(g)
    _apply_direction(w, s, lr, momentum, momentum_buf)


def _reference_dcasgd_staleness(w, g, w_bak, ms, lr, lam_s, clip, ms_decay, eps, momentum, momentum_buf):
    ms.copy_(ms_decay * ms + (1.0 - ms_decay) * g * g)
    lam_t = lam_s / torch.sqrt(ms + eps)
    c = lam_t * g * g * (w - w_bak)
    if clip > 0.0:
        bound = clip * torch.abs(g)
        c = torch.maximum(torch.minimum(c, bound), -bound)
    d = g + c
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- DC-ASGD-s with an empirical-Fisher curvature ------------------------------------


class GradientRing:
    """The last ``rank`` gradients a shard applied (its slice), for the Fisher curvature.

    ``rows`` is ``(rank, n)`` float32, filled in turn; ``count`` is how many were ever added, so
    rows ``[0, min(count, rank))`` hold gradients. Starts empty (zeros, count 0). With
    ``gram=True`` (dcasgd-f) it also keeps ``gram``, the rows' ``(rank, rank)`` float64 Gram
    matrix of dot products, one row and column updated per :meth:`add` (one more pass over the
    ring); otherwise ``gram`` is None.
    """

    __slots__ = ("rows", "count", "gram")

    def __init__(self, rank: int, n: int, rows: Tensor | None = None, count: int = 0, *, gram: bool = False) -> None:
        if rank < 1:
            raise ValueError(f"Invalid fisher_rank: {rank}")
        self.rows = torch.zeros(rank, n) if rows is None else rows
        if self.rows.shape != (rank, n):
            raise ValueError(f"ring rows are {tuple(self.rows.shape)}, expected {(rank, n)}")
        self.count = count
        self.gram = torch.mm(self.rows, self.rows.t()).double() if gram else None

    def add(self, g: Tensor) -> Tensor:
        """Store ``g`` (over the oldest row once full); returns the filled rows (a view)."""
        i = self.count % self.rows.shape[0]
        self.rows[i].copy_(g)
        self.count += 1
        if self.gram is not None:
            dots = torch.mv(self.rows, self.rows[i]).double()
            self.gram[i].copy_(dots)
            self.gram[:, i].copy_(dots)
        return self.rows[: min(self.count, self.rows.shape[0])]


def dcasgd_fisher_step(
    w: Tensor,
    g: Tensor,
    w_bak: Tensor,
    ring: GradientRing,
    *,
    lr: float,
    staleness: int,
    lam0: float = 12.0,
    staleness_power: float = 0.0,
    centered: bool = True,
    clip: float = 0.0,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    reference: bool = False,
) -> None:
    """DC-ASGD-s with ``curvature="fisher"`` in place: adds ``g`` to ``ring``, then compensates
    with the empirical Fisher of the ring's gradients (see the module doc for F).

    ``lam = lam0 * (1 + staleness)**staleness_power``; ``clip > 0`` bounds the compensation term
    element-wise to ``clip * |g|``. Costs two passes over the ring (k dot products, one
    combination of k rows): ``c = sum_j a_j g_j`` with ``a_j = (lam * g_j.d - (lam - 1) * mean_i
    g_i.d) / k`` for ``d = w - w_bak`` (``lam * g_j.d / k`` uncentered). ``scratch``: two tensors
    shaped like ``w``.
    """
    if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
        raise ValueError("w_bak aliases w: the compensation term would always be zero")
    _check_momentum(momentum, momentum_buf)
    lam = staleness_lam0(lam0, staleness, staleness_power)
    rows = ring.add(g)
    if reference:
        _reference_dcasgd_fisher(w, g, w_bak, rows, lr, lam, centered, clip, momentum, momentum_buf)
        return
    s, t = _scratch(w, scratch, 2)[:2]
    k = rows.shape[0]
    torch.sub(w, w_bak, out=s)  # d = w - w_bak
    a = torch.mv(rows, s)  # g_j . d, k values
    mean = a.mean() if centered else None
    a.mul_(lam / k)
    if centered:
        a.sub_(mean * ((lam - 1.0) / k))
    torch.mv(rows.t(), a, out=s)  # c = F d
    if clip > 0.0:
        torch.abs(g, out=t)
        t.mul_(clip)
        torch.minimum(s, t, out=s)
        t.neg_()
        torch.maximum(s, t, out=s)
    s.add_(g)
    _apply_direction(w, s, lr, momentum, momentum_buf)


def _reference_dcasgd_fisher(w, g, w_bak, rows, lr, lam, centered, clip, momentum, momentum_buf):
    k = rows.shape[0]
    fisher = lam / k * sum(torch.outer(gj, gj) for gj in rows)
    if centered:
        m = rows.mean(0)
        fisher = fisher - (lam - 1.0) * torch.outer(m, m)
    c = fisher @ (w - w_bak)
    if clip > 0.0:
        bound = clip * torch.abs(g)
        c = torch.maximum(torch.minimum(c, bound), -bound)
    d = g + c
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- DC-ASGD-f: the Fisher compensation with a spectral cap ---------------------------


def fisher_top_eigenvalue(gram: Tensor, lam: float, centered: bool = True) -> float:
    """The largest eigenvalue of ``F = lam/k sum_j g_j g_j^T - (lam - 1) m m^T`` (uncentered:
    without the second term) from the k x k Gram matrix ``gram[i, j] = g_i . g_j``.

    ``F = G^T A G`` with ``A = lam/k (I - J) + 1/k J`` (``J = 11^T / k``; uncentered ``lam/k I``),
    so its nonzero eigenvalues are those of ``A^1/2 gram A^1/2`` (k x k; A's square root in closed
    form). For ``lam >= 1`` A is positive semi-definite. 0.0 for an empty ring.
    """
    k = gram.shape[0]
    if k == 0:
        return 0.0
    gram = gram.double()
    if centered:
        j = torch.full((k, k), 1.0 / k, dtype=torch.float64)
        half = math.sqrt(max(lam, 0.0) / k) * (torch.eye(k, dtype=torch.float64) - j) + math.sqrt(1.0 / k) * j
        b = half @ gram @ half
    else:
        b = gram * (lam / k)
    return float(torch.linalg.eigvalsh(b)[-1])


def fisher_cap_scale(lr: float, top: float, cap: float) -> float:
    """dcasgd-f's factor on F: ``min(1, cap / (lr * top))`` (1 when ``cap`` is 0, no cap)."""
    if cap <= 0.0 or lr * top <= cap:
        return 1.0
    return cap / (lr * top)


def dcasgd_fisher_capped_step(
    w: Tensor,
    g: Tensor,
    w_bak: Tensor,
    ring: GradientRing,
    *,
    lr: float,
    lam0: float = 12.0,
    cap: float = 1.0,
    centered: bool = True,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    reference: bool = False,
) -> None:
    """DC-ASGD-f in place: adds ``g`` to ``ring`` (which must keep its Gram matrix,
    ``GradientRing(..., gram=True)``), then compensates with the ring's empirical Fisher F (lam =
    ``lam0`` at every staleness) scaled by ``min(1, cap / (lr * lambda_max(F)))``, so that
    ``lr * F``'s largest eigenvalue is at most ``cap``: with ``cap = 1`` the compensation
    ``lr * c`` cannot exceed the stale gap ``w - w_bak`` along any of F's eigenvectors.

    Costs three passes over the ring (the Gram row of ``g``, k dot products with ``w - w_bak``,
    one combination of k rows) and one k x k symmetric eigenvalue problem. ``scratch``: one
    tensor shaped like ``w``.
    """
    if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
        raise ValueError("w_bak aliases w: the compensation term would always be zero")
    if ring.gram is None:
        raise ValueError("dcasgd-f needs a ring that keeps its Gram matrix (GradientRing(..., gram=True))")
    _check_momentum(momentum, momentum_buf)
    rows = ring.add(g)
    if reference:
        _reference_dcasgd_fisher_capped(w, g, w_bak, rows, lr, lam0, cap, centered, momentum, momentum_buf)
        return
    (s,) = _scratch(w, scratch, 1)[:1]
    k = rows.shape[0]
    filled = ring.gram[:k, :k]
    scale = 1.0
    if cap > 0.0:
        # tr F >= lambda_max: skip the eigenvalue problem when the trace is already under the cap
        trace = lam0 / k * float(filled.diagonal().sum())
        if centered:
            trace -= (lam0 - 1.0) / k**2 * float(filled.sum())
        if lr * trace > cap:
            scale = fisher_cap_scale(lr, fisher_top_eigenvalue(filled, lam0, centered), cap)
    lam = lam0 * scale
    torch.sub(w, w_bak, out=s)  # d = w - w_bak
    a = torch.mv(rows, s)  # g_j . d
    mean = a.mean() if centered else None
    a.mul_(lam / k)
    if centered:
        a.sub_(mean * ((lam0 - 1.0) * scale / k))
    torch.mv(rows.t(), a, out=s)  # c = scale * F d
    s.add_(g)
    _apply_direction(w, s, lr, momentum, momentum_buf)


def _reference_dcasgd_fisher_capped(w, g, w_bak, rows, lr, lam, cap, centered, momentum, momentum_buf):
    k = rows.shape[0]
    r = rows.double()
    fisher = lam / k * sum(torch.outer(gj, gj) for gj in r)
    if centered:
        m = r.mean(0)
        fisher = fisher - (lam - 1.0) * torch.outer(m, m)
    top = float(torch.linalg.eigvalsh(fisher)[-1])
    if cap > 0.0 and lr * top > cap:
        fisher = fisher * (cap / (lr * top))
    c = (fisher @ (w - w_bak).double()).float()
    d = g + c
    if momentum > 0.0:
        momentum_buf.copy_(momentum * momentum_buf + d)
        d = momentum_buf
    w.copy_(w - lr * d)


# --- sync ----------------------------------------------------------------------------


def ssgd_step(
    w: Tensor,
    grad_sum: Tensor,
    count: int,
    *,
    lr: float,
    momentum: float = 0.0,
    momentum_buf: Tensor | None = None,
    reference: bool = False,
) -> None:
    """SSGD: one step with the average of ``count`` gradients whose sum is ``grad_sum``.

    ``grad_sum`` is scaled in place (it is the round's accumulator, reset by
    the caller before the next round).
    """
    if count < 1:
        raise ValueError(f"a sync step needs at least one gradient, got {count}")
    _check_momentum(momentum, momentum_buf)
    grad_sum.div_(count)
    if reference:
        _reference_asgd(w, grad_sum, lr, momentum, momentum_buf)
        return
    _apply_direction(w, grad_sum, lr, momentum, momentum_buf)
