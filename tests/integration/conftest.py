import pytest

from tests.integration.cli_helpers import small_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of real text (standard-library modules), shared by the run tests."""
    return small_corpus(tmp_path_factory.mktemp("corpus"))
