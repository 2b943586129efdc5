"""The CfC scan's compiled loops (model.numba_cfc) against its torch loops and the reference:
values, gradients, threads' shares of the batch, the activations' accuracy, non-finite inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import numba_cfc
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.liquid import cfc_scan, cfc_scan_ref

pytestmark = pytest.mark.skipif(not numba_cfc.available(), reason="numba not installed: pip install numba")
numba = pytest.importorskip("numba")


def _args(b: int, l: int, k: int, q: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    args = [
        torch.randn(b, l, k, generator=g, dtype=dtype),
        torch.rand(b, q, generator=g, dtype=dtype) * 2 - 1,
        torch.randn(k, q, generator=g, dtype=dtype) / k**0.5,
        torch.randn(3 * q, k, generator=g, dtype=dtype) / k**0.5,
        torch.randn(3 * q, generator=g, dtype=dtype),
    ]
    return [a.requires_grad_() for a in args]


def _run(args, impl: str, scales=(0.666, 1.7159)):
    """(h sequence, last h, and the gradients of every input) for fixed upstream gradients."""
    y, h = (cfc_scan_ref(*args, *scales) if impl == "ref" else cfc_scan(*args, *scales, impl=impl))
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), args)
    return [y.detach(), h.detach(), *grads]


NAMES = ["h", "last h", "d zx", "d h0", "d w_h", "d w_p", "d b_p"]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), l=st.integers(1, 24), k=st.integers(1, 20), q=st.integers(1, 12),
       parts=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_compiled_loops_equal_the_torch_loops_for_any_shape_and_share_of_rows(b, l, k, q, parts, dtype):
    """Every shape, every split of the batch's rows among threads (parts > rows included)."""
    args = _args(b, l, k, q, dtype)
    real = numba_cfc._parts
    numba_cfc._parts = lambda rows: max(1, min(rows, parts))
    try:
        fast = _run(args, "numba")
    finally:
        numba_cfc._parts = real
    slow = _run(args, "torch")
    # fp32: the two compute tanh and lerp in different roundings, which the recurrence carries on
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, a, c in zip(NAMES, fast, slow):
        torch.testing.assert_close(a, c, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_loops_match_the_reference_at_phase_3s_width():
    """fp64, so the comparison sees the kernel's arithmetic, not fp32's rounding over long sums."""
    args = _args(4, 64, 128, 128, torch.float64, seed=3)
    for name, a, c in zip(NAMES, _run(args, "numba"), _run(args, "ref")):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_auto_takes_the_compiled_loops_on_the_cpu(monkeypatch):
    calls = []
    for fn in ("cfc_forward", "cfc_backward"):
        real = getattr(numba_cfc, fn)
        monkeypatch.setattr(numba_cfc, fn, lambda *a, real=real, fn=fn: calls.append(fn) or real(*a))
    _run(_args(2, 3, 4, 5), "auto")
    assert calls == ["cfc_forward", "cfc_backward"]
    calls.clear()
    _run(_args(2, 3, 4, 5), "torch")
    assert calls == []


def test_the_model_learns_the_same_with_either_loops(monkeypatch):
    """A phase-1-like model: loss and every parameter's gradient agree across the two paths."""
    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=2, liquid_units=16, spiking_units=8)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    x = torch.randint(0, 64, (3, 12))
    y = torch.randint(0, 64, (3, 12))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(x, targets=y).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_c, g_c = grads()
    monkeypatch.setattr(numba_cfc, "usable", lambda *a: False)
    loss_t, g_t = grads()
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-6, atol=1e-6)
    assert g_c.keys() == g_t.keys() and any("liquid" in n for n in g_c)
    for n in g_c:
        torch.testing.assert_close(g_c[n], g_t[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_input_stays_visible_in_outputs_and_gradients(dtype):
    """The guard must see a non-finite liquid stream: NaN at token 3 of row 1 reaches that
    row's outputs from token 3 on and the gradients, exactly where the torch loops put it."""
    results = {}
    for impl in ("numba", "torch"):
        args = _args(3, 6, 5, 4, dtype, seed=1)
        with torch.no_grad():
            args[0][1, 3, 2] = float("nan")
        results[impl] = _run(args, impl)
    fast, slow = results["numba"], results["torch"]
    y = fast[0]
    assert torch.isnan(y[1, 3:]).all() and not torch.isnan(y[1, :3]).any() and not torch.isnan(y[[0, 2]]).any()
    for name, a, c in zip(NAMES, fast, slow):
        assert torch.equal(torch.isnan(a), torch.isnan(c)), name
    assert torch.isnan(fast[4]).any(), "the recurrent weight's gradient sums over the NaN row"


@pytest.mark.parametrize("dtype,rel", [(np.float32, 3e-7), (np.float64, 5e-16)])
def test_compiled_tanh_and_sigmoid_are_accurate_everywhere(dtype, rel):
    grid = np.concatenate([np.linspace(-20, 20, 40001), np.geomspace(1e-30, 1e3, 2000), -np.geomspace(1e-30, 1e3, 2000),
                           [0.0, -0.0, 0.625, -0.625, np.nextafter(0.625, 1), 44.0, 90.0, -90.0, 1e30, -1e30]])
    x = grid.astype(dtype)

    @numba.njit(error_model="numpy")
    def both(xs):
        t, s = np.empty_like(xs), np.empty_like(xs)
        for i in range(xs.shape[0]):
            t[i], s[i] = numba_cfc._tanh(xs[i]), numba_cfc._sigmoid(xs[i])
        return t, s

    t, s = both(x)
    assert t.dtype == s.dtype == dtype
    wide = x.astype(np.longdouble)  # the references in x87's 80-bit floats
    with np.errstate(over="ignore"):
        refs = (("tanh", t, np.tanh(wide)), ("sigmoid", s, 1 / (1 + np.exp(-wide))))
    for name, got, want in refs:
        normal = np.abs(want) >= np.finfo(dtype).tiny  # subnormal results may flush to 0
        err = np.abs(got - want)[normal] / np.abs(want)[normal]
        assert err.max() < rel, f"{name}: relative error {err.max():.2e} at x = {x[normal][err.argmax()]}"
    special = np.array([np.inf, -np.inf, np.nan], dtype=dtype)
    t, s = both(special)
    assert t[0] == 1 and t[1] == -1 and np.isnan(t[2])
    assert s[0] == 1 and s[1] == 0 and np.isnan(s[2])


def test_an_unknown_implementation_or_one_that_cannot_run_is_refused():
    args = _args(2, 3, 4, 5)
    with pytest.raises(ValueError, match="unknown CfC implementation 'fast'.*auto, numba, torch"):
        cfc_scan(*args, impl="fast")
    half = [a.detach().to(torch.bfloat16) for a in args]
    with pytest.raises(ValueError, match="fp32 or fp64.*bfloat16.*impl='torch'"):
        cfc_scan(*half, impl="numba")
    y, h = cfc_scan(*half, impl="auto")  # auto falls back to the torch loops
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 5)
