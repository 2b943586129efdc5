"""The selective scan as a Triton kernel, forward and backward: the GPU path without
mamba-ssm, and nothing to compile but what Triton compiles itself at run time.

    x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t,    y_t = <x_t, C_t>

``triton_scan`` is the core of ``selective_scan(..., impl="triton")`` (``interface``);
``reference.selective_scan_ref`` is its oracle. It is one ``torch.library`` custom op each
way (``lsnn::selective_scan_triton`` and its backward), with fakes, so ``torch.compile`` and
a CUDA graph see one node. Each program owns a tile of channels of one batch row with
their whole state (BLOCK_E x BLOCK_N, in registers) and walks the sequence. The
forward writes y, the last state, and the state at the start of every CHUNK steps; the
backward walks the chunks from the end, recomputes each chunk's states into a scratch
buffer from its checkpoint, and runs the adjoint g_t = dL/dx_t backwards through it,
taking every gradient on the way (mamba-ssm's kernel recomputes its states the same way).
Memory: the checkpoints (b e n l / CHUNK) and, in the backward, the scratch (b e n CHUNK).

The tests run it on the CPU under TRITON_INTERPRET=1 (Triton's interpreter), against the
oracle in value and gradient; on CUDA the same tests run compiled (``gpu`` marker).

Shape letters:
    b  batch
    e  channels; a program holds BLOCK_E of them, of one batch row
    n  state size (BLOCK_N: the next power of two)
    l  sequence length, walked in chunks of CHUNK steps
    g  groups sharing one B or C; h = e // g channels a group

B and C are read through strides: channel ch of batch row i at time t reads
``X[i * s_b + (ch // h) * s_g + m * s_n + t * s_t]``. Constant (e n) is s_b = s_t = 0,
h = 1, s_g = n; variable (b n l) is grouped (b g n l) with g = 1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.ops import triton_support

CHUNK = 64
"""Steps between two saved states: the backward recomputes at most this many at once."""


@triton.jit
def _forward(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, last_ptr, ckpt_ptr,
             e, n, l, n_chunks,
             sB_b, sB_g, sB_n, sB_t, hB, sC_b, sC_g, sC_n, sC_t, hC,
             CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE)
    m = tl.arange(0, BLOCK_N)  # (BN)
    on_e = ch < e
    on = on_e[:, None] & (m < n)[None, :]  # (BE BN)
    row = i * e + ch  # flat (b e) channel
    state = row[:, None] * n + m[None, :]  # offsets of a (b e n) tensor
    A = tl.load(A_ptr + ch[:, None] * n + m[None, :], mask=on, other=0.0)
    B_at = B_ptr + i * sB_b + (ch // hB)[:, None] * sB_g + m[None, :] * sB_n
    C_at = C_ptr + i * sC_b + (ch // hC)[:, None] * sC_g + m[None, :] * sC_n
    x = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for t in range(l):
        if t % CHUNK == 0:
            tl.store(ckpt_ptr + state * n_chunks + t // CHUNK, x, mask=on)
        dt_t = tl.load(dt_ptr + row * l + t, mask=on_e, other=0.0)
        u_t = tl.load(u_ptr + row * l + t, mask=on_e, other=0.0)
        B_t = tl.load(B_at + t * sB_t, mask=on, other=0.0)
        C_t = tl.load(C_at + t * sC_t, mask=on, other=0.0)
        x = tl.exp(dt_t[:, None] * A) * x + (dt_t * u_t)[:, None] * B_t
        tl.store(y_ptr + row * l + t, tl.sum(x * C_t, axis=1), mask=on_e)
    tl.store(last_ptr + state, x, mask=on)

@triton.jit
def _backward(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, ckpt_ptr, dy_ptr, dlast_ptr, scratch_ptr,
              du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
              e, n, l, n_chunks,
              sB_b, sB_g, sB_n, sB_t, hB, sC_b, sC_g, sC_n, sC_t, hC,
              B_VAR: tl.constexpr, C_VAR: tl.constexpr,
              CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    m = tl.arange(0, BLOCK_N)
    on_e = ch < e
    on_n = m < n
    on = on_e[:, None] & on_n[None, :]
    row = i * e + ch
    state = row[:, None] * n + m[None, :]
    A = tl.load(A_ptr + ch[:, None] * n + m[None, :], mask=on, other=0.0)
    B_at = B_ptr + i * sB_b + (ch // hB)[:, None] * sB_g + m[None, :] * sB_n
    C_at = C_ptr + i * sC_b + (ch // hC)[:, None] * sC_g + m[None, :] * sC_n
    # a time-varying B or C is shared by the whole tile (BLOCK_E divides h): its
    # gradient is summed over the tile's channels and added once per step
    first = tl.program_id(1) * BLOCK_E
    dB_at = dB_ptr + i * sB_b + (first // hB) * sB_g + m * sB_n
    dC_at = dC_ptr + i * sC_b + (first // hC) * sC_g + m * sC_n
    scratch = scratch_ptr + state * (CHUNK + 1)  # slot 0: the chunk's start, s + 1: x_{t0+s}
    g = tl.load(dlast_ptr + state, mask=on, other=0.0)
    dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dB = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for back in range(n_chunks):
        t0 = (n_chunks - 1 - back) * CHUNK
        x = tl.load(ckpt_ptr + state * n_chunks + t0 // CHUNK, mask=on, other=0.0)
        tl.store(scratch, x, mask=on)
        for s in range(CHUNK):  # recompute the chunk's states (steps past l change nothing)
            t = t0 + s
            on_t = on_e & (t < l)
            dt_t = tl.load(dt_ptr + row * l + t, mask=on_t, other=0.0)
            u_t = tl.load(u_ptr + row * l + t, mask=on_t, other=0.0)
            B_t = tl.load(B_at + t * sB_t, mask=on & (t < l), other=0.0)
            x = tl.exp(dt_t[:, None] * A) * x + (dt_t * u_t)[:, None] * B_t
            tl.store(scratch + s + 1, x, mask=on)
        tl.debug_barrier()
        for back_s in range(CHUNK):  # the adjoint, backwards through the chunk
            s = CHUNK - 1 - back_s
            t = t0 + s
            in_l = t < l
            on_t = on_e & in_l
            dt_t = tl.load(dt_ptr + row * l + t, mask=on_t, other=0.0)
            u_t = tl.load(u_ptr + row * l + t, mask=on_t, other=0.0)
            dy_t = tl.load(dy_ptr + row * l + t, mask=on_t, other=0.0)
            B_t = tl.load(B_at + t * sB_t, mask=on & in_l, other=0.0)
            C_t = tl.load(C_at + t * sC_t, mask=on & in_l, other=0.0)
            x_t = tl.load(scratch + s + 1, mask=on, other=0.0)
            x_prev = tl.load(scratch + s, mask=on, other=0.0)
            a = tl.exp(dt_t[:, None] * A)
            g = g + dy_t[:, None] * C_t  # dL/dx_t (zero past l: dy = 0 there)
            gB = tl.sum(g * B_t, axis=1)
            dlog = g * a * x_prev  # dL/d(dt_t A)
            tl.store(du_ptr + row * l + t, gB * dt_t, mask=on_t)
            tl.store(ddt_ptr + row * l + t, tl.sum(dlog * A, axis=1) + gB * u_t, mask=on_t)
            dA += dlog * dt_t[:, None]
            dB_t = g * (dt_t * u_t)[:, None]
            dC_t = x_t * dy_t[:, None]
            if B_VAR:
                tl.atomic_add(dB_at + t * sB_t, tl.sum(dB_t, axis=0), mask=on_n & in_l)
            else:
                dB += dB_t
            if C_VAR:
                tl.atomic_add(dC_at + t * sC_t, tl.sum(dC_t, axis=0), mask=on_n & in_l)
            else:
                dC += dC_t
            g = g * a  # the part of dL/dx_{t-1} that flows through x_t
        tl.debug_barrier()
    tl.atomic_add(dA_ptr + ch[:, None] * n + m[None, :], dA, mask=on)
    if not B_VAR:
        tl.atomic_add(dB_ptr + ch[:, None] * sB_g + m[None, :] * sB_n, dB, mask=on)
    if not C_VAR:
        tl.atomic_add(dC_ptr + ch[:, None] * sC_g + m[None, :] * sC_n, dC, mask=on)



def _strides(X: Tensor, e: int) -> tuple[Tensor, tuple[int, int, int, int, int], bool]:
    """X contiguous, its (s_b, s_g, s_n, s_t, h) and whether it varies in time."""
    X = X.contiguous()
    if X.dim() == 2:  # (e n)
        return X, (0, X.shape[1], 1, 0, 1), False
    if X.dim() == 3:  # (b n l): one group
        return X, (X.stride(0), 0, X.stride(1), 1, e), True
    g = X.shape[1]  # (b g n l)
    return X, (X.stride(0), X.stride(1), X.stride(2), 1, e // g), True


def _block_e(e: int, shared: list[int]) -> int:
    """Channels per program: a power of two <= 16 that divides the h of every
    time-varying B or C, so that a tile never straddles two groups."""
    block = 16
    for h in shared:
        block = math.gcd(block, h)
    return min(block, 1 << max(0, (e - 1).bit_length()))


def _layout(u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple:
    """B and C contiguous, their strides and kinds, and the programs' grid and tile width."""
    (b, e, _), n = u.shape, A.shape[1]
    B, sB, B_var = _strides(B, e)
    C, sC, C_var = _strides(C, e)
    block_e = _block_e(e, [s[4] for s, var in ((sB, B_var), (sC, C_var)) if var])
    return B, sB, B_var, C, sC, C_var, block_e, (b, -(-e // block_e)), _block_n(n)


@torch.library.custom_op("lsnn::selective_scan_triton", mutates_args=())
def _scan_op(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(u, dt (b e l), A (e n), B, C) -> (y (b e l), x_last (b e n), the states every
    ``chunk`` steps (b e n l/chunk), which the backward starts from), fp32."""
    (b, e, l), n = u.shape, A.shape[1]
    u, dt, A = u.contiguous(), dt.contiguous(), A.contiguous()
    B, sB, _, C, sC, _, block_e, grid, block_n = _layout(u, A, B, C)
    n_chunks = -(-l // chunk)
    y, last = u.new_empty(b, e, l), u.new_empty(b, e, n)
    ckpt = u.new_empty(b, e, n, n_chunks)
    _forward[grid](u, dt, A, B, C, y, last, ckpt, e, n, l, n_chunks, *sB, *sC,
                   CHUNK=chunk, BLOCK_E=block_e, BLOCK_N=block_n)
    return y, last, ckpt


@_scan_op.register_fake
def _(u, dt, A, B, C, chunk):
    (b, e, l), n = u.shape, A.shape[1]
    return u.new_empty(b, e, l), u.new_empty(b, e, n), u.new_empty(b, e, n, -(-l // chunk))


@torch.library.custom_op("lsnn::selective_scan_triton_backward", mutates_args=())
def _scan_backward_op(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, ckpt: Tensor, dy: Tensor | None,
                      dlast: Tensor | None, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of u, dt, A, B and C for the upstream dy (b e l) and dlast (b e n) (None: zero)."""
    (b, e, l), n = u.shape, A.shape[1]
    u, dt, A = u.contiguous(), dt.contiguous(), A.contiguous()
    B, sB, B_var, C, sC, C_var, block_e, grid, block_n = _layout(u, A, B, C)
    n_chunks = ckpt.shape[-1]
    dy = u.new_zeros(b, e, l) if dy is None else dy.to(u.dtype).contiguous()
    dlast = u.new_zeros(b, e, n) if dlast is None else dlast.to(u.dtype).contiguous()
    scratch = u.new_empty(b, e, n, chunk + 1)
    du, ddt = torch.empty_like(u), torch.empty_like(u)
    dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    _backward[grid](u, dt, A, B, C, ckpt, dy, dlast, scratch, du, ddt, dA, dB, dC, e, n, l, n_chunks,
                    *sB, *sC, B_VAR=B_var, C_VAR=C_var, CHUNK=chunk, BLOCK_E=block_e, BLOCK_N=block_n)
    return du, ddt, dA, dB, dC


@_scan_backward_op.register_fake
def _(u, dt, A, B, C, ckpt, dy, dlast, chunk):
    return tuple(x.new_empty(x.shape) for x in (u, dt, A, B, C))


def _setup_context(ctx, inputs, output) -> None:
    u, dt, A, B, C, chunk = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused last state sends no zeros
    ctx.save_for_backward(u, dt, A, B, C, output[2])
    ctx.chunk = chunk


def _backward_fn(ctx, dy, dlast, _):
    u, dt, A, B, C, ckpt = ctx.saved_tensors
    return *_scan_backward_op(u, dt, A, B, C, ckpt, dy, dlast, ctx.chunk), None


_scan_op.register_autograd(_backward_fn, setup_context=_setup_context)


def _block_n(n: int) -> int:
    return max(2, 1 << max(0, (n - 1).bit_length()))


def triton_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """y (b e l) and the last state (b e n) of the scan, differentiable in every argument.

    fp32 tensors on CUDA, or on the CPU where Triton was imported under TRITON_INTERPRET=1;
    dt already discretised.
    """
    if u.dtype != torch.float32:
        raise ValueError(f"the Triton selective scan computes in float32, got {u.dtype}; "
                         "use --scan-impl parallel or loop for float64")
    problem = triton_support.device_problem(u)
    if problem is not None:
        raise ValueError(f"the Triton selective scan cannot run: {problem}")
    y, last, _ = _scan_op(u, dt, A, B, C, CHUNK)
    return y, last
