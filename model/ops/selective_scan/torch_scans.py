"""The selective scan in plain torch: the loop (the CPU path where numba is absent), the
work-efficient parallel (Blelloch) scan and the chunked scan (GPU paths without a kernel).
Each is tested against ``reference.selective_scan_ref``. Shape letters as in
``model.ops.selective_scan``; t, s are positions inside one chunk (chunked scan), p the
sequence padded to a power of two (parallel scan).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.ops.selective_scan.reference import (
    ScanResult,
    check_inputs,
    compute_dtype,
    discretize_delta,
    skip_and_gate,
)


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
    return scan_with(
        _LoopScan.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


Core = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def scan_with(
    core: Core, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
    delta_softplus: bool, return_last_state: bool,
) -> ScanResult:
    """Check, discretise delta and upcast in torch, run ``core(u, dt, A, B, C) -> (y, last)``
    in the compute dtype, then the skip and gate: the loop and the parallel scan."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u)
    u32 = u.to(dtype)
    dt = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    y, last = core(u32, dt, A.to(dtype), B.to(dtype), C.to(dtype))
    out = skip_and_gate(y, u32, D, z, u.dtype)
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
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dtype = compute_dtype(u)
    u32 = u.to(dtype)
    dt = discretize_delta(delta, delta_bias, delta_softplus, dtype)
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
    out = skip_and_gate(y, u32, D, z, u.dtype)
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
    return scan_with(
        _ParallelScan.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )
