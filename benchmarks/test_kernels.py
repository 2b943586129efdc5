"""Every fast path beside its reference: forward+backward at the phase shapes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.test_phases import THREADS, bench_paired, machine
from model.liquid import CfCCell, cfc_sequence_fused, cfc_sequence_ref
from model.ops import numba_support
from model.ops.cfc import cfc_scan
from model.ops.lif import lif, lif_ref
from model.ops.selective_scan import (
    numba_available,
    selective_scan_loop,
    selective_scan_numba,
    selective_scan_parallel,
    selective_scan_ref,
)


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


SCANS = {"numba": selective_scan_numba, "loop": selective_scan_loop, "parallel": selective_scan_parallel,
         "ref": selective_scan_ref}


@pytest.mark.parametrize(
    "impl",
    [pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not importable")),
     "loop", "parallel", "ref"],
)
@pytest.mark.parametrize("length", [64, 256])
def test_selective_scan(benchmark, impl, length):
    benchmark.group = f"selective scan b4 e512 n16 l{length}"
    g = torch.Generator().manual_seed(0)
    b, e, n = 4, 512, 16
    u = torch.randn(b, e, length, generator=g, requires_grad=True)
    delta = torch.rand(b, e, length, generator=g).requires_grad_()
    A = -torch.rand(e, n, generator=g).add(0.5).requires_grad_()
    B = torch.randn(b, n, length, generator=g, requires_grad=True)
    C = torch.randn(b, n, length, generator=g, requires_grad=True)
    benchmark.pedantic(_fwd_bwd(SCANS[impl], u, delta, A, B, C), rounds=10 if impl == "ref" else 30,
                       warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "ref"])
def test_cfc(benchmark, impl):
    benchmark.group = "CfC b4 l64 i160 q64 k64"
    torch.manual_seed(0)
    cell = CfCCell(160, 64, backbone_units=64)
    x = torch.randn(4, 64, 160, requires_grad=True)
    h0 = torch.zeros(4, 64)
    fn = {"fused": cfc_sequence_fused, "ref": cfc_sequence_ref}[impl]
    benchmark.pedantic(_fwd_bwd(fn, cell, x, h0), rounds=50, warmup_rounds=2)


@pytest.mark.skipif(not numba_support.available(), reason="numba not importable")
@pytest.mark.parametrize("b,l,k,q", [(4, 64, 64, 64), (4, 256, 128, 128), (8, 256, 128, 128)],
                         ids=["phase1", "phase3", "phase4"])
def test_cfc_scan_compiled_over_torch(benchmark, b, l, k, q):
    """The CfC scan's loops compiled (model.ops.cfc.numba_kernel) over its torch loops, forward and
    backward, paired; at torch's thread count, or LSNN_BENCH_THREADS."""
    benchmark.group = f"CfC scan b{b} l{l} k{k} q{q}, compiled / torch"
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(b, l, k, generator=g), torch.rand(b, q, generator=g) * 2 - 1,
            torch.randn(k, q, generator=g) / k**0.5, torch.randn(3 * q, k, generator=g) / k**0.5,
            torch.randn(3 * q, generator=g)]
    args = [a.requires_grad_() for a in args]

    def run(impl):
        y, h = cfc_scan(*args, 0.666, 1.7159, impl=impl)
        (y.sum() + h.sum()).backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS or threads)
    try:
        q1, median, q3 = bench_paired(benchmark, lambda: run("numba"), lambda: run("torch"), rounds=40)
        benchmark.extra_info.update(compiled_over_torch_median=median, quartiles=[q1, q3], **machine())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["fused", "ref"])
def test_lif(benchmark, impl):
    benchmark.group = "LIF b4 l64 s32"
    cur = torch.randn(4, 64, 32, requires_grad=True)
    fn = {"fused": lif, "ref": lif_ref}[impl]
    benchmark.pedantic(lambda: sum(o.sum() for o in fn(cur, 0.9, 1.0)).backward(), rounds=50, warmup_rounds=2)
