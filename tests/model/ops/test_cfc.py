"""The fused CfC scan (``model.ops.cfc``): every implementation of its loops (numba, Triton
under its interpreter, torch) against the reference in value and gradient, fp64 gradcheck,
threads' shares of the batch and Triton's row tiles, the dispatch, the op's registration,
non-finite inputs. The numba kernels' tanh and sigmoid are tested in test_numba_support."""

from __future__ import annotations

import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.hybrid import HybridLM
from model.liquid import LiquidLayer
from model.ops import triton_support
from model.ops.cfc import CFC_IMPLS, cfc_scan, cfc_scan_ref, interface
from model.ops.cfc import numba_kernel as numba_cfc
from tests.helpers import assert_close

needs_numba = pytest.mark.skipif(not numba_cfc.available(), reason="numba not installed: pip install numba")
needs_triton = pytest.mark.skipif(not triton_support.interpreted(),
                                  reason="Triton compiles in this process (CUDA present): the gpu tests cover it")
# every implementation of the loops that runs here: compiled (the CPU default), Triton's, torch's
IMPLS = [pytest.param("numba", marks=needs_numba), pytest.param("triton", marks=needs_triton), "torch"]


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
@needs_numba
def test_compiled_loops_equal_the_torch_loops_for_any_shape_and_share_of_rows(b, l, k, q, parts, dtype):
    """Every shape, every split of the batch's rows among threads (parts > rows included)."""
    args = _args(b, l, k, q, dtype)
    real = numba_cfc.threads
    numba_cfc.threads = lambda rows: max(1, min(rows, parts))
    try:
        fast = _run(args, "numba")
    finally:
        numba_cfc.threads = real
    slow = _run(args, "torch")
    # fp32: the two compute tanh and lerp in different roundings, which the recurrence carries on
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, a, c in zip(NAMES, fast, slow):
        torch.testing.assert_close(a, c, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_numba
def test_compiled_loops_match_the_reference_at_phase_3s_width():
    """fp64, so the comparison sees the kernel's arithmetic, not fp32's rounding over long sums."""
    args = _args(4, 64, 128, 128, torch.float64, seed=3)
    for name, a, c in zip(NAMES, _run(args, "numba"), _run(args, "ref")):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@needs_numba
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


@needs_numba
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


@needs_numba
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


@needs_numba
def test_an_unknown_implementation_or_one_that_cannot_run_is_refused():
    args = _args(2, 3, 4, 5)
    with pytest.raises(ValueError, match="unknown CfC implementation 'fast'.*auto, numba, torch, triton"):
        cfc_scan(*args, impl="fast")
    half = [a.detach().to(torch.bfloat16) for a in args]
    with pytest.raises(ValueError, match="--cfc-impl numba needs.*fp32 or fp64.*bfloat16.*--cfc-impl torch"):
        cfc_scan(*half, impl="numba")
    y, h = cfc_scan(*half, impl="auto")  # auto falls back to the torch loops
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 5)


# --------------------------------------------------------------------------- every implementation


def _ref_args(b: int, l: int, k: int, q: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    args = [
        torch.randn(b, l, k, dtype=dtype),
        torch.rand(b, q, dtype=dtype) * 2 - 1,
        torch.randn(k, q, dtype=dtype) * 1.2 / k**0.5,  # 0.3 at k = 16
        torch.randn(3 * q, k, dtype=dtype) * 1.2 / k**0.5,
        torch.randn(3 * q, dtype=dtype),
    ]
    return [a.requires_grad_() for a in args]


def _grads(outputs, gy, gh, wrt):
    return torch.autograd.grad((outputs[0] * gy).sum() + (outputs[1] * gh).sum(), wrt)


@pytest.mark.parametrize("impl", [pytest.param("numba", marks=needs_numba), "torch"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.666, 1.7159)])
def test_cfc_scan_backward_passes_gradcheck_in_float64(scales, impl):
    """Triton's kernels compute in fp32 only: they are held to the fp64 reference below."""
    args = _ref_args(3, 5, 6, 4, seed=7)
    with torch.no_grad():
        for a in args[2:4]:
            a.mul_(5 / 3)
    assert torch.autograd.gradcheck(lambda *a: cfc_scan(*a, *scales, impl=impl), args)


# (b, l, k, q): lengths 1, 2 and 40; a batch over one 16-row tile (17); units that pad to 16
# and 32 (5, 20) and the phases' 64
SHAPES = [(3, 1, 16, 8), (3, 2, 16, 8), (3, 40, 16, 8), (17, 6, 20, 5), (2, 5, 64, 64)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,length,k,q", SHAPES)
def test_cfc_scan_equals_its_reference_in_value_and_gradient(b, length, k, q, impl):
    """fp32 against the fp64 reference, at fp32's tolerance (the gradients' widened)."""
    args = _ref_args(b, length, k, q, seed=8)
    ours = [a.detach().float().requires_grad_() for a in args]
    gy, gh = torch.randn(b, length, q, dtype=torch.float64), torch.randn(b, q, dtype=torch.float64)
    fast = cfc_scan(*ours, 0.666, 1.7159, impl=impl)
    ref = cfc_scan_ref(*args, 0.666, 1.7159)
    assert fast[0].dtype == torch.float32
    assert_close(fast[0], ref[0], dtype=torch.float32, msg="h sequence")
    assert_close(fast[1], ref[1], dtype=torch.float32, msg="last h")
    for name, a, c in zip(["zx", "h0", "w_h", "w_p", "b_p"], _grads(fast, gy.float(), gh.float(), ours),
                          _grads(ref, gy, gh, args)):
        assert_close(a, c, dtype=torch.float32, scale=4, msg=f"d {name}")


@needs_triton
def test_the_triton_op_keeps_what_the_torch_loops_keep_for_the_backward():
    """The folding inside the Triton kernels: the same h, last h and saved activations (a_t
    and s_t) as the torch loops after their folding in torch, for 17 rows (two row tiles)
    and widths that pad."""
    args = [a.detach() for a in _args(17, 7, 20, 5, seed=4)]
    ours = interface._cfc_scan_op(*args, 0.666, 1.7159, "triton")
    theirs = interface._cfc_scan_op(*args, 0.666, 1.7159, "torch")
    for name, a, c in zip(["h", "last h", "a", "s"], ours, theirs):
        assert_close(a, c, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_scan_reads_a_sliced_recurrent_weight_and_a_strided_upstream_gradient(impl):
    """The liquid layer's w_h is a column slice of its backbone's weight, and the upstream
    gradient of h a slice of a concatenation's, or broadcast from a sum: the same values and
    gradients, bit for bit, as from contiguous copies (the Triton kernels read both through
    their strides instead of copying them)."""
    zx, h0, w_h, w_p, b_p = (a.detach() for a in _args(17, 6, 20, 7, seed=12))
    backbone = torch.cat([torch.randn(20, 3), w_h], 1).requires_grad_()  # (k i+q)
    runs = []
    for view in (True, False):
        wide = torch.randn(17, 6, 11, generator=torch.Generator().manual_seed(5))
        leaves = [x.clone().requires_grad_() for x in (zx, h0, w_p, b_p)]
        w = backbone[:, 3:] if view else backbone[:, 3:].detach().clone().requires_grad_()
        y, h = cfc_scan(leaves[0], leaves[1], w, leaves[2], leaves[3], 0.666, 1.7159, impl=impl)
        gy = wide[:, :, 2:9] if view else wide[:, :, 2:9].contiguous()  # (b l q), rows of 11
        grads = torch.autograd.grad([y, h], [*leaves, w], [gy, torch.ones(17, 7).expand(17, 7)])
        runs.append([y, h, *grads])
    assert not backbone[:, 3:].is_contiguous()  # the case this test is about
    for name, a, c in zip(["h", "last h", "d zx", "d h0", "d w_p", "d b_p", "d w_h"], *runs):
        assert torch.equal(a, c), name


@needs_triton
def test_triton_fp32_inputs_under_bf16_autocast_track_the_fp32_layer():
    """The liquid layer runs its recurrence in fp32 whatever autocast says: with the Triton
    loops, bf16 inputs give the fp32 layer's output to bf16's tolerance."""
    torch.manual_seed(5)
    layer = LiquidLayer(12, 16, backbone_units=16, cfc_impl="triton")
    x = torch.randn(2, 9, 12)
    ref = LiquidLayer(12, 16, backbone_units=16, cfc_impl="torch")
    ref.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(y, ref(x)[0], dtype=torch.bfloat16)


@needs_triton
def test_auto_keeps_the_numba_kernel_on_the_cpu_and_triton_must_be_asked_for():
    args = _args(2, 3, 4, 5)
    assert interface.resolve_cfc_impl("auto", *args) == ("numba" if numba_cfc.available() else "torch")
    assert interface.resolve_cfc_impl("triton", *args) == "triton"


@needs_triton
def test_triton_beyond_its_sizes_falls_back_to_the_torch_loops_with_one_warning(monkeypatch):
    monkeypatch.setattr(interface, "_warned", set())
    args = _args(1, 2, 3, 129)  # q = 129 > 128
    with pytest.warns(UserWarning, match="at most 128 liquid and backbone units.*torch loops instead"):
        assert interface.resolve_cfc_impl("triton", *args) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert interface.resolve_cfc_impl("triton", *args) == "torch"  # once only
    fp64 = [a.detach().double() for a in _args(1, 2, 3, 4)]
    with pytest.warns(UserWarning, match="compute in float32, got torch.float64"):
        assert interface.resolve_cfc_impl("triton", *fp64) == "torch"


def test_triton_where_it_cannot_run_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(triton_support, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="--cfc-impl triton: Triton's kernels run on CUDA.*--cfc-impl numba or torch"):
        cfc_scan(*_args(1, 2, 3, 4), impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_the_scan_is_one_registered_op_with_a_fake_and_a_backward(impl):
    """torch.library's own checks: the fake's shapes and strides, the autograd registration,
    and tracing with fake tensors (what torch.compile and a CUDA graph capture see)."""
    args = [a.detach().float().requires_grad_() for a in _ref_args(2, 4, 16, 8, seed=2)]
    torch.library.opcheck(torch.ops.lsnn.cfc_scan.default, (*args, 0.666, 1.7159, impl),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_traced_step_holds_one_scan_node_forward_and_one_backward(impl):
    """make_fx over forward and backward, as AOT autograd traces for torch.compile: the whole
    recurrence is one node each way, however long the sequence."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(*args):
        y, h = cfc_scan(*args, 0.666, 1.7159, impl=impl)
        return torch.autograd.grad(y.sum() + h.sum(), args)

    graphs = {}
    for length in (3, 9):
        args = [a.detach().float().requires_grad_() for a in _ref_args(2, length, 16, 8, seed=3)]
        graphs[length] = [str(n.target) for n in make_fx(step)(*args).graph.nodes if n.op == "call_function"]
        assert graphs[length].count("lsnn.cfc_scan.default") == 1
        assert graphs[length].count("lsnn.cfc_scan_backward.default") == 1
    assert graphs[3] == graphs[9], "nothing in the graph grows with the length"


def test_every_implementation_is_offered_by_the_model_config():
    assert CFC_IMPLS == typing.get_args(typing.get_type_hints(ModelConfig)["cfc_impl"])
    with pytest.raises(ValueError, match="--cfc-impl must be one of auto, numba, torch, triton; got 'fast'"):
        ModelConfig(cfc_impl="fast")


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("b,length,k,q", [(4, 64, 64, 64), (4, 256, 128, 128), (17, 33, 20, 5)])
def test_triton_kernels_compiled_on_cuda_match_the_reference(exact_fp32_cuda, b, length, k, q):
    """The phases' sizes (and two row tiles with padded widths), compiled, in full fp32."""
    args = _ref_args(b, length, k, q, seed=11)
    ours = [a.detach().float().cuda().requires_grad_() for a in args]
    gy, gh = torch.randn(b, length, q, dtype=torch.float64), torch.randn(b, q, dtype=torch.float64)
    fast = cfc_scan(*ours, 0.666, 1.7159, impl="triton")
    ref = cfc_scan_ref(*args, 0.666, 1.7159)
    assert_close(fast[0], ref[0], dtype=torch.float32, scale=4, msg="h sequence")
    assert_close(fast[1], ref[1], dtype=torch.float32, scale=4, msg="last h")
    for name, a, c in zip(["zx", "h0", "w_h", "w_p", "b_p"], _grads(fast, gy.float().cuda(), gh.float().cuda(), ours),
                          _grads(ref, gy, gh, args)):
        assert_close(a, c, dtype=torch.float32, scale=16, msg=f"d {name}")


@pytest.mark.gpu
def test_auto_runs_the_triton_kernels_on_cuda_and_a_liquid_layer_trains_under_bf16():
    args = [a.detach().float().cuda() for a in _ref_args(2, 5, 16, 8, seed=12)]
    assert interface.resolve_cfc_impl("auto", *args) == "triton"
    layer = LiquidLayer(12, 64, backbone_units=64).cuda()
    ref = LiquidLayer(12, 64, backbone_units=64, cfc_impl="torch").cuda()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64, 12, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert_close(y, ref(x)[0], dtype=torch.bfloat16)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def _check_against_fp64_loops(args: list[torch.Tensor], scale: float) -> None:
    """The Triton loops in fp32 against the torch loops in fp64, values at fp32's tolerance,
    gradients at ``scale`` times it (the weight gradients sum b l terms, each in its own order)."""
    b, l, q = args[0].shape[0], args[0].shape[1], args[1].shape[1]
    wide = [a.detach().double().requires_grad_() for a in args]
    g = torch.Generator().manual_seed(99)
    gy, gh = torch.randn(b, l, q, generator=g), torch.randn(b, q, generator=g)
    fast, exact = cfc_scan(*args, 0.666, 1.7159, impl="triton"), cfc_scan(*wide, 0.666, 1.7159, impl="torch")
    ours, theirs = [*fast, *_grads(fast, gy, gh, args)], [*exact, *_grads(exact, gy.double(), gh.double(), wide)]
    for name, a, c in zip(NAMES, ours, theirs):
        assert_close(a, c, dtype=torch.float32, scale=scale if name.startswith("d") else 1, msg=name)


@needs_triton
@settings(deadline=None)
@given(b=st.integers(1, 20), l=st.integers(1, 12), k=st.integers(1, 40), q=st.integers(1, 24))
def test_triton_kernels_equal_the_torch_loops_for_any_shape(b, l, k, q):
    """Any batch (row tiles of 16, the last one partial), any width (padded to a power of
    two of at least 16, so 17..24 pads to 32), any length: the fp64 loops' values and
    gradients."""
    _check_against_fp64_loops(_args(b, l, k, q), scale=4)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("b,l,k,q", [(8, 256, 128, 128), (33, 64, 128, 64), (4, 300, 100, 120)])
def test_triton_kernels_equal_the_torch_loops_at_wide_shapes(b, l, k, q):
    """Sums over up to 2,400 terms: fp32's tolerance widened 8x for the gradients."""
    _check_against_fp64_loops(_args(b, l, k, q, seed=5), scale=8)
