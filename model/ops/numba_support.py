"""What every numba kernel of ``model.ops`` shares: the compile flags, a vectorisable exp,
tanh and sigmoid built on it, and the partition of work items among threads.

numba is optional at run time: without it ``available()`` is False, ``njit`` leaves a
function as it is (never called), and each op falls back to its torch loop.

The exponential is Cephes' polynomial with the power of two built from its bits:
numba's own ``exp`` is a scalar call, torch's is vectorised but costs a pass over memory
and a torch call. It is within 1 ulp of ``math.exp`` on [-87.3, 88.3] in fp32 (2.2e-16
relative in fp64), 0 below (the result would be subnormal; torch flushes those too under
``set_flush_denormal``), inf above, NaN for NaN. tanh is Cephes' tanhf/tanh: a polynomial
(fp32) or rational function (fp64) below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above, so it
keeps its relative precision near 0; sigmoid is 1 / (1 + exp(-x)).

Kernels take numpy views of tensors (``as_numpy``) and run one partition of their work
items per thread (``bounds``, ``threads``, ``launch``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

try:  # optional at run time: without numba, every op runs its torch loop instead
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

FLAGS = {"reassoc", "contract"}
"""Reassociation (so sums over channels vectorise) and fused multiply-adds, but not
fastmath's no-NaN/no-inf assumptions: a non-finite kernel result must stay non-finite for
the guard."""


def njit(**options):
    """numba.njit where numba is installed; elsewhere the plain function, never called."""
    return numba.njit(**options) if numba is not None else (lambda fn: fn)


def available() -> bool:
    """Whether numba can be imported (the kernels compile on first use)."""
    return numba is not None


# ---------------------------------------------------------------------------------------
# exp, tanh and sigmoid (numpy scalars in, compiled inline into the kernels)
# ---------------------------------------------------------------------------------------

_F32 = np.float32
_LO32, _HI32 = _F32(-87.33654475), _F32(88.3762626647949)  # exp: least normal, Cephes' MAXLOGF
_LOG2E32, _HALF32, _ONE32, _ZERO32, _INF32 = _F32(1.4426950408889634), _F32(0.5), _F32(1), _F32(0), _F32(np.inf)
_LN2_HI32, _LN2_LO32 = _F32(0.693359375), _F32(-2.12194440e-4)  # ln 2 = hi + lo (Cody-Waite)
_P32 = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1))  # Cephes expf
_P32_0, _P32_1, _P32_2, _P32_3, _P32_4, _P32_5 = _P32
_LO64, _HI64, _LOG2E64 = -745.2, 709.782712893384, 1.4426950408889634  # HI: log of the largest double
_LN2_HI64, _LN2_LO64 = 6.93145751953125e-1, 1.42860682030941723212e-6
# 1/i! for i = 2..13: on |r| <= ln(2)/2 the Taylor remainder is below 1e-17
(_T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9, _T10, _T11, _T12, _T13) = (1 / math.factorial(i) for i in range(2, 14))


def exp(x):
    """exp(x) in compiled code (``_exp_impl``: vectorisable, see the module docstring); the
    plain function elsewhere."""
    return math.exp(x)


if numba is not None:

    @intrinsic
    def _pow2(typingctx, k):
        """2**k for a float k holding a small integer, from its bits: float32 or float64."""
        if k not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            wide = signature.args[0] == types.float64
            it = ir.IntType(64 if wide else 32)
            bits = builder.add(builder.fptosi(args[0], it), ir.Constant(it, 1023 if wide else 127))
            bits = builder.shl(bits, ir.Constant(it, 52 if wide else 23))
            return builder.bitcast(bits, ir.DoubleType() if wide else ir.FloatType())

        return k(k), codegen

    @numba.njit(fastmath=FLAGS, inline="always")
    def _exp32(x):  # pragma: no cover - compiled
        xc = min(max(x, _LO32), _HI32)
        k = np.floor(xc * _LOG2E32 + _HALF32)
        r = xc - k * _LN2_HI32 - k * _LN2_LO32
        p = ((((_P32_0 * r + _P32_1) * r + _P32_2) * r + _P32_3) * r + _P32_4) * r + _P32_5
        res = (p * r * r + r + _ONE32) * _pow2(k)
        res = _ZERO32 if x < _LO32 else res
        res = _INF32 if x > _HI32 else res
        return res if x == x else x

    @numba.njit(fastmath=FLAGS, inline="always")
    def _exp64(x):  # pragma: no cover - compiled
        xc = min(max(x, _LO64), _HI64)
        k = np.floor(xc * _LOG2E64 + 0.5)
        r = xc - k * _LN2_HI64 - k * _LN2_LO64
        p = (((((((((((_T13 * r + _T12) * r + _T11) * r + _T10) * r + _T9) * r + _T8) * r + _T7) * r + _T6) * r
                 + _T5) * r + _T4) * r + _T3) * r + _T2)
        half = np.floor(k * 0.5)  # two powers of two: subnormal results stay exact in fp64
        res = (p * r * r + r + 1.0) * _pow2(half) * _pow2(k - half)
        res = 0.0 if x < _LO64 else res
        res = np.inf if x > _HI64 else res
        return res if x == x else x

    @overload(exp, inline="always", jit_options={"fastmath": FLAGS})
    def _exp_impl(x):
        if x == types.float32:
            return lambda x: _exp32(x)
        if x == types.float64:
            return lambda x: _exp64(x)
        return None


_TWO32, _SMALL32 = _F32(2), _F32(0.625)
_T32 = tuple(_F32(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
                               -3.33332819422e-1))  # Cephes tanhf, |x| < 0.625
_T32_0, _T32_1, _T32_2, _T32_3, _T32_4 = _T32
# Cephes tanh (fp64), |x| < 0.625: x + x s P(s) / Q(s), s = x^2, Q monic
_TP0, _TP1, _TP2 = -9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3
_TQ0, _TQ1, _TQ2 = 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3


def tanh(x):
    """tanh(x) in compiled code (``_tanh_impl``)."""
    return np.tanh(x)


def sigmoid(x):
    """1 / (1 + exp(-x)) in compiled code."""
    return 1 / (1 + np.exp(-x))


if numba is not None:
    @numba.njit(fastmath=FLAGS, inline="always")
    def _tanh32(x):  # pragma: no cover - compiled
        z = abs(x)
        big = _ONE32 - _TWO32 / (exp(z + z) + _ONE32)
        big = -big if x < _ZERO32 else big
        s = x * x
        small = ((((_T32_0 * s + _T32_1) * s + _T32_2) * s + _T32_3) * s + _T32_4) * s * x + x
        return big if z > _SMALL32 else small  # NaN: the comparison fails, and small is NaN

    @numba.njit(fastmath=FLAGS, inline="always")
    def _tanh64(x):  # pragma: no cover - compiled
        z = abs(x)
        big = 1.0 - 2.0 / (exp(z + z) + 1.0)
        big = -big if x < 0.0 else big
        s = x * x
        small = x + x * s * (((_TP0 * s + _TP1) * s + _TP2) / (((s + _TQ0) * s + _TQ1) * s + _TQ2))
        return big if z > 0.625 else small

    @overload(tanh, inline="always", jit_options={"fastmath": FLAGS})
    def _tanh_impl(x):
        if x == types.float32:
            return lambda x: _tanh32(x)
        if x == types.float64:
            return lambda x: _tanh64(x)
        return None

    @overload(sigmoid, inline="always", jit_options={"fastmath": FLAGS})
    def _sigmoid_impl(x):
        if x in (types.float32, types.float64):
            one = np.float32(1) if x == types.float32 else 1.0
            return lambda x: one / (one + exp(-x))
        return None


# ---------------------------------------------------------------------------------------
# Work items and threads
# ---------------------------------------------------------------------------------------


@njit(inline="always")
def bounds(p: int, parts: int, count: int) -> tuple[int, int]:
    """The work items [lo, hi) of partition ``p`` of ``parts``, out of ``count``."""
    return p * count // parts, (p + 1) * count // parts


def threads(items: int) -> int:
    """Threads for ``items`` work items: torch's thread count, at most numba's."""
    return max(1, min(items, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def launch(part, kernel, parts: int, *args) -> None:
    """Run ``part`` over ``parts`` partitions: in this thread when there is one, else on
    numba's threads through ``kernel`` (a ``prange`` over ``part``). One partition never
    enters numba's parallel launch: its end barrier waits for every worker thread to be
    scheduled, which on cores that other jobs share cost 20-30 ms a call (a phase-3 scan's
    forward and backward took 0.5 s instead of 0.055 s with one torch thread and numba's
    default two)."""
    if parts == 1:
        part(0, 1, *args)
    else:
        kernel(parts, *args)


def as_numpy(t: Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy()
