"""The guard's overhead: a guarded optimizer step beside the same step unguarded, on the
same model and batch (phase-1 shape). Target: under 3% on the CPU.

The two steps alternate within each round so machine drift hits both alike; the
benchmark reports each one's own time and the median of per-round ratios.
"""

from __future__ import annotations

import pytest

from benchmarks.test_phases import bench_paired, hybrid_step


@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
def test_step(benchmark, guard):
    benchmark.group = "guard overhead (phase 1)"
    step, train = hybrid_step(1, guard=guard)
    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=80, iterations=1)
    benchmark.extra_info["tokens_per_s"] = train.batch_size * train.sequence_length / benchmark.stats.stats.median


def test_paired_ratio(benchmark):
    """Median over rounds of guarded/unguarded time, each round running both."""
    benchmark.group = "guard overhead (phase 1), paired"
    q1, median, q3 = bench_paired(benchmark, hybrid_step(1, guard=True)[0], hybrid_step(1, guard=False)[0],
                                  rounds=80)
    benchmark.extra_info.update(guarded_over_unguarded_median=median, quartiles=[q1, q3])
