"""The Mamba mixer block: initialisation as mamba-ssm's, causality, shapes, and the same
output and gradients whichever selective-scan implementation runs it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.mamba import Mamba
from tests.helpers import assert_close

GRAD_SCALE = 4.0  # gradients sum over batch and time


def make_mamba(seed: int = 0, **kwargs) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(16, **kwargs)


def test_A_is_minus_one_to_n_in_every_channel_and_finite():
    m = make_mamba(d_state=5)
    A = -torch.exp(m.A_log)
    expected = -torch.arange(1, 6, dtype=torch.float32).expand(m.d_inner, 5)
    assert m.A_log.isfinite().all(), "A_log has NaN or inf"
    assert_close(A, expected)


@pytest.mark.parametrize(("dt_min", "dt_max"), [(0.001, 0.1), (0.01, 0.02)])
def test_dt_bias_softplus_lies_in_the_dt_range(dt_min, dt_max):
    m = make_mamba(expand=8, dt_min=dt_min, dt_max=dt_max)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-4), f"min dt {dt.min().item():.3g} < dt_min {dt_min}"
    assert dt.max() <= dt_max * (1 + 1e-4), f"max dt {dt.max().item():.3g} > dt_max {dt_max}"
    # log-uniform, not collapsed onto one value
    assert dt.log().std() > 0.2 * (math.log(dt_max) - math.log(dt_min))


def test_dt_is_clamped_at_the_init_floor():
    m = make_mamba(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert_close(dt, torch.full_like(dt, 1e-4), scale=10)


@pytest.mark.parametrize("dt_scale", [1.0, 0.25])
def test_dt_proj_weight_is_uniform_within_scale_over_sqrt_rank(dt_scale):
    m = make_mamba(dt_rank=4, dt_scale=dt_scale)
    bound = 4**-0.5 * dt_scale
    w = m.dt_proj.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.8 * bound


def test_dt_rank_defaults_to_ceil_d_model_over_16():
    assert Mamba(40).dt_rank == 3
    assert Mamba(40).x_proj.weight.shape == (3 + 2 * 16, 80)


def test_A_log_and_D_are_excluded_from_weight_decay():
    m = make_mamba()
    flagged = {name for name, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "D"}
    assert torch.equal(m.D.detach(), torch.ones(m.d_inner))


def test_parameter_names_are_mamba_ssms():
    names = set(make_mamba().state_dict())
    assert names == {
        "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
        "dt_proj.weight", "dt_proj.bias", "out_proj.weight",
    }


def test_output_is_finite_and_shaped_b_l_d():
    m = make_mamba()
    y = m(torch.randn(3, 11, 16))
    assert y.shape == (3, 11, 16)
    assert y.isfinite().all()


@pytest.mark.parametrize("scan_impl", ["numba", "loop", "parallel", "chunked"])
def test_bf16_autocast_output_tracks_fp32_with_finite_gradients(scan_impl):
    m = make_mamba(scan_impl=scan_impl)
    x = torch.randn(2, 20, 16)
    y = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = m(x)
    assert y_bf16.dtype == torch.bfloat16
    assert_close(y_bf16, y, msg="bf16 vs fp32")
    y_bf16.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), f"d{name} missing or not finite"


@pytest.mark.parametrize("scan_impl", ["numba", "loop", "parallel", "chunked", "ref"])
@pytest.mark.parametrize("t", [0, 4, 10])
def test_output_up_to_t_ignores_later_tokens(scan_impl, t):
    m = make_mamba(scan_impl=scan_impl, d_conv=4)
    x = torch.randn(2, 12, 16)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(2, 11 - t, 16)
    with torch.no_grad():
        y, y_changed = m(x), m(changed)
    diff = (y[:, : t + 1] - y_changed[:, : t + 1]).abs().max().item()
    assert diff <= 1e-6, f"output at positions <= {t} moved by {diff:.3g} when later tokens changed"
    assert not torch.allclose(y[:, t + 1 :], y_changed[:, t + 1 :]), "later outputs ignore their inputs"


@pytest.mark.parametrize(
    ("kwargs", "shapes"),
    [
        ({"d_state": 7}, {"A_log": (32, 7), "x_proj.weight": (1 + 14, 32)}),
        ({"d_conv": 2}, {"conv1d.weight": (32, 1, 2)}),
        ({"expand": 3}, {"in_proj.weight": (96, 16), "out_proj.weight": (16, 48), "A_log": (48, 16)}),
    ],
    ids=["d_state", "d_conv", "expand"],
)
def test_d_state_d_conv_expand_change_the_parameter_shapes(kwargs, shapes):
    baseline = make_mamba().state_dict()
    m = make_mamba(**kwargs)
    params = m.state_dict()
    for name, shape in shapes.items():
        assert tuple(params[name].shape) == shape, f"{name}: {tuple(params[name].shape)} != {shape}"
        assert params[name].shape != baseline[name].shape
    x = torch.randn(2, 9, 16)
    y = m(x)
    assert y.shape == (2, 9, 16) and y.isfinite().all()
    assert not torch.allclose(y, make_mamba()(x))


def test_from_config_reads_the_mamba_flags():
    cfg = ModelConfig(
        hidden_dim=32, mamba_d_state=8, mamba_d_conv=3, mamba_expand=3, mamba_dt_rank=5,
        scan_impl="chunked",
    )
    m = Mamba.from_config(cfg)
    assert (m.d_model, m.d_state, m.d_conv, m.expand, m.dt_rank) == (32, 8, 3, 3, 5)
    assert m.d_inner == cfg.d_inner
    assert m.scan_impl == "chunked"
    assert Mamba.from_config(ModelConfig(hidden_dim=32)).dt_rank == 2  # ceil(32 / 16)


def test_unknown_scan_impl_is_rejected_listing_the_valid_ones():
    valid = "auto, numba, loop, parallel, triton, chunked, cuda, ref"
    with pytest.raises(ValueError, match=f"unknown scan_impl 'fast'; valid: {valid}"):
        Mamba(16, scan_impl="fast")


def mamba_written_out(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba's forward from its equations, token by token, sharing no code with the module."""
    b, l, _ = x.shape
    e, n, r = m.d_inner, m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T  # (b l 2e): x first, then the gate z
    xs, z = xz[..., :e], xz[..., e:]
    taps = m.conv1d.weight[:, 0, :]  # (e k)
    k = taps.shape[1]
    padded = F.pad(xs, (0, 0, k - 1, 0))  # k-1 zeros before the first token
    conv = sum(padded[:, j : j + l] * taps[:, j] for j in range(k)) + m.conv1d.bias
    xc = F.silu(conv)  # (b l e)
    dbc = xc @ m.x_proj.weight.T
    dt, B, C = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)  # (b l e)
    A = -torch.exp(m.A_log)  # (e n)
    h, ys = torch.zeros(b, e, n), []
    for d_t, x_t, B_t, C_t in zip(delta.unbind(1), xc.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(d_t[..., None] * A) * h + (d_t * x_t)[..., None] * B_t[:, None, :]
        ys.append((h * C_t[:, None, :]).sum(-1))
    y = (torch.stack(ys, 1) + xc * m.D) * F.silu(z)
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("scan_impl", ["loop", "chunked", "ref"])
def test_forward_matches_mambas_equations_written_out(scan_impl):
    m = make_mamba(scan_impl=scan_impl, d_conv=3)
    with torch.no_grad():
        m.conv1d.weight.normal_()  # distinct taps, so a flipped or shifted kernel shows
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        assert_close(m(x), mamba_written_out(m, x), scale=4)


def _output_and_grads(m: Mamba, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = m(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], upstream)
    return y, dict(zip(["input", *params], grads))


@pytest.mark.parametrize("scan_impl", ["numba", "loop", "parallel", "chunked"])
def test_scan_impls_give_the_reference_output_and_gradients(scan_impl):
    m = make_mamba(scan_impl="ref")
    x = torch.randn(2, 70, 16)  # two chunks of the chunked scan, the second partial
    y_ref, grads_ref = _output_and_grads(m, x)
    m.scan_impl = scan_impl
    y, grads = _output_and_grads(m, x)
    assert_close(y, y_ref, msg="output")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], scale=GRAD_SCALE, msg=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("scan_impl", ["parallel", "triton", "chunked"])
def test_gpu_scan_impls_give_the_reference_output_and_gradients_on_cuda(exact_fp32_cuda, scan_impl):
    if scan_impl == "triton":
        pytest.importorskip("triton", reason="triton not importable: pip install lsnn[triton]")
    m = make_mamba(scan_impl="ref").cuda()
    x = torch.randn(2, 70, 16, device="cuda")  # two Triton chunks, the second partial
    y_ref, grads_ref = _output_and_grads(m, x)
    m.scan_impl = scan_impl
    y, grads = _output_and_grads(m, x)
    assert_close(y, y_ref, msg="output")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], scale=GRAD_SCALE, msg=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("scan_impl", ["auto", "chunked"])
@pytest.mark.parametrize("use_fast_path", [False, True])
def test_matches_mamba_ssm_module_with_its_state_dict(exact_fp32_cuda, scan_impl, use_fast_path):
    mamba_simple = pytest.importorskip(
        "mamba_ssm.modules.mamba_simple", reason="mamba-ssm not importable: pip install lsnn[cuda]"
    )
    ours = make_mamba(scan_impl=scan_impl, d_state=8, d_conv=4, expand=2).cuda()
    theirs = mamba_simple.Mamba(16, d_state=8, d_conv=4, expand=2, use_fast_path=use_fast_path).cuda()
    theirs.load_state_dict(ours.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 33, 16, device="cuda")
    y, grads = _output_and_grads(ours, x)
    y_theirs, grads_theirs = _output_and_grads(theirs, x)
    # Their fused kernels sum in another order than our scan: about their tests' tolerance.
    assert_close(y, y_theirs, scale=20, msg="output")
    for name, grad in grads.items():
        assert_close(grad, grads_theirs[name], scale=20 * GRAD_SCALE, msg=f"d{name}")


@pytest.mark.parametrize("d_conv", [1, 4])
def test_step_by_step_equals_the_forward_and_prefill_keeps_the_state(d_conv):
    """The mixer's own inference cache: stepping one token at a time from an empty state
    (after a prefill of 5) gives the forward's outputs; the state keeps its size."""
    from model.mamba import MambaState

    m = make_mamba(d_conv=d_conv).eval()
    x = torch.randn(2, 12, m.d_model)
    with torch.no_grad():
        full, first = m(x), m(x[:, :5])
        state = MambaState()
        head = m(x[:, :5], state)
        shapes = (tuple(state.conv.shape), tuple(state.ssm.shape))
        tail = torch.cat([m.step(x_t, state) for x_t in x[:, 5:].split(1, dim=1)], dim=1)
    assert torch.equal(head, first), "a prefill is the forward"
    assert shapes == ((2, m.d_inner, d_conv - 1), (2, m.d_inner, m.d_state))
    assert (tuple(state.conv.shape), tuple(state.ssm.shape)) == shapes
    assert_close(tail, full[:, 5:], scale=0.1, msg="steps after the prefill")
