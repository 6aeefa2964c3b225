"""The fused update: every rule in one pass over memory, the reply snapshot written on the way.

:mod:`dcasgd.rules` keeps the readable reference and a multi-pass in-place torch version (about
eight passes for DC-ASGD-a). The shard calls :func:`update` instead, which reads ``g``, ``w``,
``w_bak`` and the rule's state once and writes ``w``, the state and, when asked, the snapshot
that the reply will carry (rounded to the wire type, bit for bit what ``w.to(dtype)`` gives).
A half-size gradient and backup are read in their own type (no widening pass).

The kernel is compiled by numba (``parallel=True``, chunks spread over as many threads as
``torch.get_num_threads()``), cached on disk where numba can write (beside this module, or
``NUMBA_CACHE_DIR``). Until it is compiled, without numba, or with ``DCASGD_FUSED=0``, the
same call runs the plain-torch fallback: the rules' fast versions, then a copy into the
snapshot. Both give the reference's numbers (tests: rel 1e-6), though not bit for bit, so a
shard keeps to one path: :func:`prepare` compiles in a background thread while the shard starts
and serves, and the shard's first update waits for it (0.6-1 s with numba's cache, 2-3 s
without, once per process).
"""

from __future__ import annotations

import logging
import math
import os
import threading

import torch
from torch import Tensor

from . import rules

log = logging.getLogger("dcasgd.kernels")

# dcasgd-s is dcasgd-a's formula with lam0 scaled per push (a scalar: lam0 * (1 + staleness)**p)
# and the compensation term clipped to clip*|g| in the same pass (no clip: a bound of inf).
MODE_CODES = {"async": 0, "dcasgd": 1, "dcasgd-a": 2, "sync": 3, "dcasgd-s": 4}
DC_MODES = ("dcasgd", "dcasgd-a", "dcasgd-s")
MS_MODES = ("dcasgd-a", "dcasgd-s")  # the modes with a mean square
CHUNK = 1 << 16  # elements per task: 256 KiB of float32, a few arrays fit in L2

_lock = threading.Lock()  # one compile at a time
_kernel = None  # the numba dispatcher once built
_ready: set[tuple] = set()  # the signatures (see _signature) compiled so far
_failed: str | None = None  # why the kernel is unavailable (no numba, a compile error)


def enabled() -> bool:
    """False when the fused kernel is off for this process (``DCASGD_FUSED=0``)."""
    return os.environ.get("DCASGD_FUSED", "1") not in ("0", "false", "no", "off")


def _np_view(t: Tensor):
    """A numpy view of a 1-D CPU tensor; half types as 16-bit integers the kernel decodes
    (bfloat16 as uint16, float16 as int16: numpy has no bfloat16 and numba no float16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _build():
    """Import numba and the kernel's module (no compile yet). Raises ImportError without numba."""
    global _kernel
    if _kernel is None:
        import numba
        import numpy as np

        from . import _fused

        _kernel = ({}, _fused.make, numba, np)
    return _kernel


def _signature(mode: str, g: torch.dtype, w_bak: torch.dtype | None, momentum: bool, snapshot: torch.dtype | None):
    """What one compiled kernel serves: the rule, momentum or not, and the arrays' dtypes."""
    if mode not in DC_MODES:
        w_bak = None
    return (mode, momentum, str(g), str(w_bak), str(snapshot))


def _compile(signatures: list[tuple[str, torch.dtype, torch.dtype | None, bool, torch.dtype | None]]) -> None:
    """Compile (or load from numba's cache) the kernel for each signature, by a call on one element."""
    global _failed
    try:
        with _lock:
            _build()
            for mode, gd, bd, momentum, sd in signatures:
                key = _signature(mode, gd, bd, momentum, sd)
                if key in _ready:
                    continue
                w, g = torch.zeros(1), torch.zeros(1, dtype=gd)
                w_bak = torch.zeros(1, dtype=bd) if bd is not None else None
                v = torch.zeros(1) if momentum else None
                snap = torch.zeros(1, dtype=sd) if sd is not None else None
                _run(MODE_CODES[mode], w, g, w_bak, torch.zeros(1), v, snap, 0.0, (1.0, 0.5, 1.0, 0.5, 1.0), 0.0)
                _ready.add(key)
    except ImportError as exc:  # numba is not installed: the fallback serves, correctly
        _failed = f"{type(exc).__name__}: {exc}"
        log.info("no numba (%s): the update runs as several torch passes", exc)
    except Exception as exc:  # an old numba, a compile error: the fallback serves, correctly
        _failed = f"{type(exc).__name__}: {exc}"
        log.warning("fused update kernel unavailable, using the torch fallback: %s", _failed)


def prepare(
    mode: str,
    wire_dtype: torch.dtype = torch.float32,
    *,
    momentum: bool = False,
    backup_float32: bool = False,
    wait: bool = False,
) -> threading.Thread | None:
    """Compile the kernels a shard of this mode and wire type uses, in a background thread unless ``wait``.

    Pushes that come before they are ready take the fallback; nothing waits for the compile.
    ``backup_float32``: the backups are float32 whatever the wire (the per-parameter ablation).
    Returns the thread, if one was started.
    """
    if not enabled() or _failed is not None or mode not in MODE_CODES:  # dcasgd-f: no fused kernel
        return None
    g = torch.float32 if mode == "sync" else wire_dtype
    backups = [wire_dtype] + ([torch.float32] if backup_float32 and wire_dtype != torch.float32 else [])
    signatures = [(mode, g, b, momentum, s) for b in backups for s in (None, wire_dtype)]
    if all(_signature(*sig) in _ready for sig in signatures):
        return None
    if wait:
        _compile(signatures)
        return None
    thread = threading.Thread(target=_compile, args=(signatures,), name="dcasgd-kernel-compile", daemon=True)
    thread.start()
    return thread


def ready(
    mode: str,
    g: torch.dtype = torch.float32,
    w_bak: torch.dtype | None = None,
    *,
    momentum: bool = False,
    snapshot: torch.dtype | None = None,
) -> bool:
    """Whether :func:`update` runs the fused kernel for this call now."""
    return enabled() and _failed is None and _signature(mode, g, w_bak, momentum, snapshot) in _ready


def _run(mode, w, g, w_bak, ms, v, snap, lr, consts, momentum) -> None:
    kernels, make, numba, np = _kernel
    key = (mode, v is not None, snap is not None)
    kernel = kernels.get(key)
    if kernel is None:
        kernel = kernels[key] = make(*key)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)  # the shard's --threads, for numba's pool as for torch's
    f32 = np.float32
    empty = w[:0]
    kernel(
        _np_view(w),
        _np_view(g),
        _np_view(w_bak if w_bak is not None else empty),
        _np_view(ms if ms is not None else empty),
        _np_view(v if v is not None else empty),
        _np_view(snap if snap is not None else empty),
        f32(lr),
        f32(consts[0]),
        f32(consts[1]),
        f32(consts[2]),
        f32(consts[3]),
        f32(consts[4]),
        f32(momentum),
        CHUNK,
    )


def update(
    mode: str,
    w: Tensor,
    g: Tensor,
    *,
    config: rules.RuleConfig,
    lr: float,
    w_bak: Tensor | None = None,
    ms: Tensor | None = None,
    momentum_buf: Tensor | None = None,
    count: int = 1,
    snapshot: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    g32: Tensor | None = None,
    fused: bool | None = None,
    staleness: int = 0,
    ring: rules.GradientRing | None = None,
) -> bool:
    """Apply ``mode``'s rule to ``w`` in place and, if ``snapshot`` is given, write the new ``w``
    into it (rounded to its dtype). Returns True if the fused kernel ran, False for the fallback.

    ``w``, ``ms``, ``momentum_buf``: 1-D float32, same length (``ms`` for dcasgd-a,
    ``momentum_buf`` when ``config.momentum > 0``). ``g``: float32, bfloat16 or float16; in
    sync mode the round's float32 sum of ``count`` gradients, zeroed on the way. ``w_bak``
    (DC modes): the worker's backup, float32 or the wire type; it must not alias ``w``.
    ``snapshot``: a buffer that nothing reads or sends until this returns. Fallback only:
    ``scratch`` (two float32 tensors like ``w``) and ``g32`` (one, to widen a half-size ``g``
    into). ``fused``: None takes the kernel when it is compiled, False the fallback, True the
    kernel (compiling it now if need be; RuntimeError if numba is missing). ``staleness``
    (dcasgd-s): the push's staleness, which sets its lambda_0. ``ring``: dcasgd-s with
    ``config.curvature == "fisher"``, or dcasgd-f (whose ring keeps its Gram matrix), the shard's
    last gradients (always the fallback: the fused kernel has no Fisher curvature).
    """
    if mode not in MODE_CODES and mode != "dcasgd-f":
        raise ValueError(f"Invalid mode: {mode!r}")
    if mode in rules.DC_MODES:
        if w_bak is None:
            raise ValueError(f"{mode} needs w_bak")
        if w_bak.data_ptr() == w.data_ptr() and w.numel() > 0:
            raise ValueError("w_bak aliases w: the compensation term would always be zero")
    else:
        w_bak = None
    if mode in MS_MODES and ms is None:
        raise ValueError(f"{mode} needs ms")
    momentum = config.momentum
    if momentum > 0.0 and momentum_buf is None:
        raise ValueError("momentum > 0 needs a momentum buffer")
    if mode == "sync":
        if g.dtype != torch.float32:
            raise ValueError("sync's gradient sum is float32")
        if count < 1:
            raise ValueError(f"a sync step needs at least one gradient, got {count}")
    if snapshot is not None and w.numel() > 0 and snapshot.data_ptr() in (w.data_ptr(), g.data_ptr()):
        raise ValueError("the snapshot buffer aliases w or g")
    sig = (
        mode,
        g.dtype,
        None if w_bak is None else w_bak.dtype,
        momentum > 0.0,
        snapshot.dtype if snapshot is not None else None,
    )
    if mode == "dcasgd-f" or (mode == "dcasgd-s" and config.curvature == "fisher"):
        if ring is None:
            raise ValueError(f"{mode} with the Fisher curvature needs a gradient ring")
        if fused:
            raise RuntimeError("the fused kernel has no Fisher curvature: curvature='fisher' runs the torch fallback")
        fused = False
    if fused is None:
        fused = ready(*sig[:3], momentum=sig[3], snapshot=sig[4])
    elif fused and not ready(*sig[:3], momentum=sig[3], snapshot=sig[4]):
        if not enabled():
            raise RuntimeError("the fused kernel is off (DCASGD_FUSED=0)")
        _compile([sig])
        if _failed is not None:
            raise RuntimeError(f"the fused kernel is unavailable: {_failed}")
    if fused:
        if mode == "dcasgd":
            consts = (config.lam, 0.0, 0.0, 0.0, 0.0)
        elif mode == "dcasgd-a":
            consts = (config.lam0, config.ms_decay, config.eps, 1.0 - config.ms_decay, 0.0)  # 1 - m rounded once
        elif mode == "dcasgd-s":
            lam_s = rules.staleness_lam0(config.lam0, staleness, config.staleness_power)
            bound = config.clip if config.clip > 0.0 else math.inf
            consts = (lam_s, config.ms_decay, config.eps, 1.0 - config.ms_decay, bound)
        elif mode == "sync":
            consts = (float(count), 0.0, 0.0, 0.0, 0.0)
        else:
            consts = (0.0, 0.0, 0.0, 0.0, 0.0)
        v = momentum_buf if momentum > 0.0 else None
        _run(MODE_CODES[mode], w, g, w_bak, ms, v, snapshot, lr, consts, momentum)
        return True
    _fallback(mode, w, g, config, lr, w_bak, ms, momentum_buf, count, scratch, g32, staleness, ring)
    if snapshot is not None:
        snapshot.copy_(w)
    return False


def _fallback(mode, w, g, config, lr, w_bak, ms, momentum_buf, count, scratch, g32, staleness=0, ring=None) -> None:
    """The rules' multi-pass torch versions (the numbers the kernel must give)."""
    r, momentum = config, config.momentum
    if mode == "sync":
        rules.ssgd_step(w, g, count, lr=lr, momentum=momentum, momentum_buf=momentum_buf)
        g.zero_()
        return
    if g.dtype != torch.float32:
        g = (g32 if g32 is not None else torch.empty(g.shape)).copy_(g)
    if mode == "async":
        rules.asgd_step(w, g, lr=lr, momentum=momentum, momentum_buf=momentum_buf)
    elif mode == "dcasgd":
        rules.dcasgd_step(w, g, w_bak, lr=lr, lam=r.lam, momentum=momentum, momentum_buf=momentum_buf, scratch=scratch)
    elif mode == "dcasgd-f":
        rules.dcasgd_fisher_capped_step(
            w,
            g,
            w_bak,
            ring,
            lr=lr,
            lam0=r.fisher_lam0,
            cap=r.fisher_cap,
            centered=r.fisher_centered,
            momentum=momentum,
            momentum_buf=momentum_buf,
            scratch=scratch,
        )
    elif mode == "dcasgd-s" and r.curvature == "fisher":
        rules.dcasgd_fisher_step(
            w,
            g,
            w_bak,
            ring,
            lr=lr,
            staleness=staleness,
            lam0=r.lam0,
            staleness_power=r.staleness_power,
            centered=r.fisher_centered,
            clip=r.clip,
            momentum=momentum,
            momentum_buf=momentum_buf,
            scratch=scratch,
        )
    elif mode == "dcasgd-s":
        rules.dcasgd_staleness_step(
            w,
            g,
            w_bak,
            ms,
            lr=lr,
            staleness=staleness,
            lam0=r.lam0,
            staleness_power=r.staleness_power,
            clip=r.clip,
            ms_decay=r.ms_decay,
            eps=r.eps,
            momentum=momentum,
            momentum_buf=momentum_buf,
            scratch=scratch,
        )
    else:
        rules.dcasgd_adaptive_step(
            w,
            g,
            w_bak,
            ms,
            lr=lr,
            lam0=r.lam0,
            ms_decay=r.ms_decay,
            eps=r.eps,
            momentum=momentum,
            momentum_buf=momentum_buf,
            scratch=scratch,
        )


# A DC rule squares the gradient (g*g, and DC-ASGD-a's mean square): beyond this magnitude the
# square overflows float32 (3.4e38) or comes within a factor of it, and the weights turn NaN.
GRADIENT_LIMIT = 1e18


def finite(g: Tensor, limit: float | None = None) -> bool:
    """Whether every element of ``g`` is finite (and, with ``limit``, at most that in magnitude).

    One min/max pass in ``g``'s own type (NaN propagates through it): about 1.3 ms for 10M
    floats here, where ``isfinite(g).all()`` takes about 50 ms. Exact, with no sum to overflow.
    """
    if g.numel() == 0:
        return True
    lo, hi = (float(v) for v in torch.aminmax(g))
    if limit is None:
        return math.isfinite(lo) and math.isfinite(hi)
    return -limit <= lo and hi <= limit  # False for NaN
