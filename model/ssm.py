"""Selective state-space scan (Mamba's S6): the reference and its fast paths.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t      (per channel e, state n)
    y_t = <x_t, C_t> + D * u_t,      out_t = y_t * silu(z_t)

Arguments, shapes and semantics follow mamba-ssm's ``selective_scan_ref`` (real A only):
``selective_scan_ref`` is the oracle, written straight from the equation;
``selective_scan_numba`` is the fast CPU path (a compiled kernel, ``model.numba_scan``);
``selective_scan_loop`` is the CPU path in plain torch (hand-written backward), where
numba is absent;
``selective_scan_parallel`` is a work-efficient log-depth (Blelloch) scan in plain torch,
the GPU path without a kernel;
``selective_scan_triton`` is a Triton kernel (``model.triton_scan``), the GPU path
without mamba-ssm;
``selective_scan_chunked`` is a chunked parallel scan (quadratic inside a chunk), kept as
a second plain-torch GPU path;
``selective_scan`` dispatches between them and mamba-ssm's CUDA kernel.

Shape letters:
    b  batch
    e  channels (Mamba's inner width, d_inner)
    n  state size per channel (d_state)
    l  sequence length
    g  groups of channels sharing one B or C (e divisible by g); h = e // g channels a group
    t, s  positions inside one chunk (chunked scan)
    p  the sequence padded to a power of two (parallel scan)

B and C are each (e n) constant, (b n l) variable or (b g n l) grouped. The scan runs in
fp32 (fp64 stays fp64, so gradcheck can use it); the output is cast back to u's dtype and
the last state (b e n) is returned in the compute dtype, as mamba-ssm's reference does.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ScanImpl = Literal["auto", "numba", "loop", "parallel", "triton", "chunked", "cuda", "ref"]
SCAN_IMPLS: tuple[str, ...] = ("auto", "numba", "loop", "parallel", "triton", "chunked", "cuda", "ref")

ScanResult = Tensor | tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------
# Shared checks and the fp32 prologue/epilogue
# ---------------------------------------------------------------------------------------


def _check_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
) -> None:
    """Raise a ValueError naming the shapes when the arguments do not fit together."""
    if A.is_complex():
        raise ValueError(
            "complex A is not supported by this selective scan; pass a real A (e n), "
            "as Mamba's S4D-real initialisation does"
        )
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(
            f"expected u and delta (b e l) and A (e n) with the same e; got u {tuple(u.shape)}, "
            f"delta {tuple(delta.shape)}, A {tuple(A.shape)}"
        )
    (b, e, l), n = u.shape, A.shape[1]
    if l < 1:
        raise ValueError(f"the sequence is empty: u {tuple(u.shape)} has length l = 0")
    for name, t in (("B", B), ("C", C)):
        ok = (
            (t.dim() == 2 and tuple(t.shape) == (e, n))
            or (t.dim() == 3 and tuple(t.shape) == (b, n, l))
            or (t.dim() == 4 and tuple(t.shape) == (b, t.shape[1], n, l) and t.shape[1] > 0
                and e % t.shape[1] == 0)
        )
        if not ok:
            raise ValueError(
                f"{name} {tuple(t.shape)} fits none of (e n)={(e, n)}, (b n l)={(b, n, l)} "
                f"or (b g n l) with e={e} divisible by g"
            )
    for name, t, shape in (("D", D, (e,)), ("z", z, (b, e, l)), ("delta_bias", delta_bias, (e,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for u {tuple(u.shape)}, got {tuple(t.shape)}")


def _compute_dtype(u: Tensor) -> torch.dtype:
    """fp32 for fp32 and below, fp64 for fp64."""
    return torch.promote_types(u.dtype, torch.float32)


def _discretize_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_out: torch.dtype
) -> Tensor:
    """out = (y + D u) * silu(z), cast to the input dtype; y and u in the compute dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


# ---------------------------------------------------------------------------------------
# Reference: the test oracle, straight from the equation
# ---------------------------------------------------------------------------------------


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Sequential selective scan, as mamba-ssm's ``selective_scan_ref``; the oracle."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    e = u.shape[1]
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Grouped B/C: each group's matrix is shared by its e/g channels.
    if B.dim() == 4:
        B = B.repeat_interleave(e // B.shape[1], dim=1)  # (b e n l)
    if C.dim() == 4:
        C = C.repeat_interleave(e // C.shape[1], dim=1)  # (b e n l)
    B, C = B.to(dtype), C.to(dtype)

    deltaA = torch.exp(torch.einsum("bel,en->beln", delta, A))  # (b e l n)
    if B.dim() == 2:
        deltaB_u = torch.einsum("bel,en,bel->beln", delta, B, u)  # (b e l n)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bel,bnl,bel->beln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bel,benl,bel->beln", delta, B, u)
    C_steps = [C] * u.shape[2] if C.dim() == 2 else C.unbind(-1)  # each (e n), (b n) or (b e n)

    x = u.new_zeros(u.shape[0], e, A.shape[1])  # (b e n)
    ys = []
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_steps):
        x = dA_t * x + dBu_t
        if C.dim() == 3:  # variable: one (b n) C_t for all channels
            ys.append(torch.einsum("ben,bn->be", x, C_t))
        else:  # constant (e n) or per channel (b e n)
            ys.append((x * C_t).sum(-1))
    y = torch.stack(ys, dim=2)  # (b e l)
    out = y if D is None else y + u * D.to(dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(dtype))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------------------------------
# B and C in time-major layout, whatever their kind
# ---------------------------------------------------------------------------------------


def _time_major(v: Tensor) -> Tensor:
    """(... l) -> contiguous (l ...): each step of a scan is then one contiguous block.

    Done as one 2-D transpose, which torch copies in cache-sized tiles; a general
    permute reads with a stride of l floats and was 8x slower at l=1024.
    """
    l = v.shape[-1]
    return v.reshape(-1, l).t().contiguous().view(l, *v.shape[:-1])


def _time_last(v: Tensor) -> Tensor:
    """(l ...) -> contiguous (... l), the inverse of ``_time_major``."""
    l = v.shape[0]
    return v.reshape(l, -1).t().contiguous().view(*v.shape[1:], l)


@dataclass(frozen=True)
class _StateMap:
    """B or C laid out for the time-major scan: constant (e n) or grouped (l b g n).

    Variable (b n l) is grouped with g = 1. ``outer`` spreads a per-channel signal onto
    the state, ``dot`` contracts a state with it, ``grad`` is the gradient of ``outer``
    with respect to the map itself.
    """

    t: Tensor
    constant: bool

    @staticmethod
    def of(X: Tensor, dtype: torch.dtype) -> _StateMap:
        X = X.to(dtype)
        if X.dim() == 2:
            return _StateMap(X, constant=True)  # (e n)
        if X.dim() == 3:
            X = X.unsqueeze(1)  # (b 1 n l)
        return _StateMap(_time_major(X), constant=False)  # (l b g n)

    def split(self, size: int) -> Iterator[_StateMap]:
        """Blocks of ``size`` steps; a constant map is every block's."""
        if self.constant:
            return itertools.repeat(self)
        return (_StateMap(block, False) for block in self.t.split(size))

    def join_grads(self, grads: list[Tensor], like: Tensor) -> Tensor:
        """The per-block ``grad``s, in time order, as the gradient of ``like`` (B or C)."""
        if self.constant:
            return torch.stack(grads).sum(0)  # (e n)
        grad = _time_last(torch.cat(grads))  # (b g n l)
        return grad.squeeze(1) if like.dim() == 3 else grad

    def _groups(self, s: Tensor) -> Tensor:
        return s.unflatten(2, (self.t.shape[2], -1))  # (l b e ...) -> (l b g h ...)

    def outer(self, v: Tensor) -> Tensor:
        """(l b e) -> (l b e n): v_e * X_{e,n}."""
        if self.constant:
            return v[..., None] * self.t
        return (self._groups(v)[..., None] * self.t[:, :, :, None, :]).flatten(2, 3)

    def dot(self, s: Tensor) -> Tensor:
        """(l b e n) -> (l b e): sum_n s_{e,n} X_{e,n}."""
        if self.constant:
            return torch.einsum("lben,en->lbe", s, self.t)
        return torch.einsum("lbghn,lbgn->lbgh", self._groups(s), self.t).flatten(2)

    def grad(self, s: Tensor, v: Tensor) -> Tensor:
        """d/dX of sum(s * outer(v)), shaped like ``t``."""
        if self.constant:
            return torch.einsum("lben,lbe->en", s, v)
        return torch.einsum("lbghn,lbgh->lbgn", self._groups(s), self._groups(v))


def _split_time(
    size: int, u: Tensor, dt: Tensor, Bm: _StateMap, Cm: _StateMap
) -> list[tuple[Tensor, Tensor, _StateMap, _StateMap]]:
    """Blocks of ``size`` steps of time-major u, dt (l b e), B and C, in time order."""
    return list(zip(u.split(size), dt.split(size), Bm.split(size), Cm.split(size)))


# ---------------------------------------------------------------------------------------
# Loop: the fast CPU path, one fused multiply-add per token, hand-written backward
# ---------------------------------------------------------------------------------------

# Elements of one time block's (k b e n) temporaries: 4 MB of fp32, about the L2 cache of
# two cores. Full-length (l b e n) temporaries instead run from main memory and page-fault
# on every call (they made l=256 seven times slower than l=64, not four); measured best
# of 2^18..2^22 at b=4, e=512, n=16 on the 2-core development machine.
_BLOCK_ELEMS = 1 << 20


def _block_states(
    u: Tensor, dt: Tensor, A: Tensor, Bm: _StateMap, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """States (k b e n) of one block from the state x0 (b e n) before it, and its decays."""
    decay = torch.exp(dt[..., None] * A)  # (k b e n)
    states = Bm.outer(dt * u)  # (k b e n): the inputs, scanned in place
    prev = x0
    for a_t, x_t in zip(decay.unbind(0), states.unbind(0)):
        prev = x_t.addcmul_(a_t, prev)
    return states, decay


def _adjoint_block_(decay: Tensor, g: Tensor, after: Tensor) -> Tensor:
    """g_t += decay_{t+1} g_{t+1} backwards along dim 0, in place: the adjoint dL/dx_t.

    g holds dL/dy_t C_t on entry; ``after`` is the term reaching the block's last step
    from the step after it. Returns the term for the step before the block.
    """
    steps, decays = g.unbind(0), decay.unbind(0)
    steps[-1].add_(after)
    for g_t, a_next, g_next in zip(steps[-2::-1], decays[:0:-1], steps[:0:-1]):
        g_t.addcmul_(a_next, g_next)
    return decays[0] * steps[0]


class _LoopScan(torch.autograd.Function):
    """y = <x_t, C_t>, x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t; returns (y, x_last).

    Time-major, so each step is one contiguous (b e n) fused multiply-add, and blocked
    in time so every (k b e n) temporary stays in cache. Saves only the state before each
    block; the backward walks the blocks from the end, recomputes each block's states and
    runs the reverse scan of the adjoint g_t = dL/dx_t, from which every gradient is a
    batched product. Time and memory are linear in l; memory is O(b e n l / k).
    """

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor):  # type: ignore[override]
        Bm, Cm = _StateMap.of(B, u.dtype), _StateMap.of(C, u.dtype)
        x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b e n)
        ctx.block = max(1, _BLOCK_ELEMS // x.numel())
        ys, starts = [], []
        blocks = _split_time(ctx.block, _time_major(u), _time_major(dt), Bm, Cm)
        for u_k, dt_k, B_k, C_k in blocks:
            starts.append(x)
            states, _ = _block_states(u_k, dt_k, A, B_k, x)  # (k b e n)
            ys.append(C_k.dot(states))  # (k b e)
            x = states[-1].clone()
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(starts))
        return _time_last(torch.cat(ys)), x  # (b e l), (b e n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor, dlast: Tensor):  # type: ignore[override]
        u, dt, A, B, C, starts = ctx.saved_tensors
        Bm, Cm = _StateMap.of(B, u.dtype), _StateMap.of(C, u.dtype)
        blocks = _split_time(ctx.block, _time_major(u), _time_major(dt), Bm, Cm)
        dys = _time_major(dy.to(u.dtype)).split(ctx.block)  # each (k b e)
        grads, after = [], dlast
        for (u_k, dt_k, B_k, C_k), dy_k, x0 in reversed(list(zip(blocks, dys, starts.unbind(0)))):
            states, decay = _block_states(u_k, dt_k, A, B_k, x0)
            g = C_k.outer(dy_k)  # (k b e n): dL/dy_t spread onto the state
            after = _adjoint_block_(decay, g, after)
            grads.append(_block_grads(u_k, dt_k, A, B_k, C_k, dy_k, x0, states, decay, g))
        du, ddt, dA, dB, dC = zip(*reversed(grads))
        return (
            _time_last(torch.cat(du)),  # (b e l)
            _time_last(torch.cat(ddt)),
            torch.stack(dA).sum(0),
            Bm.join_grads(list(dB), B),
            Cm.join_grads(list(dC), C),
        )


def _block_grads(
    u: Tensor, dt: Tensor, A: Tensor, Bm: _StateMap, Cm: _StateMap, dy: Tensor,
    x0: Tensor, states: Tensor, decay: Tensor, g: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block's gradients for u, dt (k b e), A, B and C from its adjoint g (k b e n)."""
    dlog = decay * g  # (k b e n): dL/d(dt A) = g_t decay_t x_{t-1}
    dlog[0] *= x0
    dlog[1:] *= states[:-1]
    gB = Bm.dot(g)  # (k b e): sum_n g B
    ddt = torch.einsum("kben,en->kbe", dlog, A) + gB * u
    dA = dlog.mul_(dt[..., None]).sum((0, 1))  # (e n); einsum would transpose dlog
    return gB * dt, ddt, dA, Bm.grad(g, dt * u), Cm.grad(states, dy)


def selective_scan_loop(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Sequential scan with a hand-written backward: the CPU path.

    Linear in l in time and memory. Unlike mamba-ssm's kernel, the gradient of the
    returned last state is propagated.
    """
    return _scan_with(
        _LoopScan.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


Core = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _scan_with(
    core: Core, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
    delta_softplus: bool, return_last_state: bool,
) -> ScanResult:
    """Check, discretise delta and upcast in torch, run ``core(u, dt, A, B, C) -> (y, last)``
    in the compute dtype, then the skip and gate: every fast path but chunked and cuda."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    u32 = u.to(dtype)
    dt = _discretize_delta(delta, delta_bias, delta_softplus, dtype)
    y, last = core(u32, dt, A.to(dtype), B.to(dtype), C.to(dtype))
    out = _skip_and_gate(y, u32, D, z, u.dtype)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------
# Numba: the CPU kernel (model.numba_scan), the loop's equations in one compiled pass
# ---------------------------------------------------------------------------------------


def selective_scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The scan, skip and gate as one compiled kernel per direction, on the CPU
    (``model.numba_scan``).

    Saves only its inputs for the backward, which recomputes dt, the gate and the states
    channel by channel; the gradient of the returned last state is propagated.
    """
    from model.numba_scan import numba_selective_scan

    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = numba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------
# Chunked: parallel inside a chunk, a short loop across chunks (the GPU path)
# ---------------------------------------------------------------------------------------


def _segment_sums(log_decay: Tensor) -> Tensor:
    """(b e n t) -> (b e n t s): sum of log_decay over (s, t] where s <= t, -inf above.

    Summed window by window (a cumsum down each column of a masked matrix), not as
    S_t - S_s of one running sum: that difference of two large sums loses the digits of a
    short window, which cost the gradients a factor of ten in accuracy. Masking to -inf
    before the exponential keeps s > t from overflowing.
    """
    T = log_decay.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=log_decay.device)
    below = torch.where(ones.tril(-1), log_decay[..., :, None], 0.0)  # (b e n t s): a_t if t > s
    return torch.where(ones.tril(), below.cumsum(-2), float("-inf"))


def _scan_chunk(
    x0: Tensor, u: Tensor, dt: Tensor, A: Tensor, Bm: _StateMap, Cm: _StateMap
) -> tuple[Tensor, Tensor]:
    """One chunk in parallel: x_t = e^{S_t} x0 + sum_{s<=t} e^{S_t - S_s} dt_s u_s B_s,
    with S the cumulative sum of the log-decays dt A <= 0 inside the chunk."""
    log_decay = (dt[..., None] * A).permute(1, 2, 3, 0)  # (b e n t)
    inputs = Bm.outer(dt * u).permute(1, 2, 3, 0)  # (b e n s)
    from_x0 = log_decay.cumsum(-1).exp() * x0[..., None]  # (b e n t)
    states = (_segment_sums(log_decay).exp() @ inputs[..., None]).squeeze(-1) + from_x0  # (b e n t)
    states = states.permute(3, 0, 1, 2)  # (t b e n)
    return Cm.dot(states), states[-1]


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = 64,
) -> ScanResult:
    """Chunked parallel scan: no per-token loop, a loop over l / chunk_size chunks.

    A chunk holds a (b e n chunk chunk) decay matrix, so the work is b e n l chunk_size
    (chunk_size times the loop's): a GPU path, hundreds of times slower than the loop on
    a CPU. Under autograd each chunk is checkpointed (recomputed in the backward), so
    peak memory is a few of one chunk's matrices, not b e n l chunk_size.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dtype = _compute_dtype(u)
    u32 = u.to(dtype)
    dt = _discretize_delta(delta, delta_bias, delta_softplus, dtype)
    A32 = A.to(dtype)
    Bm, Cm = _StateMap.of(B, dtype), _StateMap.of(C, dtype)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u32, dt, A32, Bm.t, Cm.t)
    )
    x = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b e n)
    ys = []
    chunks = _split_time(chunk_size, _time_major(u32), _time_major(dt), Bm, Cm)
    for u_c, dt_c, B_c, C_c in chunks:
        if grad:
            y_c, x = checkpoint(_scan_chunk, x, u_c, dt_c, A32, B_c, C_c, use_reentrant=False)
        else:
            y_c, x = _scan_chunk(x, u_c, dt_c, A32, B_c, C_c)
        ys.append(y_c)  # (t b e)
    y = _time_last(torch.cat(ys))  # (b e l)
    out = _skip_and_gate(y, u32, D, z, u.dtype)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------------------------------
# Parallel: a work-efficient log-depth scan in plain torch (the GPU path without kernels)
# ---------------------------------------------------------------------------------------


def _pscan_(a: Tensor, x: Tensor) -> None:
    """x_t = a_t x_{t-1} + x_t along dim 0 (length a power of two), in place (Blelloch).

    The pairs (a, x) compose as (a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2). The up-sweep
    combines neighbours at strides 1, 2, 4, ... so the last element of each aligned block
    holds that block's composition; the down-sweep carries the full prefix into the
    middle of each block, from the widest stride down. 2 log2(p) steps of elementwise work
    on views, p - 1 compositions each way: O(p) work, O(log p) depth. ``a`` is consumed.
    """
    p = a.shape[0]
    levels = p.bit_length() - 1
    for d in range(levels):  # up-sweep
        step = 1 << d
        a_d = a[step - 1 :: step].unflatten(0, (-1, 2))  # (p / 2step, 2, ...)
        x_d = x[step - 1 :: step].unflatten(0, (-1, 2))
        x_d[:, 1].addcmul_(a_d[:, 1], x_d[:, 0])
        a_d[:, 1].mul_(a_d[:, 0])
    for d in range(levels - 2, -1, -1):  # down-sweep
        step = 1 << d
        a_d = a[step - 1 :: step].unflatten(0, (-1, 2))
        x_d = x[step - 1 :: step].unflatten(0, (-1, 2))
        # the first of each pair (past the first) follows the prefix ending just before it
        x_d[1:, 0].addcmul_(a_d[1:, 0], x_d[:-1, 1])
        a_d[1:, 0].mul_(a_d[:-1, 1])


def _linear_scan(a: Tensor, x: Tensor) -> Tensor:
    """states_t = a_t states_{t-1} + x_t along dim 0 from a zero state, for any length."""
    l = a.shape[0]
    p = 1 << max(0, (l - 1).bit_length())
    if p != l:  # pad with identity steps (a = 1, x = 0) after the sequence
        a = torch.cat([a, a.new_ones(p - l, *a.shape[1:])])
        x = torch.cat([x, x.new_zeros(p - l, *x.shape[1:])])
    else:
        a = a.clone()
    _pscan_(a, x)
    return x[:l]


class _ParallelScan(torch.autograd.Function):
    """``_LoopScan``'s function, with the forward states and the backward adjoint each
    one ``_linear_scan`` over the whole sequence instead of a loop over tokens.

    Keeps the states (l b e n) for the backward, which recomputes the decays, runs the
    adjoint scan on the reversed sequence, and takes every gradient from ``_block_grads``.
    """

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor):  # type: ignore[override]
        Bm, Cm = _StateMap.of(B, u.dtype), _StateMap.of(C, u.dtype)
        u_t, dt_t = _time_major(u), _time_major(dt)  # (l b e)
        decay = torch.exp(dt_t[..., None] * A)  # (l b e n)
        states = _linear_scan(decay, Bm.outer(dt_t * u_t))  # (l b e n)
        ctx.save_for_backward(u, dt, A, B, C, states)
        return _time_last(Cm.dot(states)), states[-1].clone()  # (b e l), (b e n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor, dlast: Tensor):  # type: ignore[override]
        u, dt, A, B, C, states = ctx.saved_tensors
        Bm, Cm = _StateMap.of(B, u.dtype), _StateMap.of(C, u.dtype)
        u_t, dt_t = _time_major(u), _time_major(dt)
        dy_t = _time_major(dy.to(u.dtype))  # (l b e)
        decay = torch.exp(dt_t[..., None] * A)  # (l b e n)
        # g_t = decay_{t+1} g_{t+1} + C_t dy_t: a forward scan of the reversed sequence
        inputs = Cm.outer(dy_t)  # (l b e n)
        inputs[-1] += dlast
        carried = torch.cat([decay[1:], torch.zeros_like(decay[:1])]).flip(0)
        g = _linear_scan(carried, inputs.flip(0)).flip(0)  # (l b e n)
        x0 = torch.zeros_like(states[0])
        du, ddt, dA, dB, dC = _block_grads(u_t, dt_t, A, Bm, Cm, dy_t, x0, states, decay, g)
        return _time_last(du), _time_last(ddt), dA, Bm.join_grads([dB], B), Cm.join_grads([dC], C)


def selective_scan_parallel(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Work-efficient parallel scan in plain torch: O(b e n l) work and memory, O(log l)
    steps of elementwise kernels. The GPU path where neither Triton nor mamba-ssm is."""
    return _scan_with(
        _ParallelScan.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


# ---------------------------------------------------------------------------------------
# Triton: the GPU kernel (model.triton_scan)
# ---------------------------------------------------------------------------------------


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The scan as a Triton kernel (forward and backward), on CUDA or, with
    TRITON_INTERPRET=1, on the CPU through Triton's interpreter (the tests)."""
    from model.triton_scan import triton_scan

    return _scan_with(triton_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

_CUDA_FIX = (
    "on a CUDA machine `pip install lsnn[cuda]` (mamba-ssm), or choose another "
    "implementation: --scan-impl numba or --scan-impl loop (CPU), --scan-impl triton or "
    "--scan-impl parallel (GPU)"
)


@functools.lru_cache(maxsize=1)
def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's CUDA selective-scan kernel can be imported."""
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except (ImportError, OSError, RuntimeError):  # missing, or built against another CUDA/torch
        return False
    return True


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton is installed (the kernel compiles on first use). Not imported here:
    Triton reads TRITON_INTERPRET once, when first imported."""
    return importlib.util.find_spec("triton") is not None


def numba_available() -> bool:
    """Whether numba can be imported, for the CPU kernel."""
    from model.numba_scan import available

    return available()


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_scan_impl(u: Tensor, impl: str) -> str:
    """The implementation ``selective_scan`` will run for ``u``: never "auto".

    auto: on CUDA mamba-ssm's kernel when installed, else the Triton kernel when Triton
    imports, else the parallel scan; on the CPU the numba kernel, else the torch loop.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(
            f"unknown selective-scan implementation {impl!r}; valid: {', '.join(SCAN_IMPLS)}"
        )
    if impl == "auto":
        if u.is_cuda:
            if mamba_ssm_available():
                return "cuda"
            return "triton" if triton_available() else "parallel"
        return "numba" if u.device.type == "cpu" and numba_available() else "loop"
    if impl == "cuda":
        if not u.is_cuda:
            raise ValueError(
                f"--scan-impl cuda runs mamba-ssm's CUDA kernel, but the tensors are on "
                f"{u.device}; {_CUDA_FIX}"
            )
        if not mamba_ssm_available():
            raise ValueError(
                f"--scan-impl cuda needs mamba-ssm, which cannot be imported; {_CUDA_FIX}"
            )
    if impl == "numba":
        if u.device.type != "cpu":
            raise ValueError(
                f"--scan-impl numba runs on the CPU, but the tensors are on {u.device}; "
                "use --scan-impl triton or parallel on a GPU"
            )
        if not numba_available():
            raise ValueError("--scan-impl numba needs numba, which cannot be imported; "
                             "pip install numba, or use --scan-impl loop")
    if impl == "triton":
        if not triton_available():
            raise ValueError("--scan-impl triton needs Triton, which cannot be imported; "
                             "pip install lsnn[triton], or use --scan-impl parallel")
        if not (u.is_cuda or triton_interpreted()):
            raise ValueError(
                f"--scan-impl triton runs on CUDA (or on the CPU under TRITON_INTERPRET=1, "
                f"for tests), but the tensors are on {u.device}; use --scan-impl numba or loop"
            )
    return impl


def _selective_scan_cuda(*args, **kwargs) -> ScanResult:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(*args, **kwargs)


_IMPLS = {
    "ref": selective_scan_ref,
    "numba": selective_scan_numba,
    "loop": selective_scan_loop,
    "parallel": selective_scan_parallel,
    "triton": selective_scan_triton,
    "chunked": selective_scan_chunked,
    "cuda": _selective_scan_cuda,
}


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: ScanImpl = "auto",
) -> ScanResult:
    """The selective scan, by ``impl`` in ``SCAN_IMPLS`` (see the module docstring).

    Returns out (b e l) in u's dtype, and the last state (b e n) if ``return_last_state``.
    """
    fn = _IMPLS[resolve_scan_impl(u, impl)]
    return fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )
