import subprocess

import pytest

from tests.integration.cli_helpers import small_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of real text (standard-library modules), shared by the run tests."""
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem (tmpfs) to fill up; skipped where this process may not mount one."""
    path = tmp_path / "disk"
    path.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN) to make a full disk")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only bind mount; skipped where this process may not mount one."""
    src, path = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    path.mkdir()
    if not (_mount("--bind", str(src), str(path)) and _mount("-o", "remount,bind,ro", str(path))):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here (needs root or CAP_SYS_ADMIN)")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
