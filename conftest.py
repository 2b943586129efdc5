"""Suite-wide set-up: hardware gating, hypothesis profiles, benchmark selection.

Hardware gating lives here and nowhere else: tests mark themselves ``gpu`` and this file
skips them, with the reason, where CUDA is absent.

Where CUDA is absent, Triton's kernels run in its interpreter, on CPU tensors, so every
Triton kernel (the selective scan, the CfC, the LIF) is tested against its oracle, and a
training step on the GPU code path can be run and its launches counted. Triton reads
TRITON_INTERPRET once, when it is first imported, and torch imports it on the way (a
training step does), so the variable is set here, before any test or benchmark is even
collected. Where CUDA is, Triton compiles and the ``gpu`` tests cover the kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,  # torch work has no stable per-example latency
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,  # CI is reproducible; explore with the dev profile locally
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

_BENCH_DIR = Path(__file__).parent / "benchmarks"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_cuda else 0
    benchmark_only = bool(config.getoption("benchmark_only", default=False))
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    skip_multi = pytest.mark.skip(reason=f"needs 2 CUDA devices for NCCL across ranks; this machine has {gpus}")
    skip_bench = pytest.mark.skip(reason="benchmark: run with `pytest --benchmark-only`")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)
        if _BENCH_DIR in Path(item.fspath).parents and not benchmark_only:
            item.add_marker(skip_bench)
