"""Fixtures for the whole suite (hardware gating and profiles live in the root conftest).

Where CUDA is absent, Triton's kernels run in its interpreter, on CPU tensors, so every
Triton kernel (the selective scan, the CfC, the LIF) is tested against its oracle, and a
training step on the GPU code path can be run and its launches counted. Triton reads
TRITON_INTERPRET once, when it is first imported, and torch imports it on the way (a
training step does), so the variable is set here, when the suite is collected, before any
test runs. Where CUDA is, Triton compiles and the ``gpu`` tests cover the kernels.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenizers and token streams are cached per test session, never in ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LSNN_CACHE_DIR", str(tmp_path_factory.mktemp("lsnn-cache")))
    yield
    mp.undo()


@pytest.fixture
def exact_fp32_cuda():
    """TF32 off in matmuls and convolutions: the CUDA results are compared with fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
