"""The selective scan (Mamba's S6): the oracle (``reference``), the torch scans
(``torch_scans``), the numba kernel (``numba_kernel``), the Triton kernel
(``triton_kernel``), the fused Mamba mixer on the CPU (``mamba_inner``), and the dispatcher
(``interface``)."""

from model.ops.selective_scan.interface import (
    SCAN_IMPLS,
    ScanImpl,
    mamba_ssm_available,
    numba_available,
    resolve_scan_impl,
    selective_scan,
    selective_scan_numba,
    selective_scan_triton,
    triton_available,
    triton_interpreted,
)
from model.ops.selective_scan.reference import selective_scan_ref
from model.ops.selective_scan.torch_scans import selective_scan_chunked, selective_scan_loop, selective_scan_parallel

__all__ = [
    "SCAN_IMPLS",
    "ScanImpl",
    "mamba_ssm_available",
    "numba_available",
    "resolve_scan_impl",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_loop",
    "selective_scan_numba",
    "selective_scan_parallel",
    "selective_scan_ref",
    "selective_scan_triton",
    "triton_available",
    "triton_interpreted",
]
