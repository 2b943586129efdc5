import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stability.schedule import get_lr


def lr(step, peak=1e-3, warmup=10, total=110, min_ratio=0.1):
    return float(get_lr(torch.tensor(step), peak, warmup, total, min_ratio))


def test_first_step_learning_rate_is_above_zero():
    assert lr(0) == pytest.approx(1e-3 / 11)
    assert lr(0, warmup=0) == pytest.approx(1e-3)


def test_warmup_is_linear_and_reaches_the_peak():
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([1e-3 * k / 11 for k in (1, 5, 10)])
    assert lr(10) == pytest.approx(1e-3)


def test_cosine_reaches_the_floor_and_stays():
    assert lr(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(1e-4)
    assert lr(10_000) == pytest.approx(1e-4)


@given(st.integers(0, 5000), st.integers(0, 500), st.integers(1, 5000), st.floats(0, 1))
def test_learning_rate_is_bounded_finite_and_positive_before_the_horizon(step, warmup, total, min_ratio):
    value = lr(step, 3e-4, warmup, total, min_ratio)
    assert math.isfinite(value) and 0 <= value <= 3e-4 * (1 + 1e-6)
    if step < max(total, warmup):
        assert value > 0
