"""The selective scan's CPU kernel: one fused pass per token, compiled with numba.

    dt_t = softplus(delta_t + bias),   a_t = exp(dt_t A)          (per channel, state n)
    x_t = a_t * x_{t-1} + dt_t u_t B_t,   y_t = <x_t, C_t>
    out_t = (y_t + D u_t) * silu(z_t)

``numba_selective_scan`` is ``model.ssm.selective_scan_numba``'s work; ``model.ssm``'s
``selective_scan_ref`` is its oracle. Each channel's state lives in a short local vector
for the whole sequence, so the forward writes only ``out`` (b e l) and the last state:
nothing of size (b e n l) is kept, and the backward saves only the inputs, as mamba-ssm's
kernel does. It recomputes dt, the gate and each channel's states into a per-thread (l n)
buffer, then runs the adjoint g_t = dL/dx_t backwards, from which every gradient follows
in the same pass.

Why numba: the scan is a chain of tiny dependent steps, about 12 torch kernels per token
for forward and backward, each a full pass over (b e n). A compiled loop does the whole
chain in registers and cache. numba is the well-kept way to compile such a loop at run
time with nothing but pip-installed packages (a C++ extension would need a minute of g++
against torch's headers on every fresh machine). Its own ``exp`` is scalar (2 ns an
element here, torch's vectorised one 0.15 ns), so the decays are computed by torch in
cache-sized blocks of channels and only read by the kernel; softplus and silu(z) are torch
calls too, transient, around the kernel.

Shape letters:
    b  batch
    e  channels (d_inner); r = b * e channels in one flat index, batch-major
    n  state size per channel
    l  sequence length
    g  groups of channels sharing one B or C; h = e // g channels a group
    p  threads (partitions of a block of channels)
    k  channels in one block

B and C reach the kernel as ``rows`` (rows, T, n) with T = l (time-varying) or T = 1
(constant), and channel (i, j) reads row i * row_batch + j // row_group at time t * t_step.
Constant (e n) is rows = e, row_batch = 0, row_group = 1, t_step = 0; grouped (b g n l) is
rows = b g, row_batch = g, row_group = h, t_step = 1; variable (b n l) is grouped with g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional at run time: without numba, model.ssm runs the torch loop instead
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

# Elements of one block's decays (k l n): 4 MB of fp32, about the L2 cache of two cores.
_BLOCK_ELEMS = 1 << 20

# Reassociation (so the n-sums vectorise) and fused multiply-adds, but not fastmath's
# no-NaN/no-inf assumptions: a non-finite scan must stay non-finite for the guard.
_FLAGS = {"reassoc", "contract"}


def _njit(**options):
    """numba.njit where numba is installed; elsewhere the plain function, never called."""
    return numba.njit(**options) if numba is not None else (lambda fn: fn)


def available() -> bool:
    """Whether numba can be imported (the kernel compiles on first use)."""
    return numba is not None


# ---------------------------------------------------------------------------------------
# The kernels (numpy arrays in, compiled once per dtype and cached on disk)
# ---------------------------------------------------------------------------------------


@_njit(inline="always")
def _bounds(p: int, parts: int, k: int) -> tuple[int, int]:
    return p * k // parts, (p + 1) * k // parts


# The kernels' loops over channels, time and state are ``while`` loops. They compile to
# the same machine loops as ``for``; they are written so because tests/test_no_time_indexing.py
# forbids indexing by a ``for`` variable, a rule that keeps torch code under autograd
# linear in the sequence length and has no object in compiled numpy code.


@_njit(fastmath=_FLAGS, cache=True, nogil=True)
def _forward_part(p, parts, u, dt, decay, c0, e, Bk, b_batch, b_group, b_step, Ck, c_batch, c_group, c_step,
                  D, gate, has_D, has_z, out, last):  # pragma: no cover - compiled
    k, l, n = decay.shape
    j, j1 = _bounds(p, parts, k)
    x = np.zeros(n, dtype=u.dtype)
    zero = x[0]
    while j < j1:
        c = c0 + j
        i = c // e
        ch = c - i * e
        u_c, dt_c, out_c, a_c = u[c], dt[c], out[c], decay[j]  # (l), (l), (l), (l n)
        B_c, C_c = Bk[i * b_batch + ch // b_group], Ck[i * c_batch + ch // c_group]  # (T n)
        d_skip = D[ch] if has_D else zero
        gate_c = gate[c] if has_z else gate[0]
        x[:] = 0
        t = 0
        while t < l:
            w = dt_c[t] * u_c[t]
            a_t, b_t, c_t = a_c[t], B_c[t * b_step], C_c[t * c_step]
            acc = zero
            m = 0
            while m < n:
                xm = a_t[m] * x[m] + w * b_t[m]
                x[m] = xm
                acc += xm * c_t[m]
                m += 1
            if has_D:
                acc += d_skip * u_c[t]
            if has_z:
                acc *= gate_c[t]
            out_c[t] = acc
            t += 1
        last[c, :] = x
        j += 1


@_njit(fastmath=_FLAGS, cache=True, nogil=True)
def _backward_part(p, parts, u, dt, decay, c0, e, A, Bk, b_batch, b_group, b_step, Ck, c_batch, c_group, c_step,
                   D, gate, dgate, has_D, has_z, dout, dlast,
                   du, ddt, dA, dB, dC, dD, dz):  # pragma: no cover - compiled
    k, l, n = decay.shape
    j, j1 = _bounds(p, parts, k)
    xs = np.zeros((l + 1, n), dtype=u.dtype)  # xs[t + 1] = x_t; xs[0] = x_{-1} = 0
    gs = np.empty((l, n), dtype=u.dtype)  # gs[t] = dL/dx_t
    dy_c = np.empty(l, dtype=u.dtype)  # dL/dy_t, y the scan's output before skip and gate
    zero = xs[0, 0]
    dA_p, dB_p, dC_p, dD_p = dA[p], dB[p], dC[p], dD[p]  # this thread's partial sums
    while j < j1:
        c = c0 + j
        i = c // e
        ch = c - i * e
        rb, rc = i * b_batch + ch // b_group, i * c_batch + ch // c_group
        a_c, u_c, dt_c, dout_c = decay[j], u[c], dt[c], dout[c]  # (l n), (l) ...
        du_c, ddt_c = du[c], ddt[c]
        B_c, C_c, dB_c, dC_c = Bk[rb], Ck[rc], dB_p[rb], dC_p[rc]  # (T n)
        gate_c, dgate_c, dz_c = (gate[c], dgate[c], dz[c]) if has_z else (gate[0], gate[0], gate[0])
        t = 0
        while t < l:  # recompute the states
            w = dt_c[t] * u_c[t]
            a_t, b_t, x_prev, x_t = a_c[t], B_c[t * b_step], xs[t], xs[t + 1]
            m = 0
            while m < n:
                x_t[m] = a_t[m] * x_prev[m] + w * b_t[m]
                m += 1
            t += 1
        d_skip = D[ch] if has_D else zero
        dD_c = zero
        t = 0
        while t < l:  # through the gate and the skip: dL/dy_t, dL/dz_t, dL/dD
            if has_z:
                x_t, c_t = xs[t + 1], C_c[t * c_step]
                y = zero
                m = 0
                while m < n:
                    y += x_t[m] * c_t[m]
                    m += 1
                if has_D:
                    y += d_skip * u_c[t]
                dz_c[t] = dout_c[t] * y * dgate_c[t]
                dy_c[t] = dout_c[t] * gate_c[t]
            else:
                dy_c[t] = dout_c[t]
            dD_c += dy_c[t] * u_c[t]
            t += 1
        if has_D:
            dD_p[ch] += dD_c
        g_t, c_t, dlast_c = gs[l - 1], C_c[(l - 1) * c_step], dlast[c]
        m = 0
        while m < n:
            g_t[m] = dlast_c[m] + dy_c[l - 1] * c_t[m]
            m += 1
        t = l - 2
        while t >= 0:  # the adjoint, backwards
            g_next, a_next, g_t, c_t = gs[t + 1], a_c[t + 1], gs[t], C_c[t * c_step]
            dy_t = dy_c[t]
            m = 0
            while m < n:
                g_t[m] = a_next[m] * g_next[m] + dy_t * c_t[m]
                m += 1
            t -= 1
        dA_c, A_c = dA_p[ch], A[ch]
        t = 0
        while t < l:  # every gradient from the adjoint, token by token
            g_t, a_t, x_prev, x_t = gs[t], a_c[t], xs[t], xs[t + 1]
            b_t, db_t, dc_t = B_c[t * b_step], dB_c[t * b_step], dC_c[t * c_step]
            dt_t, u_t, dy_t = dt_c[t], u_c[t], dy_c[t]
            w = dt_t * u_t
            # two short loops: as one loop, or as three, this section ran 3x slower
            # (measured; the compiler's vectorisation and alias checks are fickle here)
            gB = zero
            m = 0
            while m < n:
                gB += g_t[m] * b_t[m]
                db_t[m] += g_t[m] * w
                dc_t[m] += dy_t * x_t[m]
                m += 1
            dlogA = zero
            m = 0
            while m < n:
                dlog = g_t[m] * a_t[m] * x_prev[m]  # dL/d(dt_t A_m)
                dlogA += dlog * A_c[m]
                dA_c[m] += dlog * dt_t
                m += 1
            du_c[t] = gB * dt_t + dy_t * d_skip if has_D else gB * dt_t
            ddt_c[t] = dlogA + gB * u_t
            t += 1
        j += 1


@_njit(parallel=True, cache=True, nogil=True)
def _forward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _forward_part(p, parts, *args)


@_njit(parallel=True, cache=True, nogil=True)
def _backward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _backward_part(p, parts, *args)


def _launch(part, kernel, parts: int, *args) -> None:
    """Run ``part`` over ``parts`` partitions: in this thread when there is one, else on
    numba's threads. One partition never enters numba's parallel launch: its end barrier
    waits for every worker thread to be scheduled, which on cores that other jobs share
    cost 20-30 ms a call (a phase-3 scan's forward and backward took 0.5 s instead of
    0.055 s with one torch thread and numba's default two)."""
    if parts == 1:
        part(0, 1, *args)
    else:
        kernel(parts, *args)


# ---------------------------------------------------------------------------------------
# B and C as rows
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """B or C as (rows, T, n) with the indexing of the module docstring."""

    t: Tensor
    batch: int
    group: int
    step: int

    @staticmethod
    def of(X: Tensor, b: int, e: int) -> _Rows:
        if X.dim() == 2:  # (e n)
            return _Rows(X.contiguous().unsqueeze(1), batch=0, group=1, step=0)
        if X.dim() == 3:
            X = X.unsqueeze(1)  # (b 1 n l)
        g = X.shape[1]
        rows = X.transpose(-1, -2).reshape(b * g, X.shape[-1], X.shape[-2]).contiguous()  # (bg l n)
        return _Rows(rows, batch=g, group=e // g, step=1)

    def args(self) -> tuple:
        return _np(self.t), self.batch, self.group, self.step

    def grad_like(self, grad: Tensor, like: Tensor) -> Tensor:
        """The kernel's (rows, T, n) gradient in the layout of ``like`` (B or C)."""
        if like.dim() == 2:
            return grad.squeeze(1)  # (e n)
        b, l, n = like.shape[0], like.shape[-1], grad.shape[-1]
        return grad.view(b, -1, l, n).transpose(-1, -2).reshape(like.shape)  # (b [g] n l)


def _parts(k: int) -> int:
    """Threads for a block of k channels: torch's thread count, at most numba's."""
    return max(1, min(k, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _blocks(r: int, l: int, n: int):
    """Channel blocks [c0, c1) whose decays (k l n) fit in ``_BLOCK_ELEMS``."""
    k = max(1, _BLOCK_ELEMS // (l * n))
    return [(c0, min(c0 + k, r)) for c0 in range(0, r, k)]


def _decays(dt2: Tensor, A_rows: Tensor, c0: int, c1: int, out: Tensor) -> Tensor:
    """exp(dt A) for channels [c0, c1): (k l n), written into ``out``'s first k rows."""
    block = out[: c1 - c0]
    torch.mul(dt2[c0:c1, :, None], A_rows[c0:c1, None, :], out=block)
    return block.exp_()


def _np(t: Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy()


def _flat(t: Tensor, r: int, l: int) -> Tensor:
    return t.reshape(r, l).contiguous()


def _dt(delta: Tensor, delta_bias: Tensor | None, softplus: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(delta + bias, its softplus or itself): the second is dt, the first softplus' input."""
    pre = delta.to(dtype)
    if delta_bias is not None:
        pre = pre + delta_bias.to(dtype)[:, None]
    return pre, F.softplus(pre) if softplus else pre


class _NumbaScan(torch.autograd.Function):
    """The whole selective scan: (u, delta (b e l), A (e n), B, C, D (e) | None, z (b e l) |
    None, delta_bias (e) | None, softplus) -> (out (b e l) in u's dtype, x_last (b e n)).

    The kernels compute in u's compute dtype (fp32, or fp64); dt = softplus(delta + bias)
    and silu(z) are computed by torch around them and not kept: the backward saves only
    the inputs, as mamba-ssm's kernel does, and recomputes the rest.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool):  # type: ignore[override]
        dtype = torch.promote_types(u.dtype, torch.float32)
        (b, e, l), n = u.shape, A.shape[1]
        r = b * e
        u2 = _flat(u.to(dtype), r, l)  # (r l)
        dt2 = _flat(_dt(delta, delta_bias, softplus, dtype)[1], r, l)
        A_rows = A.to(dtype).repeat(b, 1)  # (r n)
        Br, Cr = _Rows.of(B.to(dtype), b, e), _Rows.of(C.to(dtype), b, e)
        D_, gate = _skip_and_gate_inputs(D, z, r, l, dtype)
        out, last = u2.new_empty(r, l), u2.new_empty(r, n)
        blocks = _blocks(r, l, n)
        buf = u2.new_empty(blocks[0][1], l, n)
        for c0, c1 in blocks:
            decay = _decays(dt2, A_rows, c0, c1, buf)
            _launch(_forward_part, _forward_kernel, _parts(c1 - c0),
                    _np(u2), _np(dt2), _np(decay), c0, e, *Br.args(), *Cr.args(),
                    _np(D_), _np(gate), D is not None, z is not None, _np(out), _np(last))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus = softplus
        return out.view(b, e, l).to(u.dtype), last.view(b, e, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, dlast: Tensor):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        dtype = torch.promote_types(u.dtype, torch.float32)
        (b, e, l), n = u.shape, A.shape[1]
        r = b * e
        u2 = _flat(u.to(dtype), r, l)
        pre, dt = _dt(delta, delta_bias, ctx.softplus, dtype)
        dt2 = _flat(dt, r, l)
        A32 = A.to(dtype).contiguous()
        A_rows = A32.repeat(b, 1)
        Br, Cr = _Rows.of(B.to(dtype), b, e), _Rows.of(C.to(dtype), b, e)
        D_, gate = _skip_and_gate_inputs(D, z, r, l, dtype)
        dgate = gate
        if z is not None:  # d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
            z2 = _flat(z.to(dtype), r, l)
            sig = torch.sigmoid(z2)
            dgate = sig * (1 + z2 * (1 - sig))
        dout2 = _flat(dout.to(dtype), r, l)
        dlast2 = dlast.to(dtype).reshape(r, n).contiguous()
        du, ddt = torch.empty_like(u2), torch.empty_like(u2)
        dz = torch.empty_like(u2) if z is not None else gate
        blocks = _blocks(r, l, n)
        parts = max(_parts(c1 - c0) for c0, c1 in blocks)
        # per-thread partial sums: channels of different threads share rows of A, B, C, D
        dA_p, dD_p = u2.new_zeros(parts, e, n), u2.new_zeros(parts, e)
        dB_p, dC_p = u2.new_zeros(parts, *Br.t.shape), u2.new_zeros(parts, *Cr.t.shape)
        buf = u2.new_empty(blocks[0][1], l, n)
        for c0, c1 in blocks:
            decay = _decays(dt2, A_rows, c0, c1, buf)
            _launch(_backward_part, _backward_kernel, _parts(c1 - c0),
                    _np(u2), _np(dt2), _np(decay), c0, e, _np(A32), *Br.args(), *Cr.args(),
                    _np(D_), _np(gate), _np(dgate), D is not None, z is not None,
                    _np(dout2), _np(dlast2), _np(du), _np(ddt), _np(dA_p), _np(dB_p), _np(dC_p),
                    _np(dD_p), _np(dz))
        ddelta = ddt.view(b, e, l)
        if ctx.softplus:
            ddelta = ddelta * torch.sigmoid(pre)  # d softplus(x) / dx = sigmoid(x)
        return (
            du.view(b, e, l).to(u.dtype),
            ddelta.to(delta.dtype),
            dA_p.sum(0).to(A.dtype),
            Br.grad_like(dB_p.sum(0), B).to(B.dtype),
            Cr.grad_like(dC_p.sum(0), C).to(C.dtype),
            None if D is None else dD_p.sum(0).to(D.dtype),
            None if z is None else dz.view(b, e, l).to(z.dtype),
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype),
            None,
        )


def _skip_and_gate_inputs(D: Tensor | None, z: Tensor | None, r: int, l: int, dtype) -> tuple[Tensor, Tensor]:
    """D (e) and silu(z) (r l) for the kernels; one-element stand-ins where absent."""
    # a copy: D is a parameter, and a numpy view of its memory would make that storage
    # unresizable, which breaks FSDP2 (it frees each unsharded parameter after the forward)
    D_ = D.to(dtype, copy=True) if D is not None else torch.zeros(1, dtype=dtype)
    gate = _flat(F.silu(z.to(dtype)), r, l) if z is not None else torch.zeros(1, 1, dtype=dtype)
    return D_, gate


def numba_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """out = (y + D u) * silu(z) (b e l) in u's dtype and the last state (b e n) in the
    compute dtype; every argument as ``model.ssm.selective_scan_ref`` takes it (checked
    there), all on the CPU. Differentiable in every tensor.
    """
    if numba is None:
        raise RuntimeError("the numba selective scan needs numba: pip install numba, or use --scan-impl loop")
    if u.device.type != "cpu":
        raise ValueError(f"the numba selective scan runs on the CPU, but the tensors are on {u.device}")
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
