"""What every benchmark runs under."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _flush_denormals():
    """As `lsnn train` does on the CPU: subnormal floats make any model ~10x slower (the
    baselines too). Process-wide, so turned off again afterwards."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
