"""The LIF op (``model.ops.lif``): every implementation (numba, Triton under its interpreter,
torch/numpy) against snntorch's Leaky and the autograd reference, in value and gradient;
the loops against each other bit for bit; the surrogates; the dispatch; the op's
registration."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.ops import numba_support, triton_support
from model.ops.lif import LIF_IMPLS, interface, lif, lif_ref, surrogate_grad
from model.ops.lif import numba_kernel, torch_loop
from tests.helpers import assert_close

needs_numba = pytest.mark.skipif(not numba_support.available(), reason="numba not installed: pip install numba")
needs_triton = pytest.mark.skipif(not triton_support.interpreted(),
                                  reason="Triton compiles in this process (CUDA present): the gpu tests cover it")
IMPLS = [pytest.param("numba", marks=needs_numba), pytest.param("triton", marks=needs_triton), "torch"]

snn = pytest.importorskip("snntorch")
from snntorch import surrogate as snn_surrogate  # noqa: E402

SURROGATE_FNS = {"atan": (2.0, snn_surrogate.atan), "fast_sigmoid": (25.0, snn_surrogate.fast_sigmoid)}


def _run_snntorch(cur, beta, threshold, kind, scale):
    leaky = snn.Leaky(beta=beta, threshold=threshold, spike_grad=SURROGATE_FNS[kind][1](scale),
                      reset_mechanism="subtract")
    mem = leaky.init_leaky()
    spks, mems = [], []
    for x in cur.unbind(1):
        spk, mem = leaky(x, mem)
        spks.append(spk)
        mems.append(mem)
    return torch.stack(spks, 1), torch.stack(mems, 1)


@pytest.mark.parametrize("kind", ["atan", "fast_sigmoid"])
@pytest.mark.parametrize("beta,threshold", [(0.9, 1.0), (0.5, 0.7)])
@pytest.mark.parametrize("impl", IMPLS)
def test_lif_matches_snntorch_leaky_step_by_step(kind, beta, threshold, impl):
    torch.manual_seed(0)
    cur = torch.randn(3, 40, 8) * 0.8
    scale = SURROGATE_FNS[kind][0] * 1.5
    ours_in = cur.clone().requires_grad_(True)
    theirs_in = cur.clone().requires_grad_(True)
    spk, mem = lif(ours_in, beta, threshold, kind, scale, impl)
    spk_ref, mem_ref = _run_snntorch(theirs_in, beta, threshold, kind, scale)
    assert 0.02 < spk.mean().item() < 0.5, "the pattern must contain spikes and resets"
    assert torch.equal(spk, spk_ref)
    assert_close(mem, mem_ref, msg="membrane")
    g_spk, g_mem = torch.randn_like(spk), torch.randn_like(mem)
    torch.autograd.backward([spk, mem], [g_spk, g_mem])
    torch.autograd.backward([spk_ref, mem_ref], [g_spk, g_mem])
    assert_close(ours_in.grad, theirs_in.grad, scale=2, msg="gradient")


def test_subtractive_reset_by_hand():
    # beta 0.5, threshold 1, constant current 0.8:
    # mem: 0.8, 1.2 (fires), 0.6+0.8-1=0.4, 0.2+0.8=1.0 (not > 1), 0.5+0.8=1.3 (fires), 0.65+0.8-1=0.45
    spk, mem = lif(torch.full((1, 6, 1), 0.8), 0.5, 1.0)
    assert spk.flatten().tolist() == [0, 1, 0, 0, 1, 0]
    assert_close(mem.flatten(), torch.tensor([0.8, 1.2, 0.4, 1.0, 1.3, 0.45]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [1, 17, 64, 130])
@pytest.mark.parametrize("kind", ["atan", "fast_sigmoid"])
def test_fused_lif_matches_autograd_reference(length, kind, impl):
    torch.manual_seed(length)
    cur = (torch.randn(2, length, 5, dtype=torch.float64) * 1.5).requires_grad_(True)
    cur_ref = cur.detach().clone().requires_grad_(True)
    spk, mem = lif(cur, 0.8, 1.0, kind, 3.0, impl)
    spk_ref, mem_ref = lif_ref(cur_ref, 0.8, 1.0, kind, 3.0)
    assert torch.equal(spk.double(), spk_ref)
    assert_close(mem.double(), mem_ref, dtype=torch.float32)
    g = [torch.randn_like(spk_ref), torch.randn_like(mem_ref)]
    torch.autograd.backward([spk, mem], g)
    torch.autograd.backward([spk_ref, mem_ref], g)
    assert_close(cur.grad, cur_ref.grad, dtype=torch.float32, scale=4, msg="gradient")


@pytest.mark.parametrize("impl", IMPLS)
def test_lif_in_bf16_runs_in_fp32_and_returns_bf16(impl):
    cur = torch.randn(2, 30, 6)
    spk, mem = lif(cur.bfloat16(), 0.9, 1.0, impl=impl)
    spk_ref, mem_ref = lif(cur.bfloat16().float(), 0.9, 1.0)
    assert spk.dtype == torch.bfloat16 and mem.dtype == torch.bfloat16
    assert torch.equal(spk.float(), spk_ref)
    assert_close(mem, mem_ref, dtype=torch.bfloat16)


def test_surrogate_gradients_match_their_formulas_and_stay_finite():
    x = torch.tensor([0.0, 0.5, -2.0, 1e30])
    atan = surrogate_grad(x, "atan", 2.0)
    assert atan[0].item() == pytest.approx(1.0)
    assert atan[1].item() == pytest.approx(1.0 / (1 + (math.pi / 2) ** 2))
    fs = surrogate_grad(x, "fast_sigmoid", 25.0)
    assert fs[2].item() == pytest.approx(1.0 / 51.0**2)
    assert torch.isfinite(atan).all() and torch.isfinite(fs).all()
    with pytest.raises(ValueError, match="unknown surrogate"):
        surrogate_grad(x, "relu", 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_numpy_loop_and_device_torch_loop_agree(dtype):
    cur = (torch.randn(3, 50, 7) * 1.5).to(dtype)
    numpy_mem, torch_mem = torch_loop.lif_loop_numpy(cur, 0.85, 1.0), torch_loop.lif_loop_torch(cur, 0.85, 1.0)
    assert numpy_mem.dtype == dtype and numpy_mem.shape == cur.shape
    assert torch.equal(numpy_mem > 1.0, torch_mem > 1.0)
    assert_close(numpy_mem, torch_mem)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta,threshold", [(0.85, 1.0), (0.9, 0.3)])
def test_compiled_loop_rounds_as_the_numpy_loop_bit_for_bit(dtype, beta, threshold):
    """The CPU default: the numpy loop's arithmetic in its order and dtype, so the same
    membranes to the bit and the same spikes, on a non-contiguous input too."""
    cur = (torch.randn(50, 3, 7) * 1.5).to(dtype).transpose(0, 1)  # (b l s), not contiguous
    compiled = numba_kernel.lif_forward(cur, beta, threshold)
    assert compiled.dtype == dtype and compiled.shape == cur.shape
    assert torch.equal(compiled, torch_loop.lif_loop_numpy(cur, beta, threshold))
    assert torch.equal(lif(cur, beta, threshold)[1].to(dtype), compiled) or dtype == torch.float64  # lif runs fp32
    assert (compiled > threshold).any() and not (compiled > threshold).all()  # some fire, not all
    bad = cur.clone()
    bad[1, 10, 2] = float("nan")
    mem = numba_kernel.lif_forward(bad, beta, threshold)
    assert torch.isnan(mem[1, 10:, 2]).all() and not torch.isnan(mem[1, :10]).any()


@needs_triton
@pytest.mark.parametrize("b,l,s", [(3, 50, 7), (2, 9, 130)])  # 130 neurons a row: two programs
def test_triton_kernels_fire_as_the_compiled_loop_and_sum_its_gradient(b, l, s):
    """Same spikes and membranes as the CPU default (the interpreter does not fuse the
    multiply-add), and the backward's sum as the torch backward's, with either upstream
    gradient absent."""
    from model.ops.lif import triton_kernel

    torch.manual_seed(s)
    cur = torch.randn(b, l, s) * 1.5
    spk, mem = triton_kernel.lif_forward(cur, 0.85, 1.0)
    ref_mem = torch_loop.lif_loop_numpy(cur, 0.85, 1.0)
    assert torch.equal(mem, ref_mem.contiguous()) and torch.equal(spk, (ref_mem > 1.0).float())
    g_spk, g_mem = torch.randn_like(cur), torch.randn_like(cur)
    for kind in ("atan", "fast_sigmoid"):
        for gs, gm in ((g_spk, g_mem), (None, g_mem), (g_spk, None)):
            got = triton_kernel.lif_backward(mem, gs, gm, 0.85, 1.0, kind, 3.0)
            want = torch_loop.lif_backward(mem, gs, gm, 0.85, 1.0, kind, 3.0)
            assert_close(got, want, msg=f"{kind}, spikes' gradient {gs is not None}, mem's {gm is not None}")


@needs_triton
def test_auto_keeps_the_compiled_loop_on_the_cpu_and_triton_must_be_asked_for(monkeypatch):
    cur = torch.randn(1, 2, 3)
    assert interface.resolve_lif_impl("auto", cur) == ("numba" if numba_support.available() else "numpy")
    monkeypatch.setattr(numba_kernel, "available", lambda: False)
    assert interface.resolve_lif_impl("auto", cur) == "numpy"  # no numba: numpy's ufuncs, not torch's dispatch
    assert interface.resolve_lif_impl("triton", cur) == "triton"


def test_unknown_or_unrunnable_implementations_are_refused_naming_the_flag(monkeypatch):
    with pytest.raises(ValueError, match="unknown LIF implementation 'gpu'; use one of auto, numba, torch, triton"):
        lif(torch.randn(1, 2, 3), 0.9, 1.0, impl="gpu")
    monkeypatch.setattr(triton_support, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="--lif-impl triton: Triton's kernels run on CUDA.*--lif-impl numba or torch"):
        lif(torch.randn(1, 2, 3), 0.9, 1.0, impl="triton")
    with pytest.raises(ValueError, match="unknown surrogate 'relu'"):
        lif(torch.randn(1, 2, 3), 0.9, 1.0, kind="relu")


@pytest.mark.parametrize("impl", IMPLS)
def test_the_lif_is_one_registered_op_with_a_fake_and_a_backward(impl):
    cur = (torch.randn(2, 6, 5) * 1.5).requires_grad_()
    torch.library.opcheck(torch.ops.lsnn.lif.default, (cur, 0.9, 1.0, "atan", 2.0, impl),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_traced_step_holds_one_lif_node_forward_and_one_backward(impl):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(cur):
        spk, mem = lif(cur, 0.9, 1.0, impl=impl)
        return torch.autograd.grad(spk.sum() + mem.sum(), cur)

    graphs = {}
    for length in (3, 9):
        graph = make_fx(step)(torch.randn(2, length, 5, requires_grad=True)).graph
        graphs[length] = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert graphs[length].count("lsnn.lif.default") == 1
        assert graphs[length].count("lsnn.lif_backward.default") == 1
    assert graphs[3] == graphs[9], "nothing in the graph grows with the length"


@pytest.mark.parametrize("impl", IMPLS)
def test_the_spiking_path_runs_the_lif_where_lif_impl_says(impl, monkeypatch):
    """--lif-impl reaches both LIF layers of a block."""
    from model.spiking import SpikingPath

    seen = []
    real = interface.resolve_lif_impl
    monkeypatch.setattr(interface, "resolve_lif_impl", lambda i, cur: seen.append(i) or real(i, cur))
    path = SpikingPath(ModelConfig(hidden_dim=16, spiking_units=8, lif_impl=impl))
    path(torch.randn(2, 5, 16)).features.sum().backward()
    assert seen == [impl, impl]


def test_every_implementation_is_offered_by_the_model_config():
    import typing

    assert LIF_IMPLS == typing.get_args(typing.get_type_hints(ModelConfig)["lif_impl"])


@pytest.mark.gpu
@pytest.mark.parametrize("b,l,s", [(4, 256, 64), (3, 17, 130)])
def test_triton_kernels_compiled_on_cuda_match_the_reference(b, l, s):
    torch.manual_seed(l)
    cur = (torch.randn(b, l, s, dtype=torch.float64) * 1.5).requires_grad_()
    ours = cur.detach().float().cuda().requires_grad_()
    spk, mem = lif(ours, 0.9, 1.0, "atan", 2.0, impl="triton")
    spk_ref, mem_ref = lif_ref(cur, 0.9, 1.0, "atan", 2.0)
    # a fused multiply-add can move a membrane within a rounding of the threshold across it
    assert (spk.cpu().double() != spk_ref).float().mean() < 1e-3
    g = [torch.randn_like(spk_ref), torch.randn_like(mem_ref)]
    torch.autograd.backward([spk, mem], [x.float().cuda() for x in g])
    torch.autograd.backward([spk_ref, mem_ref], g)
    assert_close(ours.grad, cur.grad, dtype=torch.float32, scale=4, msg="gradient")


@pytest.mark.gpu
def test_auto_runs_the_triton_kernels_on_cuda():
    assert interface.resolve_lif_impl("auto", torch.randn(1, 2, 3, device="cuda")) == "triton"


@needs_triton
@settings(deadline=None)
@given(b=st.integers(1, 4), l=st.integers(1, 40), s=st.integers(1, 200), beta=st.floats(0.05, 0.99),
       threshold=st.floats(0.1, 2.0), kind=st.sampled_from(["atan", "fast_sigmoid"]))
def test_triton_kernels_equal_the_loops_for_any_shape(b, l, s, beta, threshold, kind):
    """Any number of neurons (programs of 128, the last partial) and length: the membranes
    of the numpy loop to the bit, the torch backward's gradient to rounding."""
    from model.ops.lif import triton_kernel

    cur = torch.randn(b, l, s, generator=torch.Generator().manual_seed(l * s)) * 1.5
    spk, mem = triton_kernel.lif_forward(cur, beta, threshold)
    ref = torch_loop.lif_loop_numpy(cur, beta, threshold)
    assert torch.equal(mem, ref.contiguous()) and torch.equal(spk, (ref > threshold).float())
    g_spk, g_mem = torch.randn_like(cur), torch.randn_like(cur)
    assert_close(triton_kernel.lif_backward(mem, g_spk, g_mem, beta, threshold, kind, 2.5),
                 torch_loop.lif_backward(mem, g_spk, g_mem, beta, threshold, kind, 2.5))
