"""The spiking path: spike-to-continuous conversion, its flags, a fresh path's firing. The LIF
op itself is tested in tests/model/ops/test_lif.py."""

import importlib
import math

import pytest
import torch

from model.config import ModelConfig
from model import spiking
from model.spiking import SpikingPath, spikes_to_features
from tests.helpers import assert_close


def test_rate_features_are_a_causal_moving_average():
    spk = torch.tensor([1.0, 0, 1, 1, 0, 0, 1]).view(1, 7, 1)
    rate = spikes_to_features(spk, spk, "rate", window=3, tau=1.0, threshold=1.0).flatten()
    assert_close(rate, torch.tensor([1, 1, 2, 2, 2, 1, 1]) / 3.0)


@pytest.mark.parametrize("pool", [False, True], ids=["cumsum (CPU)", "pool (CUDA)"])
@pytest.mark.parametrize("window", [1, 3, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rate_features_and_their_gradient_are_the_window_sums_over_the_window(window, dtype, pool, monkeypatch):
    """Every token's feature is the sum of the last ``window`` spikes over ``window``, bit for
    bit (sums of 0/1 are exact), whichever way the device computes it; its gradient spreads
    each token's upstream over the window that read it. Also for a window longer than the
    sequence and an empty one."""
    monkeypatch.setitem(spiking.RATE_BY_POOL, "cpu", pool)
    g = torch.Generator().manual_seed(window)
    for length in (300, 5, 0):
        spk = (torch.rand(2, length, 3, generator=g) < 0.5).to(dtype).requires_grad_()
        rate = spikes_to_features(spk, spk, "rate", window=window, tau=1.0, threshold=1.0)
        padded = torch.nn.functional.pad(spk, (0, 0, window, 0))
        expected = [padded[:, t + 1:t + 1 + window].sum(1) / window for t in range(length)]
        assert rate.shape == spk.shape and rate.dtype == dtype
        if length == 0:
            continue
        assert torch.equal(rate, torch.stack(expected, 1)), f"length {length}"
        up = torch.randn(rate.shape, generator=g).to(dtype)
        (grad,) = torch.autograd.grad(rate, spk, up)
        reads = [up[:, t:t + window].float().sum(1) / window for t in range(length)]
        assert_close(grad.float(), torch.stack(reads, 1), dtype=dtype, msg=f"gradient, length {length}")


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


@pytest.mark.parametrize("method", ["rate", "temporal", "potential"])
def test_stepping_the_path_from_its_state_gives_the_forwards_trace(method):
    """SpikingPath's own decoding state: a prefill of 7 tokens, then token by token, gives
    the sequence's spikes bit for bit and its features to rounding."""
    from model.spiking import SpikingState

    path = _path(spike_to_mamba_method=method, spike_rate_window=3).eval()
    h = torch.nn.functional.rms_norm(torch.randn(2, 20, 64), (64,))
    with torch.no_grad():
        full, first = path(h), path(h[:, :7])
        state = SpikingState()
        head = path(h[:, :7], state)
        tail = path(h[:, 7:], state)  # a state that has seen tokens: step by step
    assert full.post.sum() > 0 and torch.equal(head.features, first.features)
    assert torch.equal(torch.cat([head.post, tail.post], 1), full.post)
    assert torch.equal(torch.cat([head.pre, tail.pre], 1), full.pre)
    assert_close(tail.features, full.features[:, 7:], scale=0.1)
