"""Leaky integrate-and-fire neurons over the tokens: the equations and oracle
(``reference``), the loops without a kernel (``torch_loop``), the numba kernel
(``numba_kernel``), the Triton kernels (``triton_kernel``) and the op that runs them
(``interface``)."""

from model.ops.lif.interface import LIF_IMPLS, LIFImpl, lif, resolve_lif_impl
from model.ops.lif.reference import SURROGATES, lif_ref, surrogate_grad

__all__ = ["LIF_IMPLS", "LIFImpl", "SURROGATES", "lif", "lif_ref", "resolve_lif_impl", "surrogate_grad"]
