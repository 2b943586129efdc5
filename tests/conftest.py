"""Fixtures for the whole suite (hardware gating, Triton's interpreter and profiles live in
the root conftest)."""

import pytest
import torch


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
