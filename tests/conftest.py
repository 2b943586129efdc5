"""Fixtures for the whole suite (hardware gating and profiles live in the root conftest)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenizers and token streams are cached per test session, never in ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LSNN_CACHE_DIR", str(tmp_path_factory.mktemp("lsnn-cache")))
    yield
    mp.undo()
