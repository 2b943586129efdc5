import math

import pytest
import torch

from model import numba_scan
from model.config import ModelConfig
from model.spiking import SpikingPath, lif, lif_ref, spikes_to_features, surrogate_grad
from tests.helpers import assert_close

snn = pytest.importorskip("snntorch")
from snntorch import surrogate as snn_surrogate  # noqa: E402

SURROGATES = {"atan": (2.0, snn_surrogate.atan), "fast_sigmoid": (25.0, snn_surrogate.fast_sigmoid)}


def _run_snntorch(cur, beta, threshold, kind, scale):
    leaky = snn.Leaky(beta=beta, threshold=threshold, spike_grad=SURROGATES[kind][1](scale),
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
def test_lif_matches_snntorch_leaky_step_by_step(kind, beta, threshold):
    torch.manual_seed(0)
    cur = torch.randn(3, 40, 8) * 0.8
    scale = SURROGATES[kind][0] * 1.5
    ours_in = cur.clone().requires_grad_(True)
    theirs_in = cur.clone().requires_grad_(True)
    spk, mem = lif(ours_in, beta, threshold, kind, scale)
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


@pytest.mark.parametrize("length", [1, 17, 64, 130])
@pytest.mark.parametrize("kind", ["atan", "fast_sigmoid"])
def test_fused_lif_matches_autograd_reference(length, kind):
    torch.manual_seed(length)
    cur = (torch.randn(2, length, 5, dtype=torch.float64) * 1.5).requires_grad_(True)
    cur_ref = cur.detach().clone().requires_grad_(True)
    spk, mem = lif(cur, 0.8, 1.0, kind, 3.0)
    spk_ref, mem_ref = lif_ref(cur_ref, 0.8, 1.0, kind, 3.0)
    assert torch.equal(spk.double(), spk_ref)
    assert_close(mem.double(), mem_ref, dtype=torch.float32)
    g = [torch.randn_like(spk_ref), torch.randn_like(mem_ref)]
    torch.autograd.backward([spk, mem], g)
    torch.autograd.backward([spk_ref, mem_ref], g)
    assert_close(cur.grad, cur_ref.grad, dtype=torch.float32, scale=4, msg="gradient")


def test_lif_in_bf16_runs_in_fp32_and_returns_bf16():
    cur = torch.randn(2, 30, 6)
    spk, mem = lif(cur.bfloat16(), 0.9, 1.0)
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


def test_rate_features_are_a_causal_moving_average():
    spk = torch.tensor([1.0, 0, 1, 1, 0, 0, 1]).view(1, 7, 1)
    rate = spikes_to_features(spk, spk, "rate", window=3, tau=1.0, threshold=1.0).flatten()
    assert_close(rate, torch.tensor([1, 1, 2, 2, 2, 1, 1]) / 3.0)


def test_temporal_features_are_an_exponential_filter():
    spk = (torch.rand(2, 50, 3) < 0.3).float()
    tau = 3.0
    a = math.exp(-1 / tau)
    f, expected = torch.zeros(2, 3), []
    for s in spk.unbind(1):
        f = a * f + (1 - a) * s
        expected.append(f)
    got = spikes_to_features(spk, spk, "temporal", window=1, tau=tau, threshold=1.0)
    assert_close(got, torch.stack(expected, 1))


def test_potential_features_are_the_membrane_in_threshold_units():
    mem = torch.randn(2, 5, 3)
    got = spikes_to_features(mem > 0, mem, "potential", window=1, tau=1.0, threshold=0.5)
    assert_close(got, mem / 0.5)


@pytest.mark.parametrize("method", ["rate", "temporal", "potential"])
def test_spike_features_are_causal(method):
    spk = (torch.rand(1, 20, 4) < 0.3).float()
    mem = torch.randn(1, 20, 4)
    base = spikes_to_features(spk, mem, method, 4, 3.0, 1.0)
    spk2, mem2 = spk.clone(), mem.clone()
    spk2[:, 11:] = 1 - spk2[:, 11:]
    mem2[:, 11:] += 5
    changed = spikes_to_features(spk2, mem2, method, 4, 3.0, 1.0)
    assert torch.equal(base[:, :11], changed[:, :11])
    assert not torch.equal(base[:, 11:], changed[:, 11:])


def _path(**kw):
    torch.manual_seed(0)
    return SpikingPath(ModelConfig(hidden_dim=64, spiking_units=32, **kw))


def test_fresh_spiking_path_fires_in_both_layers():
    h = torch.nn.functional.rms_norm(torch.randn(4, 64, 64), (64,))
    rates = [r.mean().item() for r in _path()(h).firing_rates()]
    assert all(0.03 < r < 0.4 for r in rates), rates


@pytest.mark.parametrize("flag,value", [("beta", 0.6), ("spike_threshold", 0.7),
                                         ("spike_to_mamba_method", "temporal"),
                                         ("spike_rate_window", 3), ("spike_temporal_tau", 9.0)])
def test_spiking_flags_change_the_features(flag, value):
    h = torch.randn(2, 30, 64)
    base_kw = {"spike_to_mamba_method": "temporal"} if flag == "spike_temporal_tau" else {}
    base = _path(**base_kw)(h).features
    changed = _path(**{**base_kw, flag: value})(h).features
    assert not torch.equal(base, changed)


@pytest.mark.parametrize("flag,value", [("surrogate", "fast_sigmoid"), ("surrogate_scale", 5.0)])
def test_surrogate_flags_change_the_gradient_not_the_spikes(flag, value):
    h = torch.randn(2, 30, 64)
    grads, spikes = [], []
    for kw in ({}, {flag: value}):
        path = _path(**kw)
        trace = path(h)
        trace.features.sum().backward()
        grads.append(path.encoder.weight.grad)
        spikes.append(trace.post)
    assert torch.equal(spikes[0], spikes[1])
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_numpy_loop_and_device_torch_loop_agree(dtype):
    from model.spiking import _lif_loop_numpy, _lif_loop_torch

    cur = (torch.randn(3, 50, 7) * 1.5).to(dtype)
    numpy_mem, torch_mem = _lif_loop_numpy(cur, 0.85, 1.0), _lif_loop_torch(cur, 0.85, 1.0)
    assert numpy_mem.dtype == dtype and numpy_mem.shape == cur.shape
    assert torch.equal(numpy_mem > 1.0, torch_mem > 1.0)
    assert_close(numpy_mem, torch_mem)


@pytest.mark.skipif(not numba_scan.available(), reason="numba not installed: pip install numba")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta,threshold", [(0.85, 1.0), (0.9, 0.3)])
def test_compiled_loop_rounds_as_the_numpy_loop_bit_for_bit(dtype, beta, threshold):
    """The CPU default: the numpy loop's arithmetic in its order and dtype, so the same
    membranes to the bit and the same spikes, on a non-contiguous input too."""
    from model.spiking import _lif_forward_loop, _lif_loop_numba, _lif_loop_numpy

    cur = (torch.randn(50, 3, 7) * 1.5).to(dtype).transpose(0, 1)  # (b l s), not contiguous
    compiled = _lif_loop_numba(cur, beta, threshold)
    assert compiled.dtype == dtype and compiled.shape == cur.shape
    assert torch.equal(compiled, _lif_loop_numpy(cur, beta, threshold))
    assert torch.equal(_lif_forward_loop(cur, beta, threshold), compiled)
    assert (compiled > threshold).any() and not (compiled > threshold).all()  # some fire, not all
    bad = cur.clone()
    bad[1, 10, 2] = float("nan")
    mem = _lif_loop_numba(bad, beta, threshold)
    assert torch.isnan(mem[1, 10:, 2]).all() and not torch.isnan(mem[1, :10]).any()
