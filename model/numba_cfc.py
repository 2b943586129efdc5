"""The CfC recurrence's CPU kernels: every token of a sequence in one compiled loop, with numba.

``model.liquid._CfCScan`` folds the default-mode, one-layer CfC step into

    a_t = tanh(zx'_t + m_{t-1} w_mt)      (b k)
    s_t = sigmoid(b' + a_t w_pt)          (b 3q)   ff1 | ff2 | time gate
    m_t = lerp(s_t1, s_t2, s_t3)          (b q)

(its docstring has the folding). Its torch path runs that as five kernels a token and the
backward's reverse loop as three, each a product of a few rows (the batch) by a small
matrix. At b4 and q = k = 64…128 every one of them costs more in dispatch and in the BLAS's
set-up than in arithmetic, and a second thread only adds a fork and a join to each: at two
threads the loops ran no faster than at one (phase 3: 19.5 against 19.2 ms a layer, forward
and backward), while the Transformer beside them ran 1.75x faster. The rows of the batch are
independent recurrences, so here each thread takes whole rows and runs them token after
token with no synchronisation between tokens; a row's state (q numbers) and one token's
activations stay in registers and L1, the weights (at most a few hundred KB) in L2.

``cfc_forward`` and ``cfc_backward`` do exactly what the torch loops of ``_CfCScan`` do, on
the same time-major buffers (l b ...), so everything around them (the folding, the weight
gradients batched over tokens) is shared. tanh and sigmoid are computed inside the loops
from ``model.numba_scan._exp`` (vectorisable; numba's own are scalar calls), tanh as Cephes'
tanhf/tanh: a polynomial (fp32) or rational function (fp64) below |x| = 0.625, 1 - 2 /
(exp(2|x|) + 1) above, so it keeps its relative precision near 0. NaN stays NaN.

Shape letters: l length, b batch, k backbone units, q liquid units, p threads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from model.numba_scan import _FLAGS, _bounds, _exp, _launch, _njit, _np, _parts, available, numba

_F32 = np.float32
_ONE32, _TWO32, _ZERO32, _SMALL32 = _F32(1), _F32(2), _F32(0), _F32(0.625)
_T32 = tuple(_F32(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
                               -3.33332819422e-1))  # Cephes tanhf, |x| < 0.625
_T32_0, _T32_1, _T32_2, _T32_3, _T32_4 = _T32
# Cephes tanh (fp64), |x| < 0.625: x + x s P(s) / Q(s), s = x^2, Q monic
_TP0, _TP1, _TP2 = -9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3
_TQ0, _TQ1, _TQ2 = 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3


def _tanh(x):
    """tanh(x) in compiled code (``_tanh_impl``)."""
    return np.tanh(x)


def _sigmoid(x):
    """1 / (1 + exp(-x)) in compiled code."""
    return 1 / (1 + np.exp(-x))


if numba is not None:
    from numba.core import types
    from numba.extending import overload

    @numba.njit(fastmath=_FLAGS, inline="always")
    def _tanh32(x):  # pragma: no cover - compiled
        z = abs(x)
        big = _ONE32 - _TWO32 / (_exp(z + z) + _ONE32)
        big = -big if x < _ZERO32 else big
        s = x * x
        small = ((((_T32_0 * s + _T32_1) * s + _T32_2) * s + _T32_3) * s + _T32_4) * s * x + x
        return big if z > _SMALL32 else small  # NaN: the comparison fails, and small is NaN

    @numba.njit(fastmath=_FLAGS, inline="always")
    def _tanh64(x):  # pragma: no cover - compiled
        z = abs(x)
        big = 1.0 - 2.0 / (_exp(z + z) + 1.0)
        big = -big if x < 0.0 else big
        s = x * x
        small = x + x * s * (((_TP0 * s + _TP1) * s + _TP2) / (((s + _TQ0) * s + _TQ1) * s + _TQ2))
        return big if z > 0.625 else small

    @overload(_tanh, inline="always", jit_options={"fastmath": _FLAGS})
    def _tanh_impl(x):
        if x == types.float32:
            return lambda x: _tanh32(x)
        if x == types.float64:
            return lambda x: _tanh64(x)
        return None

    @overload(_sigmoid, inline="always", jit_options={"fastmath": _FLAGS})
    def _sigmoid_impl(x):
        if x in (types.float32, types.float64):
            one = np.float32(1) if x == types.float32 else 1.0
            return lambda x: one / (one + _exp(-x))
        return None


@_njit(fastmath=_FLAGS, error_model="numpy", cache=True, nogil=True)
def _forward_part(p, parts, m0, w_mt, w_pt, acts, sigs, m_all):  # pragma: no cover - compiled
    """Rows [r0, r1) of the batch: acts (l b k) holds zx' and sigs (l b 3q) the bias on entry;
    on return acts holds a_t, sigs s_t and m_all (l b q) m_t."""
    l, b, k = acts.shape
    q = m0.shape[1]
    r0, r1 = _bounds(p, parts, b)
    m = np.empty(q, dtype=m0.dtype)
    for r in range(r0, r1):
        m[:] = m0[r]
        for t in range(l):
            a = acts[t, r]
            for i in range(q):
                mi, w = m[i], w_mt[i]
                for j in range(k):
                    a[j] += mi * w[j]
            for j in range(k):
                a[j] = _tanh(a[j])
            s = sigs[t, r]
            for j in range(k):
                aj, w = a[j], w_pt[j]
                for c in range(3 * q):
                    s[c] += aj * w[c]
            for c in range(3 * q):
                s[c] = _sigmoid(s[c])
            mt = m_all[t, r]
            for c in range(q):
                f1 = s[c]
                m[c] = f1 + s[2 * q + c] * (s[q + c] - f1)
                mt[c] = m[c]


@_njit(fastmath=_FLAGS, error_model="numpy", cache=True, nogil=True)
def _backward_part(p, parts, one, w_p, w_m, acts, sigs, gms, dp_all, dz_all):  # pragma: no cover - compiled
    """Rows [r0, r1): gms (l b q) holds dL/dm_t from the outputs on entry, and each token's
    slot is completed with the carry from the next before its turn; writes dL/dp_t into
    dp_all (l b 3q) and dL/d(zx'_t) into dz_all (l b k). ``one``: 1 in the buffers' dtype, so
    fp32 arithmetic stays fp32 (an integer literal would promote it to fp64)."""
    l, b, k = acts.shape
    q = gms.shape[2]
    r0, r1 = _bounds(p, parts, b)
    for r in range(r0, r1):
        for t in range(l - 1, -1, -1):
            gm, s, dp = gms[t, r], sigs[t, r], dp_all[t, r]
            for c in range(q):  # lerp's partials times sigmoid's
                s1, s2, g = s[c], s[q + c], s[2 * q + c]
                gc = gm[c]
                dp[c] = (one - g) * s1 * (one - s1) * gc
                dp[q + c] = g * s2 * (one - s2) * gc
                dp[2 * q + c] = (s2 - s1) * g * (one - g) * gc
            dz, a = dz_all[t, r], acts[t, r]
            for j in range(k):
                dz[j] = 0
            for c in range(3 * q):
                dc, w = dp[c], w_p[c]
                for j in range(k):
                    dz[j] += dc * w[j]
            for j in range(k):
                dz[j] *= one - a[j] * a[j]
            if t > 0:
                prev = gms[t - 1, r]
                for j in range(k):
                    dj, w = dz[j], w_m[j]
                    for c in range(q):
                        prev[c] += dj * w[c]


@_njit(parallel=True, cache=True, nogil=True)
def _forward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _forward_part(p, parts, *args)


@_njit(parallel=True, cache=True, nogil=True)
def _backward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _backward_part(p, parts, *args)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: numba importable, CPU, fp32 or fp64 alike."""
    return (available() and all(t.device.type == "cpu" for t in tensors)
            and tensors[0].dtype in (torch.float32, torch.float64)
            and all(t.dtype == tensors[0].dtype for t in tensors))


def cfc_forward(m0: Tensor, w_mt: Tensor, w_pt: Tensor, acts: Tensor, sigs: Tensor, m_all: Tensor) -> None:
    """The forward loop of ``_CfCScan``, in place: m0 (b q), w_mt (q k), w_pt (k 3q), and the
    contiguous time-major buffers acts (l b k) = zx', sigs (l b 3q) = bias, m_all (l b q).
    The batch's rows are the work items (``_parts``: at most torch's threads)."""
    _launch(_forward_part, _forward_kernel, _parts(acts.shape[1]), _np(m0.contiguous()), _np(w_mt), _np(w_pt),
            _np(acts), _np(sigs), _np(m_all))


def cfc_backward(w_p: Tensor, w_m: Tensor, acts: Tensor, sigs: Tensor, gms: Tensor, dp_all: Tensor,
                 dz_all: Tensor) -> None:
    """The backward loop of ``_CfCScan``, in place: w_p (3q k), w_m (k q), the saved acts
    (l b k) and sigs (l b 3q), gms (l b q) = dL/dm_t from the outputs; fills dp_all (l b 3q)
    and dz_all (l b k) and completes gms."""
    one = np.float32(1) if acts.dtype == torch.float32 else 1.0
    _launch(_backward_part, _backward_kernel, _parts(acts.shape[1]), one, _np(w_p), _np(w_m), _np(acts),
            _np(sigs), _np(gms), _np(dp_all), _np(dz_all))
