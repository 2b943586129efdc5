"""The Mamba mixer between in_proj and out_proj as one autograd Function on the CPU, as
mamba-ssm's ``mamba_inner_fn``: causal depthwise conv -> silu -> x_proj -> dt_proj ->
selective scan gated by silu(z), all on the (b l e) layout in_proj produces and the numba
kernels (``model.numba_scan.scan_forward``/``scan_backward``) run on.

The forward keeps only its inputs (in_proj's output xz and the weights). The backward
recomputes the conv, its silu, x_dbl and dt (elementwise passes and one small matmul),
runs ``scan_backward`` and back-propagates through dt_proj, x_proj, the silu and the conv
by hand. Autograd through the unfused module keeps each of those (b l e) intermediates of
every layer until the backward, pays mkldnn's slow depthwise conv backward and silu's
backward on transposed tensors, and copies between (b e l) and (b l e) on the way.

The reference is ``Mamba``'s unfused path (``Mamba.forward`` with any other scan).

Shape letters:
    b  batch
    l  sequence length
    e  inner width (d_inner)
    n  state size (d_state)
    r  rank of the delta projection (dt_rank)
    R  r + 2n, x_proj's outputs (dt, B, C)
    k  taps of the conv (d_conv); tap s multiplies the input s steps back
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.numba_scan import Rows, scan_backward, scan_forward, silu_and_grad


def causal_conv(x: Tensor, taps: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
    """Depthwise causal conv on (b l e): out_t = bias + sum_s taps[s] x_{t-s}, with x = 0
    before t = 0; ``taps[s]`` (e) is conv1d.weight[:, 0, k - 1 - s]."""
    l = x.shape[1]
    out = torch.addcmul(bias, x, taps[0]) if bias is not None else x * taps[0]  # (b l e)
    for s, tap in enumerate(taps[1:l], start=1):  # taps reaching before t = 0 add nothing
        out.narrow(1, s, l - s).addcmul_(x.narrow(1, 0, l - s), tap)
    return out


def causal_conv_backward(dout: Tensor, x: Tensor, taps: tuple[Tensor, ...], dx: Tensor) -> list[Tensor]:
    """Writes dL/dx_t = sum_s taps[s] dout_{t+s} into ``dx`` (b l e) and returns, in the
    order of ``taps``, dL/dtaps[s] = sum over b and t of dout_t x_{t-s} (e)."""
    l = x.shape[1]
    torch.mul(dout, taps[0], out=dx)
    dtaps = []
    for s, tap in enumerate(taps):
        if s >= l:  # the tap never met an input
            dtaps.append(torch.zeros_like(tap))
            continue
        head, tail = dout.narrow(1, s, l - s), x.narrow(1, 0, l - s)
        dtaps.append((head * tail).sum((0, 1)))
        if s:
            dx.narrow(1, 0, l - s).addcmul_(head, tap)
    return dtaps


@dataclass
class _Weights:
    """The Function's weights in the compute dtype, in the layouts it uses."""

    taps: tuple[Tensor, ...]  # k x (e), tap s for the input s steps back
    conv_b: Tensor | None  # (e)
    x_proj: Tensor  # (R e)
    dt_proj: Tensor  # (e r)
    dt_bias: Tensor  # (e)
    A: Tensor  # (e n)
    D: Tensor  # (e)

    @staticmethod
    def of(dtype: torch.dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D) -> _Weights:
        taps = conv_w.to(dtype)[:, 0].t().flip(0).contiguous().unbind(0)  # k x (e)
        return _Weights(taps, None if conv_b is None else conv_b.to(dtype), x_proj_w.to(dtype),
                        dt_proj_w.to(dtype), dt_proj_b.to(dtype), -torch.exp(A_log.to(dtype)), D.to(dtype))


@dataclass
class _Inner:
    """What the forward computes before the scan; the backward recomputes it."""

    x: Tensor  # (b l e), the conv's input, a view of xz
    u: Tensor  # (b l e), the scan's input: silu of the conv's output
    dsilu: Tensor | None  # (b l e), the silu's derivative there, when asked for
    dt_in: Tensor  # (b l r)
    dt_pre: Tensor  # (b l e), softplus' input
    dt: Tensor  # (b l e)
    B: Rows  # (b l n)
    C: Rows  # (b l n)


def _inner(xz: Tensor, w: _Weights, with_grad: bool = False) -> _Inner:
    e, r, n = w.D.shape[0], w.dt_proj.shape[1], w.A.shape[1]
    x = xz[..., :e]  # (b l e)
    pre = causal_conv(x, w.taps, w.conv_b)
    u, dsilu = silu_and_grad(pre) if with_grad else (F.silu(pre), None)
    x_dbl = F.linear(u, w.x_proj)  # (b l R)
    dt_in, B, C = x_dbl.split([r, n, n], dim=-1)
    dt_pre = F.linear(dt_in, w.dt_proj, w.dt_bias)  # (b l e)
    return _Inner(x, u, dsilu, dt_in, dt_pre, F.softplus(dt_pre), Rows.time_major(B, e), Rows.time_major(C, e))


class _MambaInner(torch.autograd.Function):
    """(xz (b l 2e), conv1d.weight (e 1 k), conv1d.bias (e) | None, x_proj.weight (R e),
    dt_proj.weight (e r), dt_proj.bias (e), A_log (e n), D (e)) -> out (b l e) in xz's
    dtype. Computes in fp32 (fp64 stays fp64) with autocast off, as the numba scan does."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D):  # type: ignore[override]
        dtype = torch.promote_types(xz.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            w = _Weights.of(dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
            xz_c = xz.to(dtype)
            inner = _inner(xz_c, w)
            gate = F.silu(xz_c[..., w.D.shape[0]:])  # (b l e)
            out, _ = scan_forward(inner.u, inner.dt, w.A, inner.B, inner.C, w.D, gate)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
        return out.to(xz.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D = ctx.saved_tensors
        dtype = torch.promote_types(xz.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            w = _Weights.of(dtype, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
            dxz, dW = _backward(xz.to(dtype), w, dout.to(dtype))
        dconv_w, dconv_b, dx_proj, ddt_proj, ddt_bias, dA_log, dD = dW
        return (dxz.to(xz.dtype), dconv_w.to(conv_w.dtype), None if conv_b is None else dconv_b.to(conv_b.dtype),
                dx_proj.to(x_proj_w.dtype), ddt_proj.to(dt_proj_w.dtype), ddt_bias.to(dt_proj_b.dtype),
                dA_log.to(A_log.dtype), dD.to(D.dtype))


def _backward(xz: Tensor, w: _Weights, dout: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """dL/dxz (b l 2e) and the weights' gradients, from xz and dL/dout in the compute dtype."""
    e = w.D.shape[0]
    inner = _inner(xz, w, with_grad=True)
    gate, dgate = silu_and_grad(xz[..., e:])
    g = scan_backward(inner.u, inner.dt, w.A, inner.B, inner.C, w.D, gate, dgate, dout, None)
    ddt_pre = g.ddt.mul_(torch.sigmoid(inner.dt_pre))  # (b l e); d softplus(x)/dx = sigmoid(x)
    flat = ddt_pre.flatten(0, 1)  # (bl e)
    ddt_bias = flat.sum(0)
    ddt_proj = flat.t() @ inner.dt_in.flatten(0, 1)  # (e r)
    dx_dbl = torch.cat([ddt_pre @ w.dt_proj, g.dB, g.dC], dim=-1).flatten(0, 1)  # (bl R)
    dx_proj = dx_dbl.t() @ inner.u.flatten(0, 1)  # (R e)
    dpre = g.du.flatten(0, 1).addmm_(dx_dbl, w.x_proj).view_as(g.du).mul_(inner.dsilu)  # (b l e)
    dxz = xz.new_empty(xz.shape)  # (b l 2e)
    dtaps = causal_conv_backward(dpre, inner.x, w.taps, dxz[..., :e])
    dxz[..., e:] = g.dz
    dconv_w = torch.stack(dtaps[::-1], dim=1).unsqueeze(1)  # (e 1 k)
    dconv_b = dpre.sum((0, 1)) if w.conv_b is not None else None
    return dxz, (dconv_w, dconv_b, dx_proj, ddt_proj, ddt_bias, g.dA * w.A, g.dD)


def mamba_inner(xz: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor, dt_proj_w: Tensor,
                dt_proj_b: Tensor, A_log: Tensor, D: Tensor) -> Tensor:
    """(b l 2e) -> (b l e): conv, silu, x_proj, dt_proj and the scan gated by silu(z), with
    x and z the halves of xz's last dimension and the weights as ``Mamba`` holds them; on
    the CPU, with numba. Differentiable in every tensor (once)."""
    return _MambaInner.apply(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D)
