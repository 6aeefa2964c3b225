"""The numba half of :mod:`dcasgd.kernels`: the fused update kernel and the 16-bit conversions.

Imported only when numba is installed. Everything the kernel calls lives at module level, so
numba's on-disk cache recognizes the kernel in the next process (a helper defined inside a
function is hashed with the closure, and an ``@intrinsic`` hashes differently every time).
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

log = logging.getLogger("dcasgd.kernels")


def cache_ok(func) -> bool:
    """Whether numba can keep compiled code on disk for ``func`` (a read-only install cannot)."""
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(func)
    except RuntimeError as exc:  # no writable cache locator: compile on every start, still correct
        log.info("numba cannot cache the update kernel (%s); set NUMBA_CACHE_DIR to keep it", exc)
        return False
    return True


@intrinsic
def _fma(typingctx, a, b, c):
    """a*b + c rounded once: what torch's ``w.add_(d, alpha=-lr)`` computes (vectorized)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _bf16_to_f32(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _f32_to_bf16(f):
    # c10::BFloat16's round to nearest even (NaN: a quiet NaN)
    u = np.float32(f).view(np.uint32)
    if f != f:
        return np.uint16(0x7FC0)
    return np.uint16((u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16))


@njit  # not inline="always" (numba's IR inliner warns on its branches); LLVM inlines it
def _f16_to_f32(h):
    # exact: normals by shifting, subnormals renormalized through one float subtraction
    u = np.uint32(h) & np.uint32(0xFFFF)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    o = (u & np.uint32(0x7FFF)) << np.uint32(13)
    e = o & np.uint32(0x0F800000)
    o = o + np.uint32(112 << 23)
    if e == np.uint32(0x0F800000):  # Inf, NaN
        o = o + np.uint32(112 << 23)
    elif e == np.uint32(0):  # zero, subnormal
        o = np.float32(np.uint32(o + np.uint32(1 << 23)).view(np.float32) - np.float32(6.103515625e-05)).view(np.uint32)
    return np.uint32(o | sign).view(np.float32)


@njit(inline="always")
def _f32_to_f16(f):
    # the FP16 library's fp16_ieee_from_fp32_value (what c10::Half does): round to nearest even
    w = np.float32(f).view(np.uint32)
    base = (np.float32(abs(f)) * np.float32(5.192296858534828e33)) * np.float32(7.703719777548943e-34)
    shl1 = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1 & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(np.float32) + base
    bits = np.float32(base).view(np.uint32)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    if shl1 > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.int16(np.uint16((sign >> np.uint32(16)) | nonsign))


def _load(a, i):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


def _store(a, i, x):  # pragma: no cover
    raise NotImplementedError


@overload(_load, inline="always")
def _ol_load(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    return None


@overload(_store, inline="always")
def _ol_store(a, i, x):
    if a.dtype == types.float32:

        def st(a, i, x):
            a[i] = x

        return st
    if a.dtype == types.uint16:

        def st(a, i, x):
            a[i] = _f32_to_bf16(x)

        return st
    if a.dtype == types.int16:

        def st(a, i, x):
            a[i] = _f32_to_f16(x)

        return st
    return None


def make(mode: int, has_v: bool, has_snap: bool):
    """The kernel of one rule; ``mode``, ``has_v``, ``has_snap`` are compile-time constants."""

    def kernel(w, g, wb, ms, v, snap, lr, c1, c2, c3, c4, c5, mu, chunk):
        # mode 0 async, 1 dcasgd (c1 = lam), 2 dcasgd-a (c1 = lam0, c2 = m, c3 = eps, c4 = 1 - m),
        # 3 sync (g is the round's sum, c1 = count; g is zeroed on the way), 4 dcasgd-s (dcasgd-a's
        # constants, c1 the push's lambda_0; the compensation clipped to c5*|g|, c5 = inf: no clip).
        # The last step is one fused multiply-add, as in the fallback: the same w, bit for bit, where d is.
        n = w.shape[0]
        tasks = (n + chunk - 1) // chunk
        for t in prange(tasks):
            lo = t * chunk
            hi = min(lo + chunk, n)
            # Views of the chunk, indexed from 0: the inner loop then vectorizes.
            w_, g_ = w[lo:hi], g[lo:hi]
            wb_ = wb[lo:hi] if mode == 1 or mode == 2 or mode == 4 else wb
            ms_ = ms[lo:hi] if mode == 2 or mode == 4 else ms
            v_ = v[lo:hi] if has_v else v
            s_ = snap[lo:hi] if has_snap else snap
            for i in range(hi - lo):
                gi = _load(g_, i)
                wi = w_[i]
                if mode == 0:
                    d = gi
                elif mode == 1:
                    d = gi + c1 * (gi * gi * (wi - _load(wb_, i)))
                elif mode == 2:
                    gg = gi * gi
                    m = c2 * ms_[i] + c4 * gg
                    ms_[i] = m
                    d = gi + (c1 / np.sqrt(m + c3)) * (gg * (wi - _load(wb_, i)))
                elif mode == 4:
                    gg = gi * gi
                    m = c2 * ms_[i] + c4 * gg
                    ms_[i] = m
                    c = (c1 / np.sqrt(m + c3)) * (gg * (wi - _load(wb_, i)))
                    bound = c5 * abs(gi)
                    if c > bound:  # comparisons, not min/max: a NaN stays NaN, as in torch.minimum
                        c = bound
                    elif c < -bound:
                        c = -bound
                    d = gi + c
                else:
                    d = gi / c1
                    _store(g_, i, np.float32(0.0))
                if has_v:
                    d = mu * v_[i] + d
                    v_[i] = d
                wi = _fma(-lr, d, wi)
                w_[i] = wi
                if has_snap:
                    _store(s_, i, wi)

    return njit(parallel=True, cache=cache_ok(kernel), nogil=True)(kernel)
