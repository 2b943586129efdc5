"""Kernels a step launches on the GPU code path, at each phase's own shape: the hybrid with
its recurrences' fused kernels (``--cfc-impl/--lif-impl/--scan-impl triton``, what CUDA runs
by default), with their torch loops (the GPU path before them), and the same-width
Transformer of ``test_phases``; counted on the CPU by ``benchmarks.launches`` (aten ops that
do work, plus Triton launches). Not a timing: ``pytest --benchmark-only`` runs it with the
others and the counts are in ``extra_info``. The target: at most 3x the Transformer's."""

from __future__ import annotations

import pytest

from benchmarks.launches import GPU_PATH, TORCH_LOOPS, count_launches, phase_step
from benchmarks.test_phases import transformer_step
from model.ops import triton_support


def _steady(step) -> int:
    count_launches(step, run_triton=False)  # lazy state: the optimizer's moments, the guard's warm-up
    return count_launches(step, run_triton=False)


@pytest.mark.skipif(not triton_support.interpreted(), reason="counted on the CPU, under TRITON_INTERPRET=1")
@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_launches_a_step(benchmark, phase):
    benchmark.group = "kernels a step"
    fused = _steady(phase_step(phase, GPU_PATH, warm_up=False))
    loops = _steady(phase_step(phase, TORCH_LOOPS, warm_up=False))
    baseline, _ = transformer_step(phase)
    baseline()
    transformer = count_launches(baseline)
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(
        phase=phase, hybrid_fused=fused.total, hybrid_torch_loops=loops.total, transformer=transformer.total,
        fused_over_transformer=fused.total / transformer.total, loops_over_transformer=loops.total / transformer.total,
        triton_launches=sum(fused.triton.values()), top_fused_ops=dict(fused.aten.most_common(12)),
    )
