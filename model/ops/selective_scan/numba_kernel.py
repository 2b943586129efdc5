"""The selective scan's CPU kernel: the whole recurrence in one compiled pass, with numba.

    dt_t = softplus(delta_t + bias),   a_t = exp(dt_t A)          (per channel, state n)
    x_t = a_t * x_{t-1} + dt_t u_t B_t,   y_t = <x_t, C_t>
    out_t = (y_t + D u_t) * silu(z_t)

``numba_selective_scan`` is ``selective_scan(..., impl="numba")``'s work (``interface``);
``reference.selective_scan_ref`` is its oracle. ``scan_forward`` and ``scan_backward`` take the
(b l e) layout the kernels run on, for a caller that already holds it.

The kernels run on the (b l e) layout, channels innermost, and vectorise across channels:
a block of k channels of one sequence keeps its states (n k) in cache for the whole
sequence, and every step is, for each of the n states, one loop over the k channels.
(The first kernel vectorised over the n = 16 states of one channel; its loops stayed
scalar and its backward ran at about 1.8 ns an element and thread, this one's at 0.5.)
Nothing of size (b e n l) is kept: the forward writes ``out`` and the last state, the
backward saves only the inputs, as mamba-ssm's kernel does, recomputes each block's
states and decays into a per-thread buffer and runs the adjoint g_t = dL/dx_t backwards,
from which every gradient follows in the same pass.

The decays exp(dt A) are computed inside the loops by ``model.ops.numba_support.exp``, a
vectorisable exponential: torch's is vectorised too but would cost a pass over (k l n)
memory and a torch call per block.

Why numba: the scan is a chain of tiny dependent steps, about 12 torch kernels per token
for forward and backward, each a full pass over (b e n). A compiled loop does the whole
chain in registers and cache. numba is the well-kept way to compile such a loop at run
time with nothing but pip-installed packages (a C++ extension would need a minute of g++
against torch's headers on every fresh machine). softplus and silu(z) are torch calls,
transient, around the kernels.

Shape letters:
    b  batch
    e  channels (d_inner)
    n  state size per channel
    l  sequence length
    g  groups of channels sharing one B or C; h = e // g channels a group
    k  channels in one block (a work item is one sequence's block)
    p  threads (partitions of the work items)

B and C reach the kernel as ``rows`` (rows, T, n) with T = l (time-varying) or T = 1
(constant), and channel j of sequence i reads row i * row_batch + j // row_group at time
t * t_step. Constant (e n) is rows = e, row_batch = 0, row_group = 1, t_step = 0; grouped
(b g n l) is rows = b g, row_batch = g, row_group = h, t_step = 1; variable (b n l) is
grouped with g = 1. A block never straddles two rows, so inside a block B_t and C_t are n
numbers shared by its channels (constant B or C: blocks of one channel, scalar loops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops.numba_support import FLAGS, as_numpy, bounds, exp, launch, njit, numba, threads
from model.ops.op_support import Recurrence

# Elements of one block's buffers (l n k), per buffer: 2 MB of fp32. The backward keeps
# two (states and decays), about the L2 cache of one core; measured at b4 e512 n16 l256,
# blocks of 32, 64, 128 and 256 channels took 14, 13, 12 and 11 ms forward and backward.
_BLOCK_ELEMS = 1 << 19
_MAX_BLOCK = 256
# The forward keeps only a block's states (n k), so its blocks are as wide as allowed: at
# b8 e512 n32 l256, two threads, blocks of 32, 64, 128 and 256 channels took 16.6, 13.6,
# 12.6 and 11.3 ms (4.0, 3.5 and 3.3 ms for 64, 128 and 256 at b4 n16). The backward's
# buffers set its width (at b8 n32: 64 channels 22.7 ms, 32 28.6, 128 28.9).
_FORWARD_BLOCK = _MAX_BLOCK

# ---------------------------------------------------------------------------------------
# The kernels (numpy arrays in, compiled once per dtype and cached on disk)
# ---------------------------------------------------------------------------------------

# Every loop that must vectorise runs over the channels of a block, and writes only arrays
# that are not read through another view of the same allocation: LLVM vectorises a loop
# whose arrays may alias only when it can check the overlap at run time, which it cannot
# for two views of one buffer (a state x_t written while x_{t-1} is read from the same
# (l n k) buffer kept the first draft of the backward scalar).


@njit(fastmath=FLAGS, cache=True, nogil=True)
def _forward_part(p, parts, items, kmax, u, dt, At, Bk, b_batch, b_group, b_step, Ck, c_batch, c_group, c_step,
                  D, gate, has_D, has_z, out, last):  # pragma: no cover - compiled
    l, n = u.shape[1], At.shape[0]
    x = np.empty((n, kmax), dtype=u.dtype)  # the block's states
    y = np.empty(kmax, dtype=u.dtype)
    w = np.empty(kmax, dtype=u.dtype)  # dt_t u_t
    lo, hi = bounds(p, parts, items.shape[0])
    for item in range(lo, hi):
        i, c0, c1 = items[item, 0], items[item, 1], items[item, 2]
        k = c1 - c0
        B_i, C_i = Bk[i * b_batch + c0 // b_group], Ck[i * c_batch + c0 // c_group]  # (T n)
        x[:, :k] = 0
        for t in range(l):
            u_t, dt_t, b_t, c_t = u[i, t, c0:c1], dt[i, t, c0:c1], B_i[t * b_step], C_i[t * c_step]
            for c in range(k):
                w[c] = dt_t[c] * u_t[c]
                y[c] = 0
            for m in range(n):
                bm, cm, x_m, A_m = b_t[m], c_t[m], x[m], At[m, c0:c1]
                for c in range(k):
                    v = exp(dt_t[c] * A_m[c]) * x_m[c] + w[c] * bm
                    x_m[c] = v
                    y[c] += v * cm
            out_t = out[i, t, c0:c1]
            if has_D:
                for c in range(k):
                    y[c] += D[c0 + c] * u_t[c]
            if has_z:
                gate_t = gate[i, t, c0:c1]
                for c in range(k):
                    out_t[c] = y[c] * gate_t[c]
            else:
                out_t[:] = y[:k]
        for m in range(n):
            for c in range(k):
                last[i, c0 + c, m] = x[m, c]


@njit(fastmath=FLAGS, cache=True, nogil=True)
def _recompute(i, c0, c1, u, dt, At, B_i, b_step, C_i, c_step, x, w, xs, decay, ys):  # pragma: no cover
    """One block's states xs (l+1 n k), decays (l n k) and y (l k), from a zero state."""
    l, n = u.shape[1], At.shape[0]
    k = c1 - c0
    x[:, :k] = 0
    xs[0, :, :k] = 0
    for t in range(l):
        u_t, dt_t, b_t, c_t, y_t = u[i, t, c0:c1], dt[i, t, c0:c1], B_i[t * b_step], C_i[t * c_step], ys[t]
        for c in range(k):
            w[c] = dt_t[c] * u_t[c]
            y_t[c] = 0
        for m in range(n):
            bm, cm, x_m, xs_m, a_m, A_m = b_t[m], c_t[m], x[m], xs[t + 1, m], decay[t, m], At[m, c0:c1]
            for c in range(k):
                a = exp(dt_t[c] * A_m[c])
                a_m[c] = a
                v = a * x_m[c] + w[c] * bm
                x_m[c] = v
                xs_m[c] = v
                y_t[c] += v * cm


@njit(fastmath=FLAGS, cache=True, nogil=True)
def _backward_part(p, parts, items, kmax, u, dt, At, Bk, b_batch, b_group, b_step, Ck, c_batch, c_group, c_step,
                   D, gate, dgate, has_D, has_z, dout, dlast, want_out,
                   du, ddt, dA, dB, dC, dD, dz, out):  # pragma: no cover - compiled
    l, n = u.shape[1], At.shape[0]
    dtype = u.dtype
    xs = np.empty((l + 1, n, kmax), dtype=dtype)  # xs[t + 1] = x_t; xs[0] = x_{-1} = 0
    decay = np.empty((l, n, kmax), dtype=dtype)
    ys = np.empty((l, kmax), dtype=dtype)  # y_t, then dL/dy_t (y the scan's output before skip and gate)
    x = np.empty((n, kmax), dtype=dtype)
    g = np.empty((n, kmax), dtype=dtype)  # the adjoint, then a_t g_t: what reaches x_{t-1}
    dA_k = np.empty((n, kmax), dtype=dtype)
    w = np.empty(kmax, dtype=dtype)
    gB = np.empty(kmax, dtype=dtype)  # <g_t, B_t>
    dlogA = np.empty(kmax, dtype=dtype)  # sum_m dL/d(dt_t A_m) A_m
    dA_p, dB_p, dC_p, dD_p = dA[p], dB[p], dC[p], dD[p]  # this thread's partial sums
    zero = np.zeros(1, dtype=dtype)[0]
    lo, hi = bounds(p, parts, items.shape[0])
    for item in range(lo, hi):
        i, c0, c1 = items[item, 0], items[item, 1], items[item, 2]
        k = c1 - c0
        rb, rc = i * b_batch + c0 // b_group, i * c_batch + c0 // c_group
        B_i, C_i, dB_i, dC_i = Bk[rb], Ck[rc], dB_p[rb], dC_p[rc]  # (T n)
        _recompute(i, c0, c1, u, dt, At, B_i, b_step, C_i, c_step, x, w, xs, decay, ys)
        for t in range(l):  # through the skip and the gate: dL/dy_t, dL/dz_t, dL/dD, the output
            u_t, dout_t, y_t = u[i, t, c0:c1], dout[i, t, c0:c1], ys[t]
            if has_D:
                for c in range(k):
                    w[c] = y_t[c] + D[c0 + c] * u_t[c]
            else:
                w[:k] = y_t[:k]
            if has_z:
                gate_t, dgate_t, dz_t = gate[i, t, c0:c1], dgate[i, t, c0:c1], dz[i, t, c0:c1]
                for c in range(k):
                    dz_t[c] = dout_t[c] * w[c] * dgate_t[c]
                    y_t[c] = dout_t[c] * gate_t[c]
                if want_out:
                    out_t = out[i, t, c0:c1]
                    for c in range(k):
                        out_t[c] = w[c] * gate_t[c]
            else:
                y_t[:k] = dout_t
                if want_out:
                    out[i, t, c0:c1] = w[:k]
            if has_D:
                for c in range(k):
                    dD_p[c0 + c] += y_t[c] * u_t[c]
        for m in range(n):
            for c in range(k):
                g[m, c] = dlast[i, c0 + c, m]
        dA_k[:, :k] = 0
        for t in range(l - 1, -1, -1):  # the adjoint, backwards, and every gradient from it
            u_t, dt_t, dy_t, b_t, c_t = u[i, t, c0:c1], dt[i, t, c0:c1], ys[t], B_i[t * b_step], C_i[t * c_step]
            for c in range(k):
                w[c] = dt_t[c] * u_t[c]
                gB[c] = 0
                dlogA[c] = 0
            for m in range(n):
                bm, cm = b_t[m], c_t[m]
                g_m, x_prev, x_m, a_m, A_m, dA_m = g[m], xs[t, m], xs[t + 1, m], decay[t, m], At[m, c0:c1], dA_k[m]
                db, dc = zero, zero
                for c in range(k):
                    g_c = g_m[c] + dy_t[c] * cm  # dL/dx_t
                    gB[c] += g_c * bm
                    db += g_c * w[c]
                    dc += dy_t[c] * x_m[c]
                    carry = a_m[c] * g_c
                    dlog = carry * x_prev[c]  # dL/d(dt_t A_m)
                    dlogA[c] += dlog * A_m[c]
                    dA_m[c] += dlog * dt_t[c]
                    g_m[c] = carry
                dB_i[t * b_step, m] += db
                dC_i[t * c_step, m] += dc
            du_t, ddt_t = du[i, t, c0:c1], ddt[i, t, c0:c1]
            for c in range(k):
                du_t[c] = gB[c] * dt_t[c]
                ddt_t[c] = dlogA[c] + gB[c] * u_t[c]
            if has_D:
                for c in range(k):
                    du_t[c] += dy_t[c] * D[c0 + c]
        for m in range(n):
            dA_pm = dA_p[m, c0:c1]
            for c in range(k):
                dA_pm[c] += dA_k[m, c]


@njit(parallel=True, cache=True, nogil=True)
def _forward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _forward_part(p, parts, *args)


@njit(parallel=True, cache=True, nogil=True)
def _backward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _backward_part(p, parts, *args)


# ---------------------------------------------------------------------------------------
# B and C as rows, work items
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """B or C as (rows, T, n) with the indexing of the module docstring."""

    t: Tensor
    batch: int
    group: int
    step: int

    @staticmethod
    def of(X: Tensor, b: int, e: int) -> Rows:
        """From the scan's layouts: constant (e n), variable (b n l) or grouped (b g n l)."""
        if X.dim() == 2:  # (e n)
            return Rows(X.contiguous().unsqueeze(1), batch=0, group=1, step=0)
        if X.dim() == 3:
            X = X.unsqueeze(1)  # (b 1 n l)
        g = X.shape[1]
        rows = X.transpose(-1, -2).reshape(b * g, X.shape[-1], X.shape[-2]).contiguous()  # (bg l n)
        return Rows(rows, batch=g, group=e // g, step=1)

    @staticmethod
    def time_major(X: Tensor, e: int) -> Rows:
        """From variable B or C already time-major, (b l n)."""
        return Rows(X.contiguous(), batch=1, group=e, step=1)

    def args(self) -> tuple:
        return as_numpy(self.t), self.batch, self.group, self.step

    def grad_like(self, grad: Tensor, like: Tensor) -> Tensor:
        """The kernel's (rows, T, n) gradient in the layout of ``like`` (B or C)."""
        if like.dim() == 2:
            return grad.squeeze(1)  # (e n)
        b, l, n = like.shape[0], like.shape[-1], grad.shape[-1]
        return grad.view(b, -1, l, n).transpose(-1, -2).reshape(like.shape)  # (b [g] n l)


def _items(b: int, e: int, width: int, Br: Rows, Cr: Rows) -> tuple[np.ndarray, int]:
    """Work items (sequence, first channel, end channel) (items 3), and the widest block.

    Blocks hold at most ``width`` channels, stay inside the runs of channels that share one
    row of B and one of C (length gcd of the two groups), and are narrower where that is
    needed for every thread to get an item (a single sequence)."""
    run = math.gcd(Br.group, Cr.group)
    k = max(1, min(_MAX_BLOCK, width, run))
    workers = threads(b * e)
    pieces = min(run, max(-(-run // k), -(-workers // (b * (e // run)))))
    bounds = [(s + j * run // pieces, s + (j + 1) * run // pieces) for s in range(0, e, run) for j in range(pieces)]
    items = np.array([(i, c0, c1) for i in range(b) for c0, c1 in bounds], dtype=np.int64)
    return items, max(c1 - c0 for c0, c1 in bounds)


def _blank(dtype: torch.dtype) -> Tensor:
    """A stand-in for an absent (b l e) tensor."""
    return torch.zeros(1, 1, 1, dtype=dtype)


def _skip(D: Tensor | None, dtype: torch.dtype) -> Tensor:
    # a copy: D is a parameter, and a numpy view of its memory would make that storage
    # unresizable, which breaks FSDP2 (it frees each unsharded parameter after the forward)
    return D.to(dtype, copy=True) if D is not None else torch.zeros(1, dtype=dtype)


# ---------------------------------------------------------------------------------------
# The kernels on (b l e) tensors
# ---------------------------------------------------------------------------------------


def scan_forward(u: Tensor, dt: Tensor, A: Tensor, Br: Rows, Cr: Rows, D: Tensor | None,
                 gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """out = (y + D u) * gate (b l e) and the last state (b e n), from contiguous u, dt and
    gate = silu(z) (b l e), A (e n), B and C as ``Rows``, all in one compute dtype."""
    (b, l, e), n = u.shape, A.shape[1]
    items, kmax = _items(b, e, _FORWARD_BLOCK, Br, Cr)
    out, last = u.new_empty(b, l, e), u.new_empty(b, e, n)
    launch(_forward_part, _forward_kernel, threads(len(items)), items, kmax, as_numpy(u), as_numpy(dt),
           as_numpy(A.t().contiguous()), *Br.args(), *Cr.args(), as_numpy(_skip(D, u.dtype)),
           as_numpy(gate if gate is not None else _blank(u.dtype)), D is not None, gate is not None,
           as_numpy(out), as_numpy(last))
    return out, last


@dataclass
class ScanGrads:
    """``scan_backward``'s results: gradients of u, dt, A, B and C (as ``Rows``), D and the
    gate's input z (through ``dgate``), and the recomputed output if asked for."""

    du: Tensor  # (b l e)
    ddt: Tensor  # (b l e)
    dA: Tensor  # (e n)
    dB: Tensor  # like Br.t
    dC: Tensor  # like Cr.t
    dD: Tensor | None  # (e)
    dz: Tensor | None  # (b l e)
    out: Tensor | None  # (b l e)


def scan_backward(u: Tensor, dt: Tensor, A: Tensor, Br: Rows, Cr: Rows, D: Tensor | None, gate: Tensor | None,
                  dgate: Tensor | None, dout: Tensor, dlast: Tensor | None, want_out: bool = False) -> ScanGrads:
    """Gradients of ``scan_forward`` for the upstream ``dout`` (b l e) and ``dlast`` (b e n);
    ``dgate`` (b l e) is d gate / dz, so ``dz`` = dL/dgate * dgate. With ``want_out`` the
    output ``scan_forward`` returned is recomputed on the way (``out``)."""
    (b, l, e), n = u.shape, A.shape[1]
    items, kmax = _items(b, e, _BLOCK_ELEMS // (l * n), Br, Cr)
    parts = threads(len(items))
    # per-thread partial sums: items of different threads share rows of A, B, C, D
    dA_p, dD_p = u.new_zeros(parts, n, e), u.new_zeros(parts, e)
    dB_p, dC_p = u.new_zeros(parts, *Br.t.shape), u.new_zeros(parts, *Cr.t.shape)
    du, ddt = u.new_empty(b, l, e), u.new_empty(b, l, e)
    dz = u.new_empty(b, l, e) if gate is not None else _blank(u.dtype)
    out = u.new_empty(b, l, e) if want_out else _blank(u.dtype)
    dlast = dlast.contiguous() if dlast is not None else u.new_zeros(b, e, n)
    blank = _blank(u.dtype)
    launch(_backward_part, _backward_kernel, parts, items, kmax, as_numpy(u), as_numpy(dt),
           as_numpy(A.t().contiguous()), *Br.args(), *Cr.args(), as_numpy(_skip(D, u.dtype)),
           as_numpy(gate if gate is not None else blank), as_numpy(dgate if dgate is not None else blank),
           D is not None, gate is not None, as_numpy(dout.contiguous()), as_numpy(dlast), want_out,
           *(as_numpy(t) for t in (du, ddt, dA_p, dB_p, dC_p, dD_p, dz, out)))
    return ScanGrads(du, ddt, dA_p.sum(0).t(), dB_p.sum(0), dC_p.sum(0), dD_p.sum(0) if D is not None else None,
                     dz if gate is not None else None, out if want_out else None)


def silu_and_grad(z: Tensor) -> tuple[Tensor, Tensor]:
    """silu(z) and its derivative s (1 + z (1 - s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


# ---------------------------------------------------------------------------------------
# The selective scan's interface ((b e l), as mamba-ssm's)
# ---------------------------------------------------------------------------------------


def _ble(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(b e l) -> contiguous (b l e) in ``dtype``: free when t is a transposed (b l e)."""
    return t.to(dtype).transpose(1, 2).contiguous()


def _dt(delta: Tensor, delta_bias: Tensor | None, softplus: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(delta + bias, its softplus or itself) (b l e): the second is dt, the first softplus' input."""
    pre = _ble(delta, dtype)
    if delta_bias is not None:
        pre = pre + delta_bias.to(dtype)
    return pre, F.softplus(pre) if softplus else pre


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, softplus: bool) -> tuple[Tensor, Tensor]:
    """The whole selective scan: (u, delta (b e l), A (e n), B, C, D (e) | None, z (b e l) |
    None, delta_bias (e) | None, softplus) -> (out (b e l) in u's dtype, x_last (b e n)).

    The kernels compute in u's compute dtype (fp32, or fp64); dt = softplus(delta + bias)
    and silu(z) are computed by torch around them and not kept: the backward saves only
    the inputs, as mamba-ssm's kernel does, and recomputes the rest.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    b, e, _ = u.shape
    gate = F.silu(_ble(z, dtype)) if z is not None else None
    out, last = scan_forward(_ble(u, dtype), _dt(delta, delta_bias, softplus, dtype)[1], A.to(dtype),
                             Rows.of(B.to(dtype), b, e), Rows.of(C.to(dtype), b, e), D, gate)
    return out.transpose(1, 2).to(u.dtype), last


def _forward_fake(u, delta, A, B, C, D, z, delta_bias, softplus):
    (b, e, l), n = u.shape, A.shape[1]
    return u.new_empty(b, l, e).transpose(1, 2), u.new_empty(b, e, n, dtype=torch.promote_types(u.dtype, torch.float32))


def _backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
              z: Tensor | None, delta_bias: Tensor | None, softplus: bool, dout: Tensor,
              dlast: Tensor | None) -> list[Tensor]:
    """Gradients of u, delta, A, B, C, D, z and delta_bias, each empty where the input is None."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    b, e, _ = u.shape
    pre, dt = _dt(delta, delta_bias, softplus, dtype)
    gate, dgate = silu_and_grad(_ble(z, dtype)) if z is not None else (None, None)
    Br, Cr = Rows.of(B.to(dtype), b, e), Rows.of(C.to(dtype), b, e)
    grads = scan_backward(_ble(u, dtype), dt, A.to(dtype), Br, Cr, D, gate, dgate, _ble(dout, dtype),
                          None if dlast is None else dlast.to(dtype))
    ddelta = grads.ddt * torch.sigmoid(pre) if softplus else grads.ddt  # d softplus(x)/dx = sigmoid(x)
    def none():  # a new one each time: an op's outputs may not alias each other
        return u.new_empty(0)

    return [
        grads.du.transpose(1, 2).to(u.dtype),
        ddelta.transpose(1, 2).to(delta.dtype),
        grads.dA.to(A.dtype),
        Br.grad_like(grads.dB, B).to(B.dtype),
        Cr.grad_like(grads.dC, C).to(C.dtype),
        none() if D is None else grads.dD.to(D.dtype),
        none() if z is None else grads.dz.transpose(1, 2).to(z.dtype),
        none() if delta_bias is None else ddelta.sum((0, 1)).to(delta_bias.dtype),
    ]


def _backward_fake(u, delta, A, B, C, D, z, delta_bias, softplus, dout, dlast):
    def ble(x):  # a (b l e) buffer seen as (b e l), as the kernels leave it
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)

    def like(x):
        return u.new_empty(0) if x is None else x.new_empty(x.shape)

    # dA: the kernel's (n e) sum, transposed
    return [ble(u), ble(delta), A.new_empty(A.shape[1], A.shape[0]).t(), like(B), like(C), like(D),
            u.new_empty(0) if z is None else ble(z), like(delta_bias)]


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # an unused last state sends no zeros
    ctx.save_for_backward(*inputs[:8])
    ctx.softplus = inputs[8]


def _grads(ctx, dout, dlast, *, backward):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = backward(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, dout, dlast)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return *(None if x is None else g for x, g in zip(present, grads)), None


_scan_op = Recurrence("selective_scan_numba", _forward, _forward_fake, _backward, _backward_fake, _setup_context,
                      _grads)


def numba_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """out = (y + D u) * silu(z) (b e l) in u's dtype and the last state (b e n) in the
    compute dtype; every argument as ``reference.selective_scan_ref`` takes it (checked
    there), all on the CPU. Differentiable in every tensor.
    """
    if numba is None:
        raise RuntimeError("the numba selective scan needs numba: pip install numba, or use --scan-impl loop")
    if u.device.type != "cpu":
        raise ValueError(f"the numba selective scan runs on the CPU, but the tensors are on {u.device}")
    return _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
