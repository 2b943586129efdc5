"""The Mamba mixer after in_proj as one autograd Function on the CPU, as mamba-ssm's
``mamba_inner_fn``: causal depthwise conv -> silu -> x_proj -> dt_proj -> selective scan
gated by silu(z) -> out_proj, all on the (b l e) layout in_proj produces and the numba
kernels (``numba_kernel.scan_forward``/``scan_backward``) run on.

The forward keeps only its inputs (in_proj's output xz and the weights). The backward
recomputes the conv, its silu, x_dbl and dt (one compiled pass and two small matmuls),
runs ``scan_backward``, which recomputes the scan's output on the way for out_proj's
weight gradient, and back-propagates through dt_proj, x_proj, the silu and the conv by
hand. Autograd through the unfused module keeps each of those (b l e) intermediates of
every layer until the backward (out_proj's input alone is 8 MB of the phase-3 step's
peak), pays mkldnn's slow depthwise conv backward and silu's backward on transposed
tensors, and copies between (b e l) and (b l e) on the way.

The conv with both silus (of its output and of z), and the conv's backward, are numba
kernels beside the scan's: each is one pass over (b l e) where torch takes one pass per
tap and five per silu-and-derivative, each into a fresh buffer.

The reference is ``Mamba``'s unfused path (``Mamba.forward`` with any other scan).

Shape letters:
    b  batch
    l  sequence length
    d  model width (d_model), out_proj's outputs
    e  inner width (d_inner)
    n  state size (d_state)
    r  rank of the delta projection (dt_rank)
    R  r + 2n, x_proj's outputs (dt, B, C)
    k  taps of the conv (d_conv); tap s multiplies the input s steps back
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops.numba_support import FLAGS, as_numpy, bounds, exp, launch, njit, numba, threads
from model.ops.selective_scan.numba_kernel import Rows, scan_backward, scan_forward

# ---------------------------------------------------------------------------------------
# The conv, its silu and silu(z) as compiled passes over (b l e)
# ---------------------------------------------------------------------------------------

# At b4 l256 e512, one thread, profiled: the conv and silus in torch ops (this Function's
# first version) took about 30 ms of a layer's forward and backward, these kernels about 9.
# Work items are blocks of channels of one sequence, as in ``numba_kernel``, whose
# helpers (partitions, the vectorisable exp, the compile flags) these kernels share.
# numpy's error model: python's checks every division for zero, and that kept the silu's
# loop scalar (7 ns an element against 0.6).
_BLOCK = 128  # channels a block: its rows of xz, the taps and the outputs stay in L1


@njit(fastmath=FLAGS, error_model="numpy", cache=True, nogil=True)
def _conv_silu_part(p, parts, items, kmax, xz, taps, bias, with_grad,
                    u, dsilu, gate, dgate):  # pragma: no cover - compiled
    """u = silu(conv(x)), gate = silu(z) and, ``with_grad``, their derivatives (b l e)."""
    l, k, e = xz.shape[1], taps.shape[0], taps.shape[1]
    # the conv's outputs then z, so that one loop makes both silus: numba warns about a
    # function with two inlined ``exp``s, and a call per row costs more than the row
    v = np.empty(2 * kmax, dtype=xz.dtype)
    out, grad = np.empty_like(v), np.empty_like(v)
    one = np.ones(1, dtype=xz.dtype)[0]
    lo, hi = bounds(p, parts, items.shape[0])
    for item in range(lo, hi):
        i, c0, c1 = items[item, 0], items[item, 1], items[item, 2]
        w = c1 - c0
        b_k = bias[c0:c1]
        for t in range(l):
            z_t = xz[i, t, e + c0:e + c1]
            for c in range(w):
                v[c] = b_k[c]
                v[w + c] = z_t[c]
            for s in range(min(k, t + 1)):  # tap s reads the input s steps back
                x_s, tap = xz[i, t - s, c0:c1], taps[s, c0:c1]
                for c in range(w):
                    v[c] += tap[c] * x_s[c]
            for c in range(2 * w):
                sg = one / (one + exp(-v[c]))
                out[c] = v[c] * sg
                grad[c] = sg * (one + v[c] * (one - sg))
            u_t, gate_t, ds_t, dg_t = u[i, t, c0:c1], gate[i, t, c0:c1], dsilu[i, t, c0:c1], dgate[i, t, c0:c1]
            for c in range(w):
                u_t[c] = out[c]
                gate_t[c] = out[w + c]
            if with_grad:
                for c in range(w):
                    ds_t[c] = grad[c]
                    dg_t[c] = grad[w + c]


@njit(fastmath=FLAGS, error_model="numpy", cache=True, nogil=True)
def _conv_silu_backward_part(p, parts, items, kmax, xz, taps, du, dsilu, dz, dxz, dtaps,
                             dbias):  # pragma: no cover - compiled
    """From du = dL/du (b l e): dL/dx and dz into dxz (b l 2e), and this partition's sums
    of dL/dtaps (k e) and dL/dbias (e)."""
    l, k, e = xz.shape[1], taps.shape[0], taps.shape[1]
    ring = np.empty((k, kmax), dtype=xz.dtype)  # dpre = du * silu' at t .. t+k-1, at t % k
    dtaps_p, dbias_p = dtaps[p], dbias[p]
    lo, hi = bounds(p, parts, items.shape[0])
    for item in range(lo, hi):
        i, c0, c1 = items[item, 0], items[item, 1], items[item, 2]
        w = c1 - c0
        db = dbias_p[c0:c1]
        for t in range(l - 1, -1, -1):  # dL/dx_t reads dpre_{t..t+k-1}: made already
            du_t, ds_t, dpre_t = du[i, t, c0:c1], dsilu[i, t, c0:c1], ring[t % k]
            for c in range(w):
                dpre_t[c] = du_t[c] * ds_t[c]
                db[c] += dpre_t[c]
            for s in range(min(k, t + 1)):
                x_s, dtap = xz[i, t - s, c0:c1], dtaps_p[s, c0:c1]
                for c in range(w):
                    dtap[c] += dpre_t[c] * x_s[c]
            dx_t, tap = dxz[i, t, c0:c1], taps[0, c0:c1]
            for c in range(w):
                dx_t[c] = tap[c] * dpre_t[c]
            for s in range(1, min(k, l - t)):
                later, tap = ring[(t + s) % k], taps[s, c0:c1]
                for c in range(w):
                    dx_t[c] += tap[c] * later[c]
            dz_t, dz_in = dxz[i, t, e + c0:e + c1], dz[i, t, c0:c1]
            for c in range(w):
                dz_t[c] = dz_in[c]


@njit(parallel=True, cache=True, nogil=True)
def _conv_silu_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _conv_silu_part(p, parts, *args)


@njit(parallel=True, cache=True, nogil=True)
def _conv_silu_backward_kernel(parts, *args):  # pragma: no cover - compiled
    for p in numba.prange(parts):
        _conv_silu_backward_part(p, parts, *args)


def _items(b: int, e: int) -> tuple[np.ndarray, int]:
    """Work items (sequence, first channel, end channel) (items 3), and the widest block."""
    pieces = -(-e // _BLOCK)
    bounds = [(j * e // pieces, (j + 1) * e // pieces) for j in range(pieces)]
    items = np.array([(i, c0, c1) for i in range(b) for c0, c1 in bounds], dtype=np.int64)
    return items, max(c1 - c0 for c0, c1 in bounds)


def conv_silu(xz: Tensor, taps: Tensor, bias: Tensor | None, with_grad: bool) -> tuple[Tensor, ...]:
    """From contiguous xz (b l 2e) and taps (k e), tap s for the input s steps back:
    u = silu(bias + sum_s taps[s] x_{t-s}) with x = 0 before t = 0, and gate = silu(z),
    (b l e) each; ``with_grad`` adds silu's derivative at both: (u, gate[, du, dgate])."""
    (b, l, _), e = xz.shape, taps.shape[1]
    items, kmax = _items(b, e)
    u, gate = xz.new_empty(b, l, e), xz.new_empty(b, l, e)
    # without with_grad the kernel writes no derivative: u and gate stand in, in bounds
    dsilu, dgate = (xz.new_empty(b, l, e), xz.new_empty(b, l, e)) if with_grad else (u, gate)
    launch(_conv_silu_part, _conv_silu_kernel, threads(len(items)), items, kmax, as_numpy(xz), as_numpy(taps),
           as_numpy(bias if bias is not None else xz.new_zeros(e)), with_grad,
           as_numpy(u), as_numpy(dsilu), as_numpy(gate), as_numpy(dgate))
    return (u, gate, dsilu, dgate) if with_grad else (u, gate)


def conv_silu_backward(xz: Tensor, taps: Tensor, du: Tensor, dsilu: Tensor, dz: Tensor) -> tuple[Tensor, ...]:
    """dL/dxz (b l 2e), dL/dtaps (k e), dL/dbias (e) from dL/du, silu's derivative and
    dL/dz (b l e), all contiguous."""
    (b, l, e2), (k, e) = xz.shape, taps.shape
    items, kmax = _items(b, e)
    parts = threads(len(items))
    dtaps, dbias = xz.new_zeros(parts, k, e), xz.new_zeros(parts, e)  # per-thread sums
    dxz = xz.new_empty(b, l, e2)
    launch(_conv_silu_backward_part, _conv_silu_backward_kernel, parts, items, kmax, as_numpy(xz), as_numpy(taps),
           as_numpy(du), as_numpy(dsilu), as_numpy(dz), as_numpy(dxz), as_numpy(dtaps), as_numpy(dbias))
    return dxz, dtaps.sum(0), dbias.sum(0)


@dataclass
class _Weights:
    """The Function's weights in the compute dtype, in the layouts it uses."""

    taps: Tensor  # (k e), tap s for the input s steps back
    conv_b: Tensor | None  # (e)
    x_proj: Tensor  # (R e)
    dt_proj: Tensor  # (e r)
    dt_bias: Tensor  # (e)
    A: Tensor  # (e n)
    D: Tensor  # (e)

    @staticmethod
    def of(dtype: torch.dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D) -> _Weights:
        taps = conv_w.to(dtype)[:, 0].t().flip(0).contiguous()  # (k e)
        # a copy of the bias, which the kernel reads through numpy: a numpy view of a
        # parameter's memory makes its storage unresizable, which breaks FSDP2 (it frees
        # each unsharded parameter after the forward); taps, A and D are new tensors anyway
        conv_b = None if conv_b is None else conv_b.to(dtype, copy=True)
        return _Weights(taps, conv_b, x_proj_w.to(dtype),
                        dt_proj_w.to(dtype), dt_proj_b.to(dtype), -torch.exp(A_log.to(dtype)), D.to(dtype))


@dataclass
class _Inner:
    """What the forward computes before the scan; the backward recomputes it."""

    u: Tensor  # (b l e), the scan's input: silu of the conv's output
    gate: Tensor  # (b l e), silu(z)
    dsilu: Tensor | None  # (b l e), silu's derivative at the conv's output, when asked for
    dgate: Tensor | None  # (b l e), silu's derivative at z, when asked for
    dt_in: Tensor  # (b l r)
    dt_pre: Tensor  # (b l e), softplus' input
    dt: Tensor  # (b l e)
    B: Rows  # (b l n)
    C: Rows  # (b l n)


def _inner(xz: Tensor, w: _Weights, with_grad: bool = False) -> _Inner:
    e, r, n = w.D.shape[0], w.dt_proj.shape[1], w.A.shape[1]
    u, gate, *grads = conv_silu(xz, w.taps, w.conv_b, with_grad)
    dsilu, dgate = grads if with_grad else (None, None)
    x_dbl = F.linear(u, w.x_proj)  # (b l R)
    dt_in, B, C = x_dbl.split([r, n, n], dim=-1)
    dt_in = dt_in.contiguous()  # a strided input makes the small matmul 2.5x slower
    dt_pre = F.linear(dt_in, w.dt_proj, w.dt_bias)  # (b l e)
    return _Inner(u, gate, dsilu, dgate, dt_in, dt_pre, F.softplus(dt_pre), Rows.time_major(B, e),
                  Rows.time_major(C, e))


class _MambaInner(torch.autograd.Function):
    """(xz (b l 2e), conv1d.weight (e 1 k), conv1d.bias (e) | None, x_proj.weight (R e),
    dt_proj.weight (e r), dt_proj.bias (e), A_log (e n), D (e), out_proj.weight (d e),
    out_proj.bias (d) | None) -> out (b l d) in xz's dtype. Computes in fp32 (fp64 stays
    fp64) with autocast off, as the numba scan does, out_proj included: under bf16 autocast
    its matmul is fp32 where the unfused path's is bf16 (closer to the exact value)."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, out_w, out_b):  # type: ignore[override]
        dtype = torch.promote_types(xz.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            w = _Weights.of(dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
            inner = _inner(xz.to(dtype).contiguous(), w)
            y, _ = scan_forward(inner.u, inner.dt, w.A, inner.B, inner.C, w.D, inner.gate)  # (b l e)
            out = F.linear(y, out_w.to(dtype), None if out_b is None else out_b.to(dtype))  # (b l d)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, out_w, out_b)
        return out.to(xz.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, out_w, out_b = ctx.saved_tensors
        dtype = torch.promote_types(xz.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            w = _Weights.of(dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
            dout = dout.to(dtype).contiguous()  # (b l d)
            dy = dout @ out_w.to(dtype)  # (b l e), dL/d(the scan's output)
            dxz, dW, y = _backward(xz.to(dtype).contiguous(), w, dy)
            dout_w = dout.flatten(0, 1).t() @ y.flatten(0, 1)  # (d e)
            dout_b = None if out_b is None else dout.flatten(0, 1).sum(0)  # (d)
        dconv_w, dconv_b, dx_proj, ddt_proj, ddt_bias, dA_log, dD = dW
        return (dxz.to(xz.dtype), dconv_w.to(conv_w.dtype), None if conv_b is None else dconv_b.to(conv_b.dtype),
                dx_proj.to(x_proj_w.dtype), ddt_proj.to(dt_proj_w.dtype), ddt_bias.to(dt_proj_b.dtype),
                dA_log.to(A_log.dtype), dD.to(D.dtype), dout_w.to(out_w.dtype),
                None if out_b is None else dout_b.to(out_b.dtype))


def _backward(xz: Tensor, w: _Weights, dy: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """dL/dxz (b l 2e), the weights' gradients and the recomputed scan output y (b l e),
    from xz and dL/dy in the compute dtype."""
    inner = _inner(xz, w, with_grad=True)
    g = scan_backward(inner.u, inner.dt, w.A, inner.B, inner.C, w.D, inner.gate, inner.dgate, dy, None,
                      want_out=True)
    # d softplus(x)/dx = sigmoid(x), in dt_pre's buffer (its last use): a new one's pages would fault in
    ddt_pre = g.ddt.mul_(inner.dt_pre.sigmoid_())  # (b l e)
    flat = ddt_pre.flatten(0, 1)  # (bl e)
    ddt_bias = flat.sum(0)
    ddt_proj = flat.t() @ inner.dt_in.flatten(0, 1)  # (e r)
    dx_dbl = torch.cat([ddt_pre @ w.dt_proj, g.dB, g.dC], dim=-1).flatten(0, 1)  # (bl R)
    dx_proj = dx_dbl.t() @ inner.u.flatten(0, 1)  # (R e)
    du = g.du.flatten(0, 1).addmm_(dx_dbl, w.x_proj).view_as(g.du)  # (b l e)
    dxz, dtaps, dbias = conv_silu_backward(xz, w.taps, du, inner.dsilu, g.dz)
    dconv_w = dtaps.flip(0).t().contiguous().unsqueeze(1)  # (e 1 k)
    grads = (dconv_w, dbias if w.conv_b is not None else None, dx_proj, ddt_proj, ddt_bias, g.dA * w.A, g.dD)
    return dxz, grads, g.out


def mamba_inner(xz: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor, dt_proj_w: Tensor,
                dt_proj_b: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor, out_b: Tensor | None) -> Tensor:
    """(b l 2e) -> (b l d): conv, silu, x_proj, dt_proj, the scan gated by silu(z) and
    out_proj, with x and z the halves of xz's last dimension and the weights as ``Mamba``
    holds them; on the CPU, with numba. Differentiable in every tensor (once)."""
    if numba is None:
        raise RuntimeError("the fused Mamba mixer needs numba: pip install numba, or use --scan-impl loop")
    if xz.device.type != "cpu":
        raise ValueError(f"the fused Mamba mixer runs on the CPU, but xz is on {xz.device}")
    return _MambaInner.apply(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, out_w, out_b)
