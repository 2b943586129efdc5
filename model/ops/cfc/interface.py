"""The fused CfC scan: one op, ``lsnn::cfc_scan``, whose per-token loops run where ``impl``
says, with a hand-written backward (``lsnn::cfc_scan_backward``).

``reference.cfc_scan_ref`` is the recurrence straight from the equations:

    a_t = scale_out * tanh(scale_in * (zx_t + h_{t-1} w_h^T))    (b k)
    p_t = a_t w_p^T + b_p                                         (b 3q)  ff1 | ff2 | gate
    h_t = lerp(tanh(p_t1), tanh(p_t2), sigmoid(p_t3))             (b q)

With tanh(f) = 2 sigmoid(2 f) - 1 and m = (h + 1) / 2 the step becomes

    a_t = tanh(zx'_t + m_{t-1} w_m^T)    zx' = i (zx - w_h 1),  w_m = 2 i w_h
    s_t = sigmoid(a_t w_p'^T + b_p')      w_p', b_p': rows times (2o, 2o, o), (2, 2, 1)
    m_t = lerp(s_t1, s_t2, s_t3)

so one sigmoid serves the three heads and h = 2 m - 1 folds into the weights. The loops run
time-major (l b ...) so every per-token slice is contiguous; the backward is the reverse
loop over the saved activations, with the weight gradients batched over tokens, then
chained back through the folding by hand. Everything but the two loops is shared by the
numba and torch implementations; the Triton kernels fold the weights and chain the
gradients themselves, so that op is one launch forward, and one and three products
backward (``CFC_IMPLS``):

- ``numba``: the loops compiled for the CPU, each thread whole rows of the batch
  (``numba_kernel``; fp32 and fp64);
- ``triton``: one Triton kernel each way for the whole sequence, the folding inside it
  (``triton_kernel``; CUDA, or the CPU under TRITON_INTERPRET=1; fp32, up to 128 units);
- ``torch``: torch kernels a token, any device and dtype (``torch_loop``);
- ``auto``: numba on the CPU, triton on CUDA where Triton imports, else torch.

The op is a ``torch.library`` custom op with a fake implementation, so ``torch.compile``
and a CUDA graph see one node forward and one backward, not a loop over tokens; an eager
call runs the same functions as an ``autograd.Function``, without the ops' wrappers
(``op_support.Recurrence``).

Shape letters: b batch, l length, k backbone units, q liquid units.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from model.ops import triton_support
from model.ops.op_support import Recurrence
from model.ops.cfc import numba_kernel, torch_loop

CfCImpl = Literal["auto", "numba", "torch", "triton"]
CFC_IMPLS: tuple[str, ...] = ("auto", "numba", "torch", "triton")
_warned: set[str] = set()


def _kernels(impl: str):
    """The module whose ``cfc_forward``/``cfc_backward`` run the loops for a resolved ``impl``
    (numba or torch; the Triton kernels take the whole op, folding included)."""
    return numba_kernel if impl == "numba" else torch_loop


def _triton():
    from model.ops.cfc import triton_kernel

    return triton_kernel


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; the CfC scan runs its torch loops instead (one launch per op per token)",
                      stacklevel=3)


def resolve_cfc_impl(impl: str, *tensors: Tensor) -> str:
    """The implementation ``cfc_scan`` runs for these tensors (zx, h0, w_h, w_p, b_p): never
    "auto". A ``triton`` that the tensors fit but whose sizes the kernels do not cover falls
    back to ``torch`` with a one-time warning; a device or install that cannot run the asked
    implementation is an error naming ``--cfc-impl``."""
    if impl not in CFC_IMPLS:
        raise ValueError(f"unknown CfC implementation {impl!r}; use one of {', '.join(CFC_IMPLS)}")
    zx, h0 = tensors[0], tensors[1]
    if impl == "auto":
        if zx.device.type == "cpu":
            return "numba" if numba_kernel.usable(*tensors) else "torch"
        impl = "triton" if zx.is_cuda and triton_support.can_run(zx) else "torch"
        if impl == "torch":
            return impl
    if impl == "numba" and not numba_kernel.usable(*tensors):
        raise ValueError(
            "--cfc-impl numba needs numba installed and CPU tensors of one dtype, fp32 or fp64; got "
            f"{zx.dtype} on {zx.device}{'' if numba_kernel.available() else ' (numba is not installed)'}; "
            "use --cfc-impl torch (or triton on a GPU)")
    if impl == "triton":
        problem = triton_support.device_problem(zx)
        if problem is not None:
            raise ValueError(f"--cfc-impl triton: {problem}; use --cfc-impl numba or torch")
        from model.ops.cfc.triton_kernel import supported

        reason = supported(h0.shape[1], zx.shape[2], zx.dtype)
        if reason is not None:
            _warn_once(reason)
            return "torch"
    return impl


_ROWS: dict[tuple, Tensor] = {}


def _rows(q: int, like: Tensor) -> Tensor:
    """(3q): 2, 2, 1 a head, the factor each head's row takes in the folding; made once per
    size, device and dtype (a new one each call would be two kernels, from Python data a
    host-to-device copy)."""
    key = (q, like.device, like.dtype)
    rows = _ROWS.get(key)
    if rows is None:
        rows = like.new_full((3 * q,), 2.0)
        rows[2 * q:] = 1.0
        if len(_ROWS) > 16:
            _ROWS.clear()
        _ROWS[key] = rows
    return rows


def _forward(zx: Tensor, h0: Tensor, w_h: Tensor, w_p: Tensor, b_p: Tensor, scale_in: float,
             scale_out: float, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h (b l q), last h (b q)) and what the backward reads besides them: acts (l b k) and
    sigs (l b 3q). ``impl`` is resolved (never auto)."""
    if impl == "triton":  # one launch, the folding inside it
        return _triton().cfc_scan_forward(zx, h0, w_h, w_p, b_p, scale_in, scale_out)
    b, l, k = zx.shape
    q = h0.shape[1]
    rows = _rows(q, zx)
    w_mt = w_h.mul(2 * scale_in).t().contiguous()  # (q k)
    w_pt = w_p.mul((rows * scale_out).unsqueeze(1)).t().contiguous()  # (k 3q)
    # The buffers start as the additive terms (zx' and the bias); the loops accumulate each
    # token's products into its slot.
    acts = torch.sub(zx.transpose(0, 1), w_h.sum(1), out=zx.new_empty(l, b, k)).mul_(scale_in)  # (l b k)
    sigs = (b_p * rows).expand(l, b, 3 * q).contiguous()  # (l b 3q)
    m_all = zx.new_empty(l, b, q)
    _kernels(impl).cfc_forward(h0.add(1).mul_(0.5), w_mt, w_pt, acts, sigs, m_all)
    h_all = m_all.mul_(2).sub_(1)  # (l b q): h = 2 m - 1, in m's buffer
    last = h_all[-1].clone() if l else h0.clone()
    return h_all.transpose(0, 1), last, acts, sigs


def _forward_fake(zx, h0, w_h, w_p, b_p, scale_in, scale_out, impl):
    b, l, k = zx.shape
    q = h0.shape[1]
    y = zx.new_empty(b, l, q) if impl == "triton" else zx.new_empty(l, b, q).transpose(0, 1)
    return y, h0.new_empty(b, q), zx.new_empty(l, b, k), zx.new_empty(l, b, 3 * q)


def _backward(gy: Tensor | None, gh: Tensor | None, h0: Tensor, w_h: Tensor, w_p: Tensor,
              y: Tensor, acts: Tensor, sigs: Tensor, scale_in: float, scale_out: float,
              impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of zx (b l k), h0 (b q), w_h (k q), w_p (3q k) and b_p (3q) for the
    upstream gy (b l q) and gh (b q) (None: zero), from the forward's h (b l q)."""
    if impl == "triton":
        return _triton().cfc_scan_backward(gy, gh, h0, w_h, w_p, y, acts, sigs, scale_in, scale_out)
    l, b, k = acts.shape
    q = h0.shape[1]
    rows = _rows(q, acts)
    w_m = w_h.mul(2 * scale_in)  # (k q)
    w_pf = w_p.mul((rows * scale_out).unsqueeze(1))  # (3q k)
    # dL/dm_t = 2 dL/dh_t; the loops add the carry from m_{t+1} into the same slot
    gms = acts.new_zeros(l, b, q) if gy is None else torch.mul(gy.transpose(0, 1), 2, out=acts.new_empty(l, b, q))
    if gh is not None:
        gms[-1].add_(gh, alpha=2)
    dp_all, dz_all = acts.new_empty(l, b, 3 * q), torch.empty_like(acts)  # (l b 3q), (l b k)
    _kernels(impl).cfc_backward(w_pf, w_m, acts, sigs, gms, dp_all, dz_all)
    # Chain back through the folding: zx' = i (zx - w_h 1), w_m = 2 i w_h, rows, m = (h + 1) / 2.
    # dL/dw_h = i dz^T (2 m_prev - 1) = i dz^T h_prev, and dL/dh0 = dL/dm_0 / 2 = i dz_0 w_h.
    dz_flat = dz_all.view(l * b, k)
    h_prev = torch.cat([h0.unsqueeze(0), y.transpose(0, 1)[:-1]]).view(l * b, q)  # (lb q)
    d_wh = (dz_flat.t() @ h_prev).mul_(scale_in)  # (k q)
    d_h0 = (dz_all[0] @ w_h).mul_(scale_in)  # (b q)
    dp_flat = dp_all.view(l * b, 3 * q)
    d_wp = (dp_flat.t() @ acts.view(l * b, k)).mul_((rows * scale_out).unsqueeze(1))  # (3q k)
    d_bp = dp_flat.sum(0).mul_(rows)  # (3q)
    d_zx = dz_all.mul_(scale_in).transpose(0, 1)  # (b l k)
    return d_zx, d_h0, d_wh, d_wp, d_bp


def _backward_fake(gy, gh, h0, w_h, w_p, y, acts, sigs, scale_in, scale_out, impl):
    l, b, k = acts.shape
    d_zx = acts.new_empty(b, l, k) if impl == "triton" else acts.new_empty(l, b, k).transpose(0, 1)
    return d_zx, h0.new_empty(h0.shape), w_h.new_empty(w_h.shape), w_p.new_empty(w_p.shape), \
        w_p.new_empty(w_p.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    _, h0, w_h, w_p, _, scale_in, scale_out, impl = inputs
    y, _, acts, sigs = output
    ctx.mark_non_differentiable(acts, sigs)
    ctx.set_materialize_grads(False)  # no zeros for the buffers, nor for an unused last h
    ctx.save_for_backward(h0, w_h, w_p, y, acts, sigs)
    ctx.args = (scale_in, scale_out, impl)


def _grads(ctx, gy, gh, *_, backward):
    h0, w_h, w_p, y, acts, sigs = ctx.saved_tensors
    grads = backward(gy, gh, h0, w_h, w_p, y, acts, sigs, *ctx.args)
    return *grads, None, None, None


_cfc_scan_op = Recurrence("cfc_scan", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _grads)


def cfc_scan(
    zx: Tensor, h0: Tensor, w_h: Tensor, w_p: Tensor, b_p: Tensor, scale_in: float = 1.0, scale_out: float = 1.0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``cfc_scan_ref`` as one op with a hand-written backward; same arguments: zx (b l k),
    h0 (b q), w_h (k q), w_p (3q k), b_p (3q), all of one dtype -> (h (b l q), last h (b q)).
    ``impl``: where the per-token loops run, one of ``CFC_IMPLS`` (see the module docstring)."""
    impl = resolve_cfc_impl(impl, zx, h0, w_h, w_p, b_p)
    y, h, _, _ = _cfc_scan_op(zx, h0, w_h, w_p, b_p, float(scale_in), float(scale_out), impl)
    return y, h
