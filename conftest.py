"""Suite-wide set-up: hardware gating, hypothesis profiles, benchmark selection.

Hardware gating lives here and nowhere else: tests mark themselves ``gpu`` and this file
skips them, with the reason, where CUDA is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

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
