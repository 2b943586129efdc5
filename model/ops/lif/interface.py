"""Leaky integrate-and-fire neurons over the token axis as one op, ``lsnn::lif``, with its
backward as another (``lsnn::lif_backward``); the equations are ``reference``'s.

The forward's per-token loop runs where ``impl`` says (``LIF_IMPLS``):

- ``numba``: compiled for the CPU (``numba_kernel``); the backward is the torch one;
- ``triton``: one Triton kernel for the forward and one for the backward (``triton_kernel``;
  CUDA, or the CPU under TRITON_INTERPRET=1);
- ``torch``: torch ops a token, on any device, and the backward as a discounted sum over
  all tokens at once (``torch_loop``);
- ``auto``: numba on the CPU (numpy ufuncs a token where numba is missing, which cost less
  than torch's dispatch there), triton on CUDA where Triton imports, else torch.

The op is a ``torch.library`` custom op with a fake implementation, so ``torch.compile``
and a CUDA graph see one node forward and one backward, not a loop over tokens; an eager
call runs the same functions as an ``autograd.Function``, without the ops' wrappers
(``op_support.Recurrence``).

Shapes: b batch, l length, s neurons.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from model.ops import triton_support
from model.ops.op_support import Recurrence
from model.ops.lif import numba_kernel, torch_loop
from model.ops.lif.reference import SURROGATES

LIFImpl = Literal["auto", "numba", "torch", "triton"]
LIF_IMPLS: tuple[str, ...] = ("auto", "numba", "torch", "triton")


def resolve_lif_impl(impl: str, cur: Tensor) -> str:
    """The implementation ``lif`` runs for the fp32 currents ``cur``: never "auto" (which may
    resolve to the CPU's "numpy" loop); an asked implementation that cannot run here is an
    error naming ``--lif-impl``."""
    if impl not in LIF_IMPLS:
        raise ValueError(f"unknown LIF implementation {impl!r}; use one of {', '.join(LIF_IMPLS)}")
    if impl == "auto":
        if cur.device.type == "cpu":
            return "numba" if numba_kernel.usable(cur) else "numpy"
        return "triton" if cur.is_cuda and triton_support.can_run(cur) else "torch"
    if impl == "numba" and not numba_kernel.usable(cur):
        raise ValueError(f"--lif-impl numba needs numba installed and a CPU tensor, got {cur.device}"
                         f"{'' if numba_kernel.available() else ' (numba is not installed)'}; use --lif-impl torch "
                         "(or triton on a GPU)")
    if impl == "triton":
        problem = triton_support.device_problem(cur)
        if problem is not None:
            raise ValueError(f"--lif-impl triton: {problem}; use --lif-impl numba or torch")
    return impl


def _forward(cur: Tensor, beta: float, threshold: float, kind: str, scale: float, impl: str) -> tuple[Tensor, Tensor]:
    """Spikes and membrane potentials (b l s) of fp32 currents (b l s); ``impl`` resolved
    (numba, numpy, torch or triton)."""
    if impl == "triton":
        from model.ops.lif import triton_kernel

        return triton_kernel.lif_forward(cur, beta, threshold)
    loops = {"numba": numba_kernel.lif_forward, "numpy": torch_loop.lif_loop_numpy, "torch": torch_loop.lif_loop_torch}
    mem = loops[impl](cur, beta, threshold).contiguous()
    return (mem > threshold).to(cur.dtype), mem


def _forward_fake(cur, beta, threshold, kind, scale, impl):
    return torch.empty_like(cur), torch.empty_like(cur)


def _backward(mem: Tensor, grad_spk: Tensor | None, grad_mem: Tensor | None, beta: float, threshold: float,
              kind: str, scale: float, impl: str) -> Tensor:
    """dL/dcur (b l s); an absent upstream gradient counts as zero."""
    if impl == "triton":
        from model.ops.lif import triton_kernel

        return triton_kernel.lif_backward(mem, grad_spk, grad_mem, beta, threshold, kind, scale)
    return torch_loop.lif_backward(mem, grad_spk, grad_mem, beta, threshold, kind, scale)


def _backward_fake(mem, grad_spk, grad_mem, beta, threshold, kind, scale, impl):
    return torch.empty_like(mem)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # an unused membrane or spike train sends no zeros
    ctx.save_for_backward(output[1])
    ctx.args = inputs[1:]


def _grads(ctx, grad_spk, grad_mem, *, backward):
    (mem,) = ctx.saved_tensors
    return backward(mem, grad_spk, grad_mem, *ctx.args), None, None, None, None, None


_lif_op = Recurrence("lif", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _grads)


def lif(
    cur: Tensor, beta: float, threshold: float, kind: str = "atan", scale: float = 2.0, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Spikes and membrane potentials (each b l s) of LIF neurons driven by ``cur`` (b l s).

    Runs in fp32 whatever the input dtype (thresholds in bf16 misfire), and returns the
    input's dtype. ``impl``: where the loop runs, one of ``LIF_IMPLS``.
    """
    if kind not in SURROGATES:
        raise ValueError(f"unknown surrogate {kind!r}; valid: {', '.join(SURROGATES)}")
    dtype = cur.dtype
    with torch.autocast(cur.device.type, enabled=False):
        x = cur.float().contiguous()
        spk, mem = _lif_op(x, float(beta), float(threshold), kind, float(scale), resolve_lif_impl(impl, x))
    return spk.to(dtype), mem.to(dtype)
