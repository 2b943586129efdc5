"""Every fast path beside its reference: forward+backward at the phase shapes."""

from __future__ import annotations

import pytest
import torch

from model.liquid import CfCCell, cfc_sequence_fused, cfc_sequence_ref
from model.spiking import lif, lif_ref
from model.ssm import (
    numba_available,
    selective_scan_loop,
    selective_scan_numba,
    selective_scan_parallel,
    selective_scan_ref,
)


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


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


@pytest.mark.parametrize("impl", ["fused", "ref"])
def test_lif(benchmark, impl):
    benchmark.group = "LIF b4 l64 s32"
    cur = torch.randn(4, 64, 32, requires_grad=True)
    fn = {"fused": lif, "ref": lif_ref}[impl]
    benchmark.pedantic(lambda: sum(o.sum() for o in fn(cur, 0.9, 1.0)).backward(), rounds=50, warmup_rounds=2)
