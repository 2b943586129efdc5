"""Selective state-space scan (Mamba's S6): every implementation behind one dispatcher.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t      (per channel e, state n)
    y_t = <x_t, C_t> + D * u_t,      out_t = y_t * silu(z_t)

Arguments, shapes and semantics follow mamba-ssm's ``selective_scan_ref`` (real A only).
``selective_scan(..., impl=...)`` runs one of ``SCAN_IMPLS``:

- ``ref``: ``reference.selective_scan_ref``, the oracle, written straight from the equation;
- ``numba``: the fast CPU path, one compiled kernel a direction (``numba_kernel``);
- ``loop``: the CPU path in plain torch, hand-written backward, where numba is absent
  (``torch_scans``);
- ``parallel``: a work-efficient log-depth (Blelloch) scan in plain torch, the GPU path
  without a kernel (``torch_scans``);
- ``triton``: one Triton kernel a direction, skip and gate included (``triton_kernel``),
  the GPU path without mamba-ssm;
- ``chunked``: a chunked parallel scan (quadratic inside a chunk), a second plain-torch GPU
  path (``torch_scans``);
- ``cuda``: mamba-ssm's CUDA kernel.

Shape letters:
    b  batch
    e  channels (Mamba's inner width, d_inner)
    n  state size per channel (d_state)
    l  sequence length
    g  groups of channels sharing one B or C (e divisible by g); h = e // g channels a group

B and C are each (e n) constant, (b n l) variable or (b g n l) grouped. The scan runs in
fp32 (fp64 stays fp64, so gradcheck can use it); the output is cast back to u's dtype and
the last state (b e n) is returned in the compute dtype, as mamba-ssm's reference does.
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal

from torch import Tensor

from model.ops import numba_support, triton_support
from model.ops.selective_scan.reference import ScanResult, check_inputs, selective_scan_ref
from model.ops.selective_scan.torch_scans import (
    selective_scan_chunked,
    selective_scan_loop,
    selective_scan_parallel,
)

ScanImpl = Literal["auto", "numba", "loop", "parallel", "triton", "chunked", "cuda", "ref"]
SCAN_IMPLS: tuple[str, ...] = ("auto", "numba", "loop", "parallel", "triton", "chunked", "cuda", "ref")


# ---------------------------------------------------------------------------------------
# Numba: the CPU kernel (numba_kernel), the loop's equations in one compiled pass
# ---------------------------------------------------------------------------------------


def selective_scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The scan, skip and gate as one compiled kernel per direction, on the CPU
    (``numba_kernel``).

    Saves only its inputs for the backward, which recomputes dt, the gate and the states
    channel by channel; the gradient of the returned last state is propagated.
    """
    from model.ops.selective_scan.numba_kernel import numba_selective_scan

    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = numba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------
# Triton: the GPU kernel (triton_kernel)
# ---------------------------------------------------------------------------------------


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The scan, skip and gate as one Triton kernel per direction, on CUDA or, with
    TRITON_INTERPRET=1, on the CPU through Triton's interpreter (the tests)."""
    from model.ops.selective_scan.triton_kernel import triton_selective_scan

    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

_CUDA_FIX = (
    "on a CUDA machine `pip install lsnn[cuda]` (mamba-ssm), or choose another "
    "implementation: --scan-impl numba or --scan-impl loop (CPU), --scan-impl triton or "
    "--scan-impl parallel (GPU)"
)


@functools.lru_cache(maxsize=1)
def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's CUDA selective-scan kernel can be imported."""
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except (ImportError, OSError, RuntimeError):  # missing, or built against another CUDA/torch
        return False
    return True


def triton_available() -> bool:
    """Whether Triton is installed (the kernel compiles on first use)."""
    return triton_support.available()


def numba_available() -> bool:
    """Whether numba can be imported, for the CPU kernel."""
    return numba_support.available()


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return triton_support.interpreted()


def resolve_scan_impl(u: Tensor, impl: str) -> str:
    """The implementation ``selective_scan`` will run for ``u``: never "auto".

    auto: on CUDA mamba-ssm's kernel when installed, else the Triton kernel when Triton
    imports, else the parallel scan; on the CPU the numba kernel, else the torch loop.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(
            f"unknown selective-scan implementation {impl!r}; valid: {', '.join(SCAN_IMPLS)}"
        )
    if impl == "auto":
        if u.is_cuda:
            if mamba_ssm_available():
                return "cuda"
            return "triton" if triton_available() else "parallel"
        return "numba" if u.device.type == "cpu" and numba_available() else "loop"
    if impl == "cuda":
        if not u.is_cuda:
            raise ValueError(
                f"--scan-impl cuda runs mamba-ssm's CUDA kernel, but the tensors are on "
                f"{u.device}; {_CUDA_FIX}"
            )
        if not mamba_ssm_available():
            raise ValueError(
                f"--scan-impl cuda needs mamba-ssm, which cannot be imported; {_CUDA_FIX}"
            )
    if impl == "numba":
        if u.device.type != "cpu":
            raise ValueError(
                f"--scan-impl numba runs on the CPU, but the tensors are on {u.device}; "
                "use --scan-impl triton or parallel on a GPU"
            )
        if not numba_available():
            raise ValueError("--scan-impl numba needs numba, which cannot be imported; "
                             "pip install numba, or use --scan-impl loop")
    if impl == "triton":
        if not triton_available():
            raise ValueError("--scan-impl triton needs Triton, which cannot be imported; "
                             "pip install lsnn[triton], or use --scan-impl parallel")
        if not (u.is_cuda or triton_interpreted()):
            raise ValueError(
                f"--scan-impl triton runs on CUDA (or on the CPU under TRITON_INTERPRET=1, "
                f"for tests), but the tensors are on {u.device}; use --scan-impl numba or loop"
            )
    return impl


def _selective_scan_cuda(*args, **kwargs) -> ScanResult:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(*args, **kwargs)


_IMPLS = {
    "ref": selective_scan_ref,
    "numba": selective_scan_numba,
    "loop": selective_scan_loop,
    "parallel": selective_scan_parallel,
    "triton": selective_scan_triton,
    "chunked": selective_scan_chunked,
    "cuda": _selective_scan_cuda,
}


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: ScanImpl = "auto",
) -> ScanResult:
    """The selective scan, by ``impl`` in ``SCAN_IMPLS`` (see the module docstring).

    Returns out (b e l) in u's dtype, and the last state (b e n) if ``return_last_state``.
    """
    fn = _IMPLS[resolve_scan_impl(u, impl)]
    return fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )
