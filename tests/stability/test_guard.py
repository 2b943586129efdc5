import math

import pytest
import torch

from stability.config import GuardConfig
from stability.guard import BANDS, NONFINITE_GRAD, NONFINITE_LOSS, OK, OVERFLOW, REASONS, SPIKE, StepGuard, band_name

T, F = torch.tensor(True), torch.tensor(False)


def guard(clip=1.0, **kw) -> StepGuard:
    return StepGuard(GuardConfig(**kw), "cpu", gradient_clip=clip, window=8)


def judge_and_commit(g: StepGuard, step: int, norm: float, loss_ok=T):
    v = g.judge(loss_ok, torch.tensor(norm))
    g.commit(step, v, torch.tensor(1.0), torch.tensor(norm), torch.tensor(1.0), torch.tensor(1e-3), T)
    return v


@pytest.mark.parametrize("loss_ok,norm,reason", [
    (T, 1.0, OK), (F, 1.0, NONFINITE_LOSS), (F, math.nan, NONFINITE_LOSS),
    (T, math.inf, OVERFLOW), (T, -math.inf, OVERFLOW), (T, math.nan, NONFINITE_GRAD),
])
def test_every_step_is_classified(loss_ok, norm, reason):
    v = guard().judge(loss_ok, torch.tensor(norm))
    assert int(v.reason) == reason
    assert float(v.skip) == float(reason != OK)
    assert bool(v.overflow) == (reason in (OVERFLOW, NONFINITE_GRAD)), "the loss scale backs off on both"
    assert bool(v.inf) == (reason == OVERFLOW), "only inf counts as overflow at the minimum scale"


@pytest.mark.parametrize("norm,band", [(0.1, "low"), (0.5, "healthy"), (5.0, "healthy"), (5.01, "high"),
                                       (10.0, "high"), (10.5, "critical"), (math.inf, "exploded"),
                                       (math.nan, "exploded")])
def test_grad_norm_bands_follow_the_write_up(norm, band):
    assert band_name(norm, GuardConfig()) == band
    assert BANDS[int(guard().judge(T, torch.tensor(norm)).band)] == band


def test_band_edges_are_configurable():
    assert band_name(3.0, GuardConfig(band_high=2.0, band_critical=2.5)) == "critical"


@pytest.mark.parametrize("clip,policy,clips", [(0.0, "off", False), (0.0, "skip", False), (0.0, "clip", True),
                                                (0.5, "off", True), (0.5, "clip", True)])
def test_the_guard_alone_decides_whether_a_step_is_clipped(clip, policy, clips):
    g = guard(clip=clip, spike_policy=policy)
    assert g.clips == clips
    assert float(g.judge(T, torch.tensor(2.0)).max_norm) == (clip or math.inf), "no spike before the warm-up"


def _warm(g: StepGuard, steps: int, norm: float = 1.0) -> None:
    for s in range(steps):
        judge_and_commit(g, s, norm + 0.01 * (s % 3))


def test_spike_is_clipped_to_the_zscore_threshold_under_clip_policy():
    g = guard(clip=100.0, spike_policy="clip", spike_warmup=10, spike_zscore=3.0)
    _warm(g, 20)
    threshold = float(g.norm_mean + 3.0 * g.norm_var.sqrt())
    v = judge_and_commit(g, 20, 50.0)
    assert int(v.reason) == OK and float(v.skip) == 0.0
    assert float(v.max_norm) == pytest.approx(threshold)
    assert int(g.spikes_clipped) == 1


def test_spike_is_skipped_under_skip_policy_and_ignored_under_off():
    g = guard(clip=100.0, spike_policy="skip", spike_warmup=10)
    _warm(g, 20)
    assert int(judge_and_commit(g, 20, 50.0).reason) == SPIKE
    off = guard(clip=100.0, spike_policy="off", spike_warmup=10)
    _warm(off, 20)
    v = judge_and_commit(off, 20, 50.0)
    assert int(v.reason) == OK and float(v.max_norm) == 100.0


def test_spikes_are_not_acted_on_during_warmup():
    g = guard(clip=100.0, spike_policy="skip", spike_warmup=10)
    _warm(g, 5)
    assert int(judge_and_commit(g, 5, 50.0).reason) == OK


def test_nonfinite_norms_never_enter_the_statistics():
    g = guard()
    _warm(g, 10)
    before = (float(g.norm_mean), float(g.norm_var), int(g.norm_count))
    for bad in (math.inf, math.nan):
        judge_and_commit(g, 10, bad)
    assert (float(g.norm_mean), float(g.norm_var), int(g.norm_count)) == before
    assert math.isfinite(before[0]) and math.isfinite(before[1])


def test_counters_and_consecutive_skips():
    g = guard()
    for s, norm in enumerate([1.0, math.inf, math.nan, math.inf, 1.0, math.inf]):
        judge_and_commit(g, s, norm)
    c = g.read()
    assert c["skips"] == {"ok": 2, "nonfinite_loss": 0, "overflow": 3, "spike": 0, "loss_spike": 0,
                           "nonfinite_grad": 1}
    assert c["good_steps"] == 2
    assert c["consecutive_skips"] == 1
    assert c["bands"]["exploded"] == 4 and c["bands"]["healthy"] == 2
    reasons = [REASONS[int(r[2])] for r in c["history"][:6]]
    assert reasons == ["ok", "overflow", "nonfinite_grad", "overflow", "ok", "overflow"]


def test_state_dict_round_trip():
    a = guard()
    _warm(a, 7)
    b = guard()
    b.load_state_dict(a.state_dict())
    for s, norm in enumerate([2.0, math.inf, 1.5]):
        va, vb = judge_and_commit(a, s, norm), judge_and_commit(b, s, norm)
        assert torch.equal(va.max_norm, vb.max_norm) and torch.equal(va.reason, vb.reason)
    assert a.read()["skips"] == b.read()["skips"]


def _warm_loss(g: StepGuard, steps: int, loss: float = 3.0) -> None:
    for s in range(steps):
        v = g.judge(T, torch.tensor(1.0), torch.tensor(loss + 0.05 * (s % 3)))
        g.commit(s, v, torch.tensor(loss), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1e-3), T)


def test_a_finite_loss_far_above_its_running_statistics_is_a_loss_spike_and_skipped():
    g = guard(loss_spike_warmup=10, loss_spike_zscore=6.0)
    _warm_loss(g, 20)
    mean_before = float(g.loss_mean)
    v = g.judge(T, torch.tensor(1.0), torch.tensor(30.0))
    assert REASONS[int(v.reason)] == "loss_spike" and float(v.skip) == 1.0
    assert float(g.loss_mean) == mean_before, "a skipped loss stays out of the statistics"
    assert int(g.judge(T, torch.tensor(1.0), torch.tensor(3.1)).reason) == OK


@pytest.mark.parametrize("kw,loss", [
    (dict(loss_spike_policy="off"), 30.0),  # off: never
    (dict(loss_spike_warmup=50), 30.0),  # not armed yet
    (dict(loss_spike_min_rise=0.5), 4.0),  # 33% above the mean: under the relative floor
])
def test_loss_spike_needs_the_policy_the_warmup_and_the_relative_floor(kw, loss):
    g = guard(**{"loss_spike_warmup": 10, **kw})
    _warm_loss(g, 20)
    assert int(g.judge(T, torch.tensor(1.0), torch.tensor(loss)).reason) == OK


def test_nonfinite_losses_never_enter_the_loss_statistics_and_outrank_a_loss_spike():
    g = guard(loss_spike_warmup=10)
    _warm_loss(g, 20)
    count = int(g.loss_count)
    for bad in (math.nan, math.inf):
        v = g.judge(F, torch.tensor(1.0), torch.tensor(bad))
        assert int(v.reason) == NONFINITE_LOSS
    assert int(g.loss_count) == count and math.isfinite(float(g.loss_mean))


def test_resetting_the_loss_statistics_disarms_the_detector_until_the_warmup_again():
    g = guard(loss_spike_warmup=10)
    _warm_loss(g, 20)
    g.reset_loss_stats()
    assert int(g.judge(T, torch.tensor(1.0), torch.tensor(30.0)).reason) == OK


def test_the_parameters_whose_gradients_went_non_finite_are_read_once_with_the_counters():
    g = guard()
    g.observe_param_norms(torch.tensor([1.0, math.nan, 2.0]))
    g.observe_param_norms(torch.tensor([math.inf, 1.0, 2.0]))
    assert g.read()["bad_params"] == [0, 1]
    assert g.read()["bad_params"] == [], "read: the next window starts clean"
