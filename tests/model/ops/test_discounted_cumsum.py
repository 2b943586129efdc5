import pytest
import torch

from model.ops.discounted_cumsum import discounted_cumsum, discounted_cumsum_ref
from tests.helpers import assert_close


def test_reference_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0, 3.0]]).unsqueeze(-1)  # b=1 l=3 c=1
    fwd = discounted_cumsum_ref(x, 0.5).flatten().tolist()
    rev = discounted_cumsum_ref(x, 0.5, reverse=True).flatten().tolist()
    assert fwd == [1.0, 2.5, 4.25]
    assert rev == [1.0 + 0.5 * 2.0 + 0.25 * 3.0, 2.0 + 0.5 * 3.0, 3.0]


@pytest.mark.parametrize("length", [1, 5, 64, 65, 130])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 1.0])
def test_chunked_scan_matches_reference_in_value_and_gradient(length, reverse, decay):
    torch.manual_seed(length)
    x = torch.randn(3, length, 4, 2, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = discounted_cumsum(x, decay, reverse=reverse, chunk=16)
    y_ref = discounted_cumsum_ref(x_ref, decay, reverse=reverse)
    assert_close(y, y_ref, msg="value")
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_ref.backward(upstream)
    assert_close(x.grad, x_ref.grad, msg="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_scan_tracks_the_reference(dtype):
    x = torch.randn(2, 100, 8)
    assert_close(discounted_cumsum(x.to(dtype), 0.9), discounted_cumsum_ref(x, 0.9), dtype=dtype, scale=4)


def test_decay_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="decay must be in"):
        discounted_cumsum(torch.randn(1, 3, 1), 1.5)
