"""``op_support.Recurrence``: every recurrence's eager path (an ``autograd.Function``) gives
the values and gradients of its custom ops bit for bit, eager calls take that path, and a
dispatch mode (what traces and counts) sees the ops."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.ops import numba_support, triton_support
from model.ops.cfc import interface as cfc
from model.ops.lif import interface as lif
from model.ops.selective_scan import numba_kernel as scan_numba

needs_numba = pytest.mark.skipif(not numba_support.available(), reason="numba not installed: pip install numba")
needs_triton = pytest.mark.skipif(not triton_support.interpreted(),
                                  reason="Triton compiles in this process (CUDA present): the gpu tests cover it")


def _cfc(impl):
    g = torch.Generator().manual_seed(0)
    b, l, k, q = 3, 7, 16, 8
    tensors = [torch.randn(b, l, k, generator=g), torch.randn(b, q, generator=g).tanh(),
               torch.randn(k, q, generator=g) * 0.3, torch.randn(3 * q, k, generator=g) * 0.3,
               torch.randn(3 * q, generator=g) * 0.1]
    return cfc._cfc_scan_op, tensors, (0.666, 1.7159, impl), 2  # y and last h take gradients


def _lif(impl):
    g = torch.Generator().manual_seed(1)
    return lif._lif_op, [torch.randn(2, 9, 5, generator=g) * 2], (0.9, 1.0, "atan", 2.0, impl), 2


def _scan(module, *extra):
    g = torch.Generator().manual_seed(2)
    b, e, n, l = 2, 6, 4, 11
    tensors = [torch.randn(b, e, l, generator=g), torch.randn(b, e, l, generator=g) * 0.5,
               -torch.rand(e, n, generator=g) - 0.5, torch.randn(b, n, l, generator=g),
               torch.randn(b, n, l, generator=g), torch.randn(e, generator=g), torch.randn(b, e, l, generator=g),
               torch.randn(e, generator=g) * 0.1]
    return module._scan_op, tensors, (True, *extra), 2  # out and the last state


def _triton_scan():
    from model.ops.selective_scan import triton_kernel

    return _scan(triton_kernel, 4)


CASES = {
    "cfc-numba": pytest.param(lambda: _cfc("numba"), marks=needs_numba),
    "cfc-torch": lambda: _cfc("torch"),
    "cfc-triton": pytest.param(lambda: _cfc("triton"), marks=needs_triton),
    "lif-numba": pytest.param(lambda: _lif("numba"), marks=needs_numba),
    "lif-numpy": lambda: _lif("numpy"),
    "lif-torch": lambda: _lif("torch"),
    "lif-triton": pytest.param(lambda: _lif("triton"), marks=needs_triton),
    "scan-numba": pytest.param(lambda: _scan(scan_numba), marks=needs_numba),
    "scan-triton": pytest.param(_triton_scan, marks=needs_triton),
}


def _run(call, tensors, rest, n_grad):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = call(*leaves, *rest)
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out[:n_grad]]
    torch.autograd.backward(list(out[:n_grad]), upstream)
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_the_eager_path_equals_the_custom_ops_bit_for_bit(case):
    rec, tensors, rest, n_grad = case()
    eager_out, eager_grads = _run(rec, tensors, rest, n_grad)
    op_out, op_grads = _run(rec.op, tensors, rest, n_grad)
    assert type(eager_out[0].grad_fn).__name__.endswith("_eagerBackward"), "the eager call took the op"
    assert type(op_out[0].grad_fn).__name__ != type(eager_out[0].grad_fn).__name__
    for i, (a, b) in enumerate(zip(eager_out, op_out)):
        assert torch.equal(a, b), f"output {i}"
    for i, (a, b) in enumerate(zip(eager_grads, op_grads)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"gradient of input {i}"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_the_custom_ops_run_forward_and_backward():
    rec, tensors, rest, n_grad = _cfc("torch")
    with _Ops() as mode:
        out, _ = _run(rec, tensors, rest, n_grad)
    assert "lsnn.cfc_scan.default" in mode.seen and "lsnn.cfc_scan_backward.default" in mode.seen
    assert not type(out[0].grad_fn).__name__.endswith("_eagerBackward")
