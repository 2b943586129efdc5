"""The selective scan as a Triton kernel, forward and backward, with its prologue and
epilogue inside: the GPU path without mamba-ssm, and nothing to compile but what Triton
compiles itself at run time.

    dt_t = softplus(delta_t + bias)   (or without the bias, or without the softplus)
    x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t,    y_t = <x_t, C_t> + D u_t,
    out_t = y_t silu(z_t)

``triton_selective_scan`` is ``selective_scan(..., impl="triton")`` (``interface``);
``reference.selective_scan_ref`` is its oracle. It is one ``torch.library`` custom op each
way (``lsnn::selective_scan_triton`` and its backward), with fakes, so ``torch.compile`` and
a CUDA graph see one node, and a Mamba layer's scan is one launch each way: the delta's
bias and softplus, the skip D u and the gate silu(z) are computed in the kernels, as
mamba-ssm's kernel does, not by torch around them (at phase 4 that was 108 of the GPU
step's 1,065 launches).

Each program owns a tile of channels of one batch row with their whole state (BLOCK_E x
BLOCK_N, in registers) and walks the sequence. The forward writes out, the last state, and
the state at the start of every CHUNK steps; the backward walks the chunks from the end,
recomputes each chunk's states into a scratch buffer from its checkpoint, and runs the
adjoint g_t = dL/dx_t backwards through it, taking every gradient on the way (mamba-ssm's
kernel recomputes its states the same way). dt and the gate are recomputed, not stored.
Memory: the checkpoints (b e n l / CHUNK) and, in the backward, the scratch (b e n CHUNK).

Supports: u, delta and z in fp32, bf16 or fp16 (read and computed in fp32; out in u's
dtype, the last state in fp32), at any strides; A, B, C, D and the bias in any float dtype
but fp64; any d_state (BLOCK_N, its next power of two, times BLOCK_E <= 16 channels is the
tile: d_state 16 is 256 fp32 registers' worth a program, d_state 256 would spill). No
tl.dot, so no shape minimum. fp64 is refused (``--scan-impl loop`` or ``parallel``).

The tests run it on the CPU under TRITON_INTERPRET=1 (Triton's interpreter), against the
oracle in value and gradient; on CUDA the same tests run compiled (``gpu`` marker).

Shape letters:
    b  batch
    e  channels; a program holds BLOCK_E of them, of one batch row
    n  state size (BLOCK_N: the next power of two)
    l  sequence length, walked in chunks of CHUNK steps
    g  groups sharing one B or C; h = e // g channels a group

u, delta and z (b e l) are read through their strides (s_b, s_e, s_t); out and the
gradients of u, delta and z are written (b l e), the layout of the linear layers around a
Mamba mixer, and returned as (b e l) views. B and C are read through strides: channel ch
of batch row i at time t reads ``X[i * s_b + (ch // h) * s_g + m * s_n + t * s_t]``.
Constant (e n) is s_b = s_t = 0, h = 1; variable (b n l) is grouped (b g n l) with g = 1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.ops import triton_support
from model.ops.op_support import Recurrence

CHUNK = 64
"""Steps between two saved states: the backward recomputes at most this many at once."""

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _sigmoid_parts(x):
    """exp(-|x|) and 1 + exp(-|x|): sigmoid(x) is 1 / w for x >= 0 and ex / w below, and
    neither overflows."""
    ex = tl.exp(-tl.abs(x))
    return ex, 1.0 + ex


@triton.jit
def _sigmoid(x):
    ex, w = _sigmoid_parts(x)
    return tl.where(x >= 0, 1.0 / w, ex / w)


@triton.jit
def _dt(delta_t, bias, SOFTPLUS: tl.constexpr):
    """(dt, d dt / d delta) for delta + bias, through softplus if SOFTPLUS: torch's
    softplus, max(x, 0) + log1p(exp(-|x|)), log1p to full precision (log(w) (w - 1)
    rounded back, Goldberg's trick: Triton has no log1p on every backend)."""
    pre = delta_t + bias
    if SOFTPLUS:
        ex, w = _sigmoid_parts(pre)
        exact = w == 1.0
        log1p = tl.where(exact, ex, tl.log(w) * (ex / tl.where(exact, 1.0, w - 1.0)))
        return tl.maximum(pre, 0.0) + log1p, tl.where(pre >= 0, 1.0 / w, ex / w)
    return pre, tl.full(pre.shape, 1.0, tl.float32)


@triton.jit
def _forward(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
             e, n, l, n_chunks,
             su_b, su_e, su_t, sd_b, sd_e, sd_t, sz_b, sz_e, sz_t,
             sB_b, sB_g, sB_n, sB_t, hB, sC_b, sC_g, sC_n, sC_t, hC,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE)
    m = tl.arange(0, BLOCK_N)  # (BN)
    on_e = ch < e
    on = on_e[:, None] & (m < n)[None, :]  # (BE BN)
    state = (i * e + ch)[:, None] * n + m[None, :]  # offsets of a (b e n) tensor
    A = tl.load(A_ptr + ch[:, None] * n + m[None, :], mask=on, other=0.0).to(tl.float32)
    B_at = B_ptr + i * sB_b + (ch // hB)[:, None] * sB_g + m[None, :] * sB_n
    C_at = C_ptr + i * sC_b + (ch // hC)[:, None] * sC_g + m[None, :] * sC_n
    u_at, delta_at, z_at = u_ptr + i * su_b + ch * su_e, delta_ptr + i * sd_b + ch * sd_e, z_ptr + i * sz_b + ch * sz_e
    out_at = out_ptr + i * l * e + ch  # (b l e)
    bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=on_e, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + ch, mask=on_e, other=0.0).to(tl.float32)
    x = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for t in range(l):
        if t % CHUNK == 0:
            tl.store(ckpt_ptr + state * n_chunks + t // CHUNK, x, mask=on)
        dt_t, _ = _dt(tl.load(delta_at + t * sd_t, mask=on_e, other=0.0).to(tl.float32), bias, SOFTPLUS)
        u_t = tl.load(u_at + t * su_t, mask=on_e, other=0.0).to(tl.float32)
        B_t = tl.load(B_at + t * sB_t, mask=on, other=0.0).to(tl.float32)
        C_t = tl.load(C_at + t * sC_t, mask=on, other=0.0).to(tl.float32)
        x = tl.exp(dt_t[:, None] * A) * x + (dt_t * u_t)[:, None] * B_t
        y = tl.sum(x * C_t, axis=1)
        if HAS_D:
            y += D * u_t
        if HAS_Z:
            z_t = tl.load(z_at + t * sz_t, mask=on_e, other=0.0).to(tl.float32)
            y *= z_t * _sigmoid(z_t)
        tl.store(out_at + t * e, y, mask=on_e)
    tl.store(last_ptr + state, x, mask=on)


@triton.jit
def _backward(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
              scratch_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
              e, n, l, n_chunks,
              su_b, su_e, su_t, sd_b, sd_e, sd_t, sz_b, sz_e, sz_t, so_b, so_e, so_t,
              sB_b, sB_g, sB_n, sB_t, hB, sC_b, sC_g, sC_n, sC_t, hC,
              sdB_b, sdB_g, sdB_n, sdB_t, sdC_b, sdC_g, sdC_n, sdC_t,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              HAS_DLAST: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
              CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    m = tl.arange(0, BLOCK_N)
    on_e = ch < e
    on_n = m < n
    on = on_e[:, None] & on_n[None, :]
    state = (i * e + ch)[:, None] * n + m[None, :]
    A = tl.load(A_ptr + ch[:, None] * n + m[None, :], mask=on, other=0.0).to(tl.float32)
    B_at = B_ptr + i * sB_b + (ch // hB)[:, None] * sB_g + m[None, :] * sB_n
    C_at = C_ptr + i * sC_b + (ch // hC)[:, None] * sC_g + m[None, :] * sC_n
    u_at, delta_at, z_at = u_ptr + i * su_b + ch * su_e, delta_ptr + i * sd_b + ch * sd_e, z_ptr + i * sz_b + ch * sz_e
    dout_at = dout_ptr + i * so_b + ch * so_e
    ble = i * l * e + ch  # the (b l e) gradients of u, delta and z, at t = 0
    # a time-varying B or C is shared by the whole tile (BLOCK_E divides h): its
    # gradient is summed over the tile's channels and added once per step
    first = tl.program_id(1) * BLOCK_E
    dB_at = dB_ptr + i * sdB_b + (first // hB) * sdB_g + m * sdB_n
    dC_at = dC_ptr + i * sdC_b + (first // hC) * sdC_g + m * sdC_n
    scratch = scratch_ptr + state * (CHUNK + 1)  # slot 0: the chunk's start, s + 1: x_{t0+s}
    bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=on_e, other=0.0).to(tl.float32)
    D = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + ch, mask=on_e, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    if HAS_DLAST:
        g = tl.load(dlast_ptr + state, mask=on, other=0.0).to(tl.float32)
    dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dB = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for back in range(n_chunks):
        t0 = (n_chunks - 1 - back) * CHUNK
        x = tl.load(ckpt_ptr + state * n_chunks + t0 // CHUNK, mask=on, other=0.0)
        tl.store(scratch, x, mask=on)
        for s in range(CHUNK):  # recompute the chunk's states (steps past l change nothing)
            t = t0 + s
            on_t = on_e & (t < l)
            dt_t, _ = _dt(tl.load(delta_at + t * sd_t, mask=on_t, other=0.0).to(tl.float32), bias, SOFTPLUS)
            dt_t = tl.where(on_t, dt_t, 0.0)  # past l: no decay, no input
            u_t = tl.load(u_at + t * su_t, mask=on_t, other=0.0).to(tl.float32)
            B_t = tl.load(B_at + t * sB_t, mask=on & (t < l), other=0.0).to(tl.float32)
            x = tl.exp(dt_t[:, None] * A) * x + (dt_t * u_t)[:, None] * B_t
            tl.store(scratch + s + 1, x, mask=on)
        tl.debug_barrier()
        for back_s in range(CHUNK):  # the adjoint, backwards through the chunk
            s = CHUNK - 1 - back_s
            t = t0 + s
            in_l = t < l
            on_t = on_e & in_l
            dt_t, ddt_ddelta = _dt(tl.load(delta_at + t * sd_t, mask=on_t, other=0.0).to(tl.float32), bias,
                                   SOFTPLUS)
            dt_t = tl.where(on_t, dt_t, 0.0)  # past l: the adjoint passes through unchanged
            u_t = tl.load(u_at + t * su_t, mask=on_t, other=0.0).to(tl.float32)
            dy_t = tl.load(dout_at + t * so_t, mask=on_t, other=0.0).to(tl.float32)  # zero past l
            B_t = tl.load(B_at + t * sB_t, mask=on & in_l, other=0.0).to(tl.float32)
            C_t = tl.load(C_at + t * sC_t, mask=on & in_l, other=0.0).to(tl.float32)
            x_t = tl.load(scratch + s + 1, mask=on, other=0.0)
            x_prev = tl.load(scratch + s, mask=on, other=0.0)
            if HAS_Z:  # out = y silu(z): dy = dout silu(z), dz = dout y silu'(z)
                z_t = tl.load(z_at + t * sz_t, mask=on_t, other=0.0).to(tl.float32)
                sig = _sigmoid(z_t)
                y_t = tl.sum(x_t * C_t, axis=1) + D * u_t
                tl.store(dz_ptr + ble + t * e, dy_t * y_t * sig * (1.0 + z_t * (1.0 - sig)), mask=on_t)
                dy_t = dy_t * z_t * sig
            a = tl.exp(dt_t[:, None] * A)
            g = g + dy_t[:, None] * C_t  # dL/dx_t
            gB = tl.sum(g * B_t, axis=1)
            dlog = g * a * x_prev  # dL/d(dt_t A)
            tl.store(du_ptr + ble + t * e, gB * dt_t + dy_t * D, mask=on_t)
            ddelta_t = (tl.sum(dlog * A, axis=1) + gB * u_t) * ddt_ddelta
            tl.store(ddelta_ptr + ble + t * e, ddelta_t, mask=on_t)
            dbias += tl.where(on_t, ddelta_t, 0.0)
            dD += dy_t * u_t
            dA += dlog * dt_t[:, None]
            dB_t = g * (dt_t * u_t)[:, None]
            dC_t = x_t * dy_t[:, None]
            if B_VAR:
                tl.atomic_add(dB_at + t * sdB_t, tl.sum(dB_t, axis=0), mask=on_n & in_l)
            else:
                dB += dB_t
            if C_VAR:
                tl.atomic_add(dC_at + t * sdC_t, tl.sum(dC_t, axis=0), mask=on_n & in_l)
            else:
                dC += dC_t
            g = g * a  # the part of dL/dx_{t-1} that flows through x_t
        tl.debug_barrier()
    tl.atomic_add(dA_ptr + ch[:, None] * n + m[None, :], dA, mask=on)
    if not B_VAR:
        tl.atomic_add(dB_ptr + ch[:, None] * sdB_g + m[None, :] * sdB_n, dB, mask=on)
    if not C_VAR:
        tl.atomic_add(dC_ptr + ch[:, None] * sdC_g + m[None, :] * sdC_n, dC, mask=on)
    if HAS_D:
        tl.atomic_add(dD_ptr + ch, dD, mask=on_e)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + ch, dbias, mask=on_e)


def _strides(X: Tensor, e: int) -> tuple[tuple[int, int, int, int, int], bool]:
    """B's or C's (s_b, s_g, s_n, s_t, h), read from its strides, and whether it varies in time."""
    if X.dim() == 2:  # (e n)
        return (0, X.stride(0), X.stride(1), 0, 1), False
    if X.dim() == 3:  # (b n l): one group
        return (X.stride(0), 0, X.stride(1), X.stride(2), e), True
    return (X.stride(0), X.stride(1), X.stride(2), X.stride(3), e // X.shape[1]), True  # (b g n l)


def _block_e(e: int, shared: list[int]) -> int:
    """Channels per program: a power of two <= 16 that divides the h of every
    time-varying B or C, so that a tile never straddles two groups."""
    block = 16
    for h in shared:
        block = math.gcd(block, h)
    return min(block, 1 << max(0, (e - 1).bit_length()))


def _block_n(n: int) -> int:
    return max(2, 1 << max(0, (n - 1).bit_length()))


def _layout(u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple:
    """B's and C's strides and kinds, and the programs' grid and tile width."""
    (b, e, _), n = u.shape, A.shape[1]
    sB, B_var = _strides(B, e)
    sC, C_var = _strides(C, e)
    block_e = _block_e(e, [s[4] for s, var in ((sB, B_var), (sC, C_var)) if var])
    return sB, B_var, sC, C_var, block_e, (b, -(-e // block_e)), _block_n(n)


def _ble(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A (b l e) buffer seen as ``like``'s (b e l)."""
    b, e, l = like.shape
    return like.new_empty(b, l, e, dtype=dtype or like.dtype).transpose(1, 2)


def _flags(D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, softplus: bool) -> dict:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus)


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                  delta_bias: Tensor | None, softplus: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(u, delta (b e l), A (e n), B, C, D (e) | None, z (b e l) | None, delta_bias (e) |
    None, softplus) -> (out (b e l) in u's dtype, x_last (b e n) fp32, the states every
    ``chunk`` steps (b e n l/chunk) fp32, which the backward starts from)."""
    (b, e, l), n = u.shape, A.shape[1]
    A = A.contiguous()
    sB, _, sC, _, block_e, grid, block_n = _layout(u, A, B, C)
    n_chunks = -(-l // chunk)
    out, last = _ble(u), u.new_empty(b, e, n, dtype=torch.float32)
    ckpt = u.new_empty(b, e, n, n_chunks, dtype=torch.float32)
    D_, z_, bias_ = (u if x is None else x for x in (D, z, delta_bias))  # an absent one: never read
    _forward[grid](u, delta, A, B, C, D_, z_, bias_, out, last, ckpt, e, n, l, n_chunks,
                   *u.stride(), *delta.stride(), *z_.stride(), *sB, *sC, **_flags(D, z, delta_bias, softplus),
                   CHUNK=chunk, BLOCK_E=block_e, BLOCK_N=block_n)
    return out, last, ckpt


def _forward_fake(u, delta, A, B, C, D, z, delta_bias, softplus, chunk):
    (b, e, l), n = u.shape, A.shape[1]
    f32 = torch.float32
    return _ble(u), u.new_empty(b, e, n, dtype=f32), u.new_empty(b, e, n, -(-l // chunk), dtype=f32)


def _scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   z: Tensor | None, delta_bias: Tensor | None, softplus: bool, ckpt: Tensor, dout: Tensor,
                   dlast: Tensor | None, chunk: int) -> list[Tensor]:
    """Gradients of u, delta, A, B, C, D, z and delta_bias for the upstream dout (b e l)
    and dlast (b e n) (None: zero), each empty where the input is None."""
    (b, e, l), n = u.shape, A.shape[1]
    A = A.contiguous()
    sB, B_var, sC, C_var, block_e, grid, block_n = _layout(u, A, B, C)
    f32 = torch.float32
    scratch = u.new_empty(b, e, n, chunk + 1, dtype=f32)
    du, ddelta, dz = _ble(u), _ble(delta), (u.new_empty(0) if z is None else _ble(z))
    # summed by atomics: fp32 zeros, cast to the input's dtype after
    dA, dB, dC, dD, dbias = (u.new_empty(0) if X is None else torch.zeros(X.shape, dtype=f32, device=X.device)
                             for X in (A, B, C, D, delta_bias))
    D_, z_, bias_, dlast_ = (u if x is None else x for x in (D, z, delta_bias, dlast))  # absent: never read
    dD_, dz_, dbias_ = (u if x.numel() == 0 else x for x in (dD, dz, dbias))  # absent: never written
    _backward[grid](u, delta, A, B, C, D_, z_, bias_, ckpt, dout, dlast_, scratch,
                    du, ddelta, dA, dB, dC, dD_, dz_, dbias_, e, n, l, ckpt.shape[-1],
                    *u.stride(), *delta.stride(), *z_.stride(), *dout.stride(), *sB, *sC,
                    *_strides(dB, e)[0][:4], *_strides(dC, e)[0][:4], **_flags(D, z, delta_bias, softplus),
                    HAS_DLAST=dlast is not None, B_VAR=B_var, C_VAR=C_var, CHUNK=chunk, BLOCK_E=block_e,
                    BLOCK_N=block_n)
    grads = [du, ddelta, dA, dB, dC, dD, dz, dbias]
    like = [u, delta, A, B, C, D, z, delta_bias]
    return [grad if x is None else grad.to(x.dtype) for grad, x in zip(grads, like)]


def _backward_fake(u, delta, A, B, C, D, z, delta_bias, softplus, ckpt, dout, dlast, chunk):
    def like(x):
        return u.new_empty(0) if x is None else x.new_empty(x.shape)

    return [_ble(u), _ble(delta), like(A), like(B), like(C), like(D),
            u.new_empty(0) if z is None else _ble(z), like(delta_bias)]


def _setup_context(ctx, inputs, output) -> None:
    *tensors, softplus, chunk = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused last state sends no zeros
    ctx.save_for_backward(*tensors, output[2])
    ctx.softplus, ctx.chunk = softplus, chunk


def _grads(ctx, dout, dlast, _, *, backward):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = backward(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ckpt, dout, dlast, ctx.chunk)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return *(None if x is None else grad for x, grad in zip(present, grads)), None, None


_scan_op = Recurrence("selective_scan_triton", _scan_forward, _forward_fake, _scan_backward, _backward_fake,
                      _setup_context, _grads)


def triton_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """out = (y + D u) silu(z) (b e l) in u's dtype and the last state (b e n) in fp32;
    every argument as ``reference.selective_scan_ref`` takes it (checked there), on CUDA
    or, under TRITON_INTERPRET=1, on the CPU. Differentiable in every tensor."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if x is not None and x.dtype not in _SUPPORTED:
            raise ValueError(f"the Triton selective scan computes in float32 and reads fp32, bf16 or fp16; "
                             f"{name} is {x.dtype}: use --scan-impl parallel or loop for float64")
    problem = triton_support.device_problem(u)
    if problem is not None:
        raise ValueError(f"the Triton selective scan cannot run: {problem}")
    out, last, _ = _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHUNK)
    return out, last
