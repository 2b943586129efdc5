import pytest
import torch

from stability.config import GuardConfig
from stability.scaler import LossScaleError, LossScalePolicy

T, F = torch.tensor(True), torch.tensor(False)


def policy(**kw) -> LossScalePolicy:
    p = LossScalePolicy(GuardConfig(**kw), "cpu", enabled=True)
    p.scale(torch.ones(()))  # GradScaler creates its scale on first use
    return p


def test_defaults_are_the_conservative_settings():
    c = GuardConfig()
    assert (c.init_scale, c.growth_factor, c.backoff_factor, c.growth_interval) == (1024.0, 1.5, 0.5, 200)


def test_growth_after_interval_clean_steps_and_cap():
    p = policy(init_scale=4.0, growth_factor=2.0, growth_interval=3, max_scale=16.0)
    for _ in range(2):
        p.update(overflow=F, loss_ok=T)
    assert p.get_scale() == 4.0
    p.update(overflow=F, loss_ok=T)
    assert p.get_scale() == 8.0
    for _ in range(9):
        p.update(overflow=F, loss_ok=T)
    assert p.get_scale() == 16.0, "growth is capped at --max-scale"


def test_overflow_backs_off_and_resets_growth():
    p = policy(init_scale=64.0, growth_factor=2.0, growth_interval=2, overflow_patience=10)
    p.update(overflow=F, loss_ok=T)
    p.update(overflow=T, loss_ok=T)
    assert p.get_scale() == 32.0
    p.update(overflow=F, loss_ok=T)
    assert p.get_scale() == 32.0, "the growth tracker restarted after the overflow"
    p.update(overflow=F, loss_ok=T)
    assert p.get_scale() == 64.0


def test_extra_cut_every_patience_consecutive_overflows():
    p = policy(init_scale=1024.0, overflow_patience=3, overflow_cut=0.25, min_scale=1e-3)
    expected = 1024.0
    for i in range(1, 8):
        p.update(overflow=T, loss_ok=T)
        expected *= 0.5 * (0.25 if i % 3 == 0 else 1.0)
        assert p.get_scale() == pytest.approx(expected)


def test_nonfinite_loss_leaves_the_scale_alone():
    p = policy(init_scale=64.0, growth_interval=2, growth_factor=2.0)
    p.update(overflow=F, loss_ok=T)
    for _ in range(5):
        p.update(overflow=F, loss_ok=F)
    assert p.get_scale() == 64.0
    assert int(p.growth_tracker) == 1 and int(p.consecutive_overflows) == 0


def test_scale_never_below_minimum_and_persistent_overflow_is_a_clear_error():
    p = policy(init_scale=4.0, min_scale=1.0, overflow_limit=3)
    for _ in range(5):
        p.update(overflow=T, loss_ok=T)
        p.check() if int(p.overflows_at_min) < 3 else None
    assert p.get_scale() == 1.0
    with pytest.raises(LossScaleError, match="minimum loss scale 1.*--amp-dtype bf16"):
        p.check()


def test_scale_reaches_gradscaler_through_public_api():
    p = policy(init_scale=8.0)
    p.update(overflow=T, loss_ok=T)
    assert p.scaler.get_scale() == 4.0
    assert float(p.scale(torch.ones(()))) == 4.0


def test_disabled_policy_is_a_no_op():
    p = LossScalePolicy(GuardConfig(), "cpu", enabled=False)
    loss = torch.tensor(3.0)
    assert p.scale(loss) is loss
    p.update(overflow=T, loss_ok=T)
    p.check()
    assert p.get_scale() == 1.0


def test_state_dict_round_trip_continues_identically():
    a = policy(init_scale=16.0, growth_interval=2, growth_factor=2.0)
    for o in (F, T, F):
        a.update(overflow=o, loss_ok=T)
    b = policy(init_scale=1024.0, growth_interval=2, growth_factor=2.0)
    b.load_state_dict(a.state_dict())
    for o in (F, F, T, F, F):
        a.update(overflow=o, loss_ok=T)
        b.update(overflow=o, loss_ok=T)
        assert a.get_scale() == b.get_scale()
    assert b.scaler.get_scale() == a.get_scale()


def test_loading_scaled_state_into_unscaled_run_is_refused():
    state = policy().state_dict()
    with pytest.raises(ValueError, match="--mixed-precision"):
        LossScalePolicy(GuardConfig(), "cpu", enabled=False).load_state_dict(state)
