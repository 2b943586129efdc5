"""The fused CfC scan (ncps' default-mode CfC with one backbone layer, over the tokens): the
oracle (``reference``), the torch loops (``torch_loop``), the numba kernel
(``numba_kernel``), the Triton kernel (``triton_kernel``) and the op that runs them
(``interface``)."""

from model.ops.cfc.interface import CFC_IMPLS, CfCImpl, cfc_scan, resolve_cfc_impl
from model.ops.cfc.reference import cfc_scan_ref

__all__ = ["CFC_IMPLS", "CfCImpl", "cfc_scan", "cfc_scan_ref", "resolve_cfc_impl"]
