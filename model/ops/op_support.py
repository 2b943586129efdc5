"""A recurrence's forward and backward as a pair of ``torch.library`` custom ops, and the
same two functions as an ``autograd.Function`` for eager calls: ``Recurrence``.

The custom ops are what a tracer must see. ``torch.compile`` and ``make_fx`` get one node
each way, shaped by its fake implementation, however long the sequence; a
``TorchDispatchMode`` (the launch counter of ``benchmarks/launches.py``) sees the ops.

An eager call does not need them, and their Python wrappers are not free: filling the
defaults, checking the outputs for aliases and the autograd layer's redispatch cost 20 to
30 µs a call each way on the CPU (a CfC scan and its backward at phase 1's shape: 735 µs
through the ops, 674 µs through the Function; a LIF: 119 and 82 µs). Phase 1 calls six
recurrences a step (two CfC scans, four LIFs): the Function path makes its CPU step 3%
faster. On a GPU, 30 µs of host time is several kernel launches. So an eager call runs a
plain ``autograd.Function`` whose forward, context and backward are the very functions the
ops run, and a call under ``torch.compile`` or a dispatch mode runs the ops.
``tests/model/ops/test_op_support.py`` checks that both give the same values and gradients,
bit for bit, for every recurrence.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


class Recurrence:
    """``lsnn::<name>`` (``forward``) and ``lsnn::<name>_backward`` (``backward``), each with
    its fake, the first's autograd given by ``setup_context(ctx, inputs, output)`` and
    ``grads(ctx, *upstream, backward=...)``, which returns the inputs' gradients by calling
    ``backward`` (the backward op, or the function itself on the eager path). ``forward``
    and ``backward`` carry the type annotations ``torch.library.custom_op`` reads.

    Call it as the op: eagerly through the ``autograd.Function``, the ops when traced."""

    def __init__(self, name: str, forward: Callable, forward_fake: Callable, backward: Callable,
                 backward_fake: Callable, setup_context: Callable, grads: Callable):
        self.op = torch.library.custom_op(f"lsnn::{name}", forward, mutates_args=())
        self.op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"lsnn::{name}_backward", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.op.register_autograd(functools.partial(grads, backward=self.backward_op), setup_context=setup_context)

        # forward(ctx, ...), not a separate setup_context: with one, every apply binds the
        # arguments through inspect.signature (about 10 µs)
        def eager_forward(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        def eager_backward(ctx, *upstream):
            return grads(ctx, *upstream, backward=backward)

        # named for the op, so that a grad_fn reads "<name>_eagerBackward"
        self.function: type[torch.autograd.Function] = type(
            f"{name}_eager", (torch.autograd.Function,),
            {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
            return self.op(*args)
        return self.function.apply(*args)
