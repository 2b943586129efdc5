"""What the numba kernels share (``model.ops.numba_support``): the vectorisable exp, and the
tanh and sigmoid built on it, against the true functions over their whole range."""

import numpy as np
import pytest

from model.ops import numba_support

pytestmark = pytest.mark.skipif(not numba_support.available(), reason="numba not installed: pip install numba")
numba = pytest.importorskip("numba")


@pytest.mark.parametrize("dtype,lo,hi,ulps", [(np.float32, -87.3, 88.3, 1), (np.float64, -700.0, 700.0, 1)])
def test_numba_kernels_exp_is_within_an_ulp_of_the_true_exp(dtype, lo, hi, ulps):
    exp = numba.njit(lambda xs: np.array([numba_support.exp(x) for x in xs]))
    xs = np.concatenate([np.linspace(lo, hi, 200_001), np.linspace(-1, 1, 20_001), [0.0]]).astype(dtype)
    got = exp(xs)
    want = np.exp(xs.astype(np.float64)).astype(dtype)  # the true exp, rounded once to dtype
    assert got.dtype == dtype
    ulp = np.spacing(want)
    assert (np.abs(got.astype(np.float64) - want) <= ulps * ulp).all(), (
        f"worst at x = {xs[np.argmax(np.abs(got - want) / ulp)]}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernels_exp_keeps_non_finite_and_limits(dtype):
    exp = numba.njit(lambda xs: np.array([numba_support.exp(x) for x in xs]))
    got = exp(np.array([np.nan, -np.inf, np.inf, -1e4, 1e4], dtype=dtype))
    assert np.isnan(got[0])
    assert got[1] == 0 and got[3] == 0
    assert got[2] == np.inf and got[4] == np.inf


@pytest.mark.parametrize("dtype,rel", [(np.float32, 3e-7), (np.float64, 5e-16)])
def test_compiled_tanh_and_sigmoid_are_accurate_everywhere(dtype, rel):
    grid = np.concatenate([np.linspace(-20, 20, 40001), np.geomspace(1e-30, 1e3, 2000), -np.geomspace(1e-30, 1e3, 2000),
                           [0.0, -0.0, 0.625, -0.625, np.nextafter(0.625, 1), 44.0, 90.0, -90.0, 1e30, -1e30]])
    x = grid.astype(dtype)

    @numba.njit(error_model="numpy")
    def both(xs):
        t, s = np.empty_like(xs), np.empty_like(xs)
        for i in range(xs.shape[0]):
            t[i], s[i] = numba_support.tanh(xs[i]), numba_support.sigmoid(xs[i])
        return t, s

    t, s = both(x)
    assert t.dtype == s.dtype == dtype
    wide = x.astype(np.longdouble)  # the references in x87's 80-bit floats
    with np.errstate(over="ignore"):
        refs = (("tanh", t, np.tanh(wide)), ("sigmoid", s, 1 / (1 + np.exp(-wide))))
    for name, got, want in refs:
        normal = np.abs(want) >= np.finfo(dtype).tiny  # subnormal results may flush to 0
        err = np.abs(got - want)[normal] / np.abs(want)[normal]
        assert err.max() < rel, f"{name}: relative error {err.max():.2e} at x = {x[normal][err.argmax()]}"
    special = np.array([np.inf, -np.inf, np.nan], dtype=dtype)
    t, s = both(special)
    assert t[0] == 1 and t[1] == -1 and np.isnan(t[2])
    assert s[0] == 1 and s[1] == 0 and np.isnan(s[2])
