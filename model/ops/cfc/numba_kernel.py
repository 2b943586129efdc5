"""The CfC recurrence's CPU kernels: every token of a sequence in one compiled loop, with numba.

``interface._CfCScan`` folds the default-mode, one-layer CfC step into

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

``cfc_forward`` and ``cfc_backward`` do exactly what the torch loops (``torch_loop``) do, on
the same time-major buffers (l b ...), so everything around them (the folding, the weight
gradients batched over tokens) is shared. tanh and sigmoid are ``model.ops.numba_support``'s,
built on its vectorisable exp (numba's own are scalar calls). NaN stays NaN.

Shape letters: l length, b batch, k backbone units, q liquid units, p threads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from model.ops.numba_support import FLAGS, as_numpy, available, bounds, launch, njit, numba, sigmoid, tanh, threads


@njit(fastmath=FLAGS, error_model="numpy", cache=True, nogil=True)
def _forward_part(p, parts, m0, w_mt, w_pt, acts, sigs, m_all):  # pragma: no cover - compiled
    """Rows [r0, r1) of the batch: acts (l b k) holds zx' and sigs (l b 3q) the bias on entry;
    on return acts holds a_t, sigs s_t and m_all (l b q) m_t."""
    l, b, k = acts.shape
    q = m0.shape[1]
    r0, r1 = bounds(p, parts, b)
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
                a[j] = tanh(a[j])
            s = sigs[t, r]
            for j in range(k):
                aj, w = a[j], w_pt[j]
                for c in range(3 * q):
                    s[c] += aj * w[c]
            for c in range(3 * q):
                s[c] = sigmoid(s[c])
            mt = m_all[t, r]
            for c in range(q):
                f1 = s[c]
                m[c] = f1 + s[2 * q + c] * (s[q + c] - f1)
                mt[c] = m[c]


@njit(fastmath=FLAGS, error_model="numpy", cache=True, nogil=True)
def _backward_part(p, parts, one, w_p, w_m, acts, sigs, gms, dp_all, dz_all):  # pragma: no cover - compiled
    """Rows [r0, r1): gms (l b q) holds dL/dm_t from the outputs on entry, and each token's
    slot is completed with the carry from the next before its turn; writes dL/dp_t into
    dp_all (l b 3q) and dL/d(zx'_t) into dz_all (l b k). ``one``: 1 in the buffers' dtype, so
    fp32 arithmetic stays fp32 (an integer literal would promote it to fp64)."""
    l, b, k = acts.shape
    q = gms.shape[2]
    r0, r1 = bounds(p, parts, b)
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


@njit(parallel=True, cache=True, nogil=True)
def _forward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _forward_part(p, parts, *args)


@njit(parallel=True, cache=True, nogil=True)
def _backward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _backward_part(p, parts, *args)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: numba importable, CPU, fp32 or fp64 alike."""
    return (available() and all(t.device.type == "cpu" for t in tensors)
            and tensors[0].dtype in (torch.float32, torch.float64)
            and all(t.dtype == tensors[0].dtype for t in tensors))


def cfc_forward(m0: Tensor, w_mt: Tensor, w_pt: Tensor, acts: Tensor, sigs: Tensor, m_all: Tensor) -> None:
    """The forward loop of ``interface._CfCScan``, in place: m0 (b q), w_mt (q k), w_pt (k 3q), and the
    contiguous time-major buffers acts (l b k) = zx', sigs (l b 3q) = bias, m_all (l b q).
    The batch's rows are the work items (``threads``: at most torch's threads)."""
    launch(_forward_part, _forward_kernel, threads(acts.shape[1]), as_numpy(m0.contiguous()), as_numpy(w_mt),
           as_numpy(w_pt), as_numpy(acts), as_numpy(sigs), as_numpy(m_all))


def cfc_backward(w_p: Tensor, w_m: Tensor, acts: Tensor, sigs: Tensor, gms: Tensor, dp_all: Tensor,
                 dz_all: Tensor) -> None:
    """The backward loop of ``interface._CfCScan``, in place: w_p (3q k), w_m (k q), the saved acts
    (l b k) and sigs (l b 3q), gms (l b q) = dL/dm_t from the outputs; fills dp_all (l b 3q)
    and dz_all (l b k) and completes gms."""
    one = np.float32(1) if acts.dtype == torch.float32 else 1.0
    launch(_backward_part, _backward_kernel, threads(acts.shape[1]), one, as_numpy(w_p), as_numpy(w_m),
           as_numpy(acts), as_numpy(sigs), as_numpy(gms), as_numpy(dp_all), as_numpy(dz_all))
