"""The fused CPU mixer (``model.ops.selective_scan.mamba_inner``) against ``Mamba``'s unfused path: values and
every gradient, gradcheck in fp64, the conv's edge cases, NaN propagation, bf16 autocast,
and that ``Mamba`` takes it exactly where the scan resolves to numba."""

from __future__ import annotations

import pytest
import torch

from model.mamba import Mamba
from model.ops.selective_scan.mamba_inner import mamba_inner
from tests.helpers import assert_close

GRAD_SCALE = 4.0  # gradients sum over batch and time
FUSED = "_MambaInnerBackward"


def make_mamba(d_model: int = 16, seed: int = 0, **kwargs) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(d_model, **kwargs)
    with torch.no_grad():  # distinct taps and a bias, so a flipped or shifted conv shows
        m.conv1d.weight.normal_()
        if m.conv1d.bias is not None:
            m.conv1d.bias.normal_()
    return m


def unfused(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The module op by op (the numba scan, but autograd through every other step)."""
    return m.out_proj(m._unfused(m.in_proj(x)))


def output_and_grads(fn, m: Mamba, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = fn(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], upstream)
    return y, dict(zip(["input", *params], grads))


def graph_names(y: torch.Tensor) -> set[str]:
    """Names of every node of y's autograd graph."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def assert_matches_unfused(m: Mamba, x: torch.Tensor) -> None:
    y, grads = output_and_grads(m, m, x)
    y_ref, grads_ref = output_and_grads(lambda t: unfused(m, t), m, x)
    assert_close(y, y_ref, msg="output")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], scale=GRAD_SCALE, msg=f"d{name}")


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("d_conv", [1, 2, 3, 4])
def test_fused_gives_the_unfused_output_and_gradients(d_conv, conv_bias):
    m = make_mamba(d_conv=d_conv, conv_bias=conv_bias)
    assert_matches_unfused(m, torch.randn(2, 19, 16))


@pytest.mark.parametrize("length", [1, 2, 3])
def test_sequences_shorter_than_the_conv_match_the_unfused_path(length):
    m = make_mamba(d_conv=4)
    assert_matches_unfused(m, torch.randn(3, length, 16))


@pytest.mark.parametrize(
    "kwargs",
    [{"d_model": 13, "expand": 3, "d_state": 5, "dt_rank": 3}, {"d_model": 7, "expand": 1, "d_state": 1},
     {"d_model": 40, "bias": True}],
    ids=["odd-widths", "one-state", "linear-bias"],
)
def test_odd_widths_and_options_match_the_unfused_path(kwargs):
    d_model = kwargs.pop("d_model")
    m = make_mamba(d_model, **kwargs)
    assert_matches_unfused(m, torch.randn(2, 23, d_model))


@pytest.mark.parametrize("d_conv", [1, 3])
@pytest.mark.parametrize("length", [2, 6])
@pytest.mark.parametrize("conv_bias,bias", [(True, False), (False, False), (True, True)])
def test_fused_mixer_passes_gradcheck_in_float64(d_conv, length, conv_bias, bias):
    m = make_mamba(4, d_conv=d_conv, d_state=3, expand=2, dt_rank=2, conv_bias=conv_bias, bias=bias).double()
    xz = torch.randn(2, length, 2 * m.d_inner, dtype=torch.float64)
    weights = [m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D,
               m.out_proj.weight, m.out_proj.bias]
    args = [t.detach().clone().requires_grad_() if t is not None else None for t in [xz, *weights]]
    assert torch.autograd.gradcheck(mamba_inner, args)


def test_a_nan_in_the_input_reaches_the_output_and_the_gradients():
    m = make_mamba()
    x = torch.randn(2, 9, 16)
    x[1, 4, 3] = float("nan")
    y, grads = output_and_grads(m, m, x)
    assert y[1, 4:].isnan().any(), "the NaN vanished from the output"
    assert y[0].isfinite().all(), "the NaN leaked into another sequence"
    for name, grad in grads.items():
        assert grad.isnan().any(), f"d{name} hides the NaN"


def test_bf16_autocast_returns_bf16_tracking_the_unfused_path():
    m = make_mamba()
    x = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = output_and_grads(m, m, x)
        y_ref, grads_ref = output_and_grads(lambda t: unfused(m, t), m, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y, y_ref, msg="output")
    for name, grad in grads.items():
        assert grad.dtype == grads_ref[name].dtype, f"d{name}: {grad.dtype} != {grads_ref[name].dtype}"
        # the unfused path rounds every step to bf16: compare at bf16's tolerance
        assert_close(grad, grads_ref[name], dtype=torch.bfloat16, scale=GRAD_SCALE, msg=f"d{name}")


def test_no_grad_runs_the_unfused_path_bit_for_bit_as_generates_prefill_does():
    m = make_mamba()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        y, y_ref = m(x), unfused(m, x)
        y_fused = m._fused(m.in_proj(x))
    assert y.grad_fn is None and y_fused.grad_fn is None
    assert torch.equal(y, y_ref)
    assert_close(y_fused, y_ref, msg="fused forward without autograd")


@pytest.mark.parametrize("scan_impl", ["auto", "numba"])
def test_the_cpu_numba_path_is_fused(scan_impl):
    m = make_mamba(scan_impl=scan_impl)
    names = graph_names(m(torch.randn(2, 5, 16)))
    assert FUSED in names, f"no {FUSED} in the graph: {sorted(names)}"
    assert "ConvolutionBackward0" not in names


@pytest.mark.parametrize("scan_impl", ["loop", "parallel", "chunked", "ref"])
def test_other_scan_impls_keep_the_unfused_path(scan_impl):
    m = make_mamba(scan_impl=scan_impl)
    names = graph_names(m(torch.randn(2, 5, 16)))
    assert FUSED not in names
    assert "ConvolutionBackward0" in names


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_and_numbas_parallel_launch_give_the_same_result(threads):
    m = make_mamba(expand=16)  # e = 256: two blocks of channels a sequence, four work items
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_unfused(m, torch.randn(2, 17, 16))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("bias", [False, True])
def test_out_proj_is_inside_the_fused_function_so_its_input_is_not_kept(bias):
    m = make_mamba(bias=bias)
    x = torch.randn(2, 7, 16)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert type(y.grad_fn).__name__ == FUSED, f"out_proj runs after the Function: {type(y.grad_fn).__name__}"
    inner_width = [t for t in saved if t.dim() == 3 and t.shape[-1] == m.d_inner]
    assert not inner_width, f"a (b l e) tensor is kept for the backward: {[tuple(t.shape) for t in inner_width]}"


@pytest.mark.parametrize("name", ["conv1d", "x_proj", "out_proj"])  # dt_proj: its weight is used, not its forward
@pytest.mark.parametrize("pre", [False, True])
def test_a_hook_on_a_layer_inside_the_fused_function_still_fires(name, pre):
    """Fault injection (``--inject-fault activation:...``) and the non-finite diagnosis
    watch modules through forward hooks; the fused Function would run past them, so a
    watched layer keeps the op-by-op path and its hook sees (and may change) its output."""
    m = make_mamba()
    x = torch.randn(2, 5, 16)
    clean = m(x)
    layer = getattr(m, name)
    calls = []
    if pre:
        handle = layer.register_forward_pre_hook(lambda mod, args: calls.append(1))
    else:
        handle = layer.register_forward_hook(lambda mod, args, out: (calls.append(1), out * float("nan"))[1])
    y = m(x)
    handle.remove()
    assert calls, f"the hook on {name} did not fire"
    assert FUSED not in graph_names(y)
    if pre:
        assert_close(y, clean, msg="a watching pre-hook changes nothing")
    else:
        assert y.isnan().all(), f"the NaN {name}'s hook put in did not reach the output"
    assert FUSED in graph_names(m(x)), "with the hook removed the fused path is back"
