"""Set-up for the model tests: where CUDA is absent, Triton's kernels run in its
interpreter, on CPU tensors, so the Triton selective scan is tested against its oracle.

Triton reads TRITON_INTERPRET once, when it is first imported, and torch imports it on
the way (``torch.utils.checkpoint`` does), so the variable is set here, at collection,
before any test runs. Where CUDA is, Triton compiles and the ``gpu`` tests cover it.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
