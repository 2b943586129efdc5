"""What every Triton kernel of ``model.ops`` shares: whether Triton is there, whether it runs
its interpreter, where a kernel may run, and the precision of its fp32 products.

Triton is optional at run time (the ``triton`` extra; CUDA builds of torch bring it). It
reads TRITON_INTERPRET once, when it is first imported, and with it set every kernel runs
in Triton's interpreter on CPU tensors: that is how the tests run the kernels on machines
without a GPU. So nothing here imports Triton unless a Triton kernel is about to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether Triton is installed (its kernels compile on first use). Not imported here."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs (or will run) its interpreter, on CPU tensors. Triton decides when
    it is first imported (its own library functions are jitted then): once it is imported,
    what it decided; before, what TRITON_INTERPRET says."""
    if "triton" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.sum, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run(*tensors: Tensor) -> bool:
    """Whether a Triton kernel can take these tensors: Triton installed, and all on CUDA, or
    all on the CPU under the interpreter."""
    if not available():
        return False
    if all(t.is_cuda for t in tensors):
        return not interpreted()
    return interpreted() and all(t.device.type == "cpu" for t in tensors)


def device_problem(t: Tensor) -> str | None:
    """Why a Triton kernel cannot run on ``t``'s device, or None when it can."""
    if not available():
        return "Triton cannot be imported (pip install 'lsnn[triton]'; CUDA builds of torch bring it)"
    if t.is_cuda and interpreted():
        return ("TRITON_INTERPRET=1 is set, so Triton's kernels would run in its (slow) interpreter; "
                "unset it to run them on CUDA")
    if not t.is_cuda and not interpreted():
        return (f"Triton's kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests), "
                f"but the tensors are on {t.device}")
    return None


def dot_precision() -> str:
    """``tl.dot``'s input precision for fp32 operands, as torch's own matmuls would run them:
    TF32 when ``torch.set_float32_matmul_precision`` allows it ("high" or "medium"), full fp32
    ("ieee") at torch's default ("highest")."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def next_power_of_2(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least): Triton's block sizes."""
    return max(least, 1 << max(0, (n - 1).bit_length()))
