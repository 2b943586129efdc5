"""Each STDP rule against tiny spike patterns computed by hand (b=1, l=8, one synapse
unless stated, tau=4 so a = exp(-1/4); updates are averaged over the b*l tokens)."""

import math

import pytest
import torch

from model.plasticity import RULES, SLOW_TRACE, bcm, classical, homeostatic, stdp_update, triplet

L = 8
A = math.exp(-1 / 4)


def train(*times: int, n: int = 1, unit: int = 0) -> torch.Tensor:
    s = torch.zeros(1, L, n)
    for t in times:
        s[0, t, unit] = 1.0
    return s


def test_pre_before_post_potentiates_by_the_window():
    dw = classical(train(2), train(4), 4.0, 4.0)
    assert dw.item() == pytest.approx(A**2 / L)


def test_post_before_pre_depresses_by_the_window():
    dw = classical(train(4), train(2), 4.0, 4.0)
    assert dw.item() == pytest.approx(-(A**2) / L)


def test_windows_are_symmetric_in_the_lag():
    for lag in (1, 2, 5):
        ltp = classical(train(1), train(1 + lag), 4.0, 4.0).item()
        ltd = classical(train(1 + lag), train(1), 4.0, 4.0).item()
        assert ltp == pytest.approx(-ltd) == pytest.approx(A**lag / L)


def test_simultaneous_spikes_potentiate_because_pre_drives_post_at_the_same_token():
    assert classical(train(3), train(3), 4.0, 4.0).item() == pytest.approx(1 / L)


def test_change_decays_with_the_lag():
    near = classical(train(3), train(4), 4.0, 4.0).item()
    far = classical(train(0), train(4), 4.0, 4.0).item()
    assert near == pytest.approx(A / L) and far == pytest.approx(A**4 / L) and near > far > 0


def test_weight_matrix_is_post_by_pre():
    # pre unit 0 fires before post unit 1: only W[1, 0] grows
    dw = classical(train(2, n=3, unit=0), train(3, n=2, unit=1), 4.0, 4.0)
    assert dw.shape == (2, 3)
    expected = torch.zeros(2, 3)
    expected[1, 0] = A / L
    assert torch.allclose(dw, expected)


def test_triplet_post_pre_post_potentiates_more_than_the_pair_rule():
    pre, post = train(3), train(1, 4)
    a_slow = math.exp(-1 / (SLOW_TRACE * 4.0))
    extra = triplet(pre, post, 4.0, 4.0) - classical(pre, post, 4.0, 4.0)
    # the second post spike at 4 sees the slow trace of the post spike at 1: o2 = a_slow**3
    assert extra.item() == pytest.approx(A * a_slow**3 / L)


def test_triplet_on_an_isolated_pair_equals_the_pair_rule():
    assert triplet(train(2), train(4), 4.0, 4.0).item() == pytest.approx(A**2 / L)
    assert triplet(train(4), train(2), 4.0, 4.0).item() == pytest.approx(-(A**2) / L)


def test_homeostasis_strengthens_inputs_of_a_silent_neuron_and_weakens_a_busy_one():
    pre = train(0, 4)  # rate 2/8
    silent = homeostatic(pre, torch.zeros(1, L, 1), 4.0, 4.0, target_rate=0.1)
    assert silent.item() == pytest.approx(0.1 * 2 / L)
    busy_post = torch.ones(1, L, 1)
    busy = homeostatic(pre, busy_post, 4.0, 4.0, target_rate=0.1)
    pairs = classical(pre, busy_post, 4.0, 4.0)
    assert (busy - pairs).item() == pytest.approx((0.1 - 1.0) * 2 / L)


def test_bcm_potentiates_above_the_threshold_depresses_below_and_slides():
    pre, post = torch.ones(1, L, 1), torch.ones(1, L, 1)
    up, theta_up = bcm(pre, post, 4.0, 4.0, 0.1, theta=torch.tensor([0.0]))
    down, _ = bcm(pre, post, 4.0, 4.0, 0.1, theta=torch.tensor([10.0]))
    assert up.item() > 0 > down.item()
    assert theta_up.item() > 0, "activity raises the threshold"
    _, theta_quiet = bcm(pre, torch.zeros(1, L, 1), 4.0, 4.0, 0.1, theta=torch.tensor([1.0]))
    assert theta_quiet.item() == pytest.approx(0.9), "silence lets it fall"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_zero_without_spikes_except_homeostasis_and_finite(rule):
    quiet = torch.zeros(2, L, 3)
    dw, _ = stdp_update(rule, quiet, quiet, 4.0, 4.0, 0.1)
    assert torch.isfinite(dw).all() and dw.shape == (3, 3)
    assert torch.count_nonzero(dw) == 0


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="classical, triplet, homeostatic, bcm"):
        stdp_update("hebb", train(1), train(2), 4.0, 4.0, 0.1)


@pytest.mark.parametrize("rule", RULES)
def test_stacked_blocks_get_each_blocks_own_change(rule):
    """Spike trains with a leading (block) dimension: each block's change (and BCM threshold)
    is the one its trains alone give, so a model's blocks are updated in one call."""
    g = torch.Generator().manual_seed(5)
    pre, post = ((torch.rand(3, 2, 40, 6, generator=g) < 0.3).float() for _ in range(2))  # n b l s
    theta = torch.rand(3, 6, generator=g) * 0.2 if rule == "bcm" else None
    dw, new = stdp_update(rule, pre, post, 3.0, 3.0, 0.1, theta)
    assert dw.shape == (3, 6, 6)
    for n in range(3):
        one, one_new = stdp_update(rule, pre[n], post[n], 3.0, 3.0, 0.1, None if theta is None else theta[n])
        torch.testing.assert_close(dw[n], one, msg=f"block {n}")
        if theta is not None:
            torch.testing.assert_close(new[n], one_new)
