"""stability/atomic.py: no reader ever sees half a file, and crashes leave no litter for long."""

import os

import pytest

from stability.atomic import atomic_link, atomic_write, remove_stale_temporaries


def test_a_crash_mid_write_leaves_the_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"previous")

    def crash(f):
        f.write(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("data,expected", [(b"\x00\x01", b"\x00\x01"), ("héllo", "héllo".encode())])
def test_bytes_and_text_are_written_whole(tmp_path, data, expected):
    atomic_write(tmp_path / "sub" / "f", data)
    assert (tmp_path / "sub" / "f").read_bytes() == expected


def test_a_link_keeps_the_old_contents_when_the_source_is_replaced(tmp_path):
    atomic_write(tmp_path / "last.pt", b"step 4")
    atomic_link(tmp_path / "last.pt", tmp_path / "step-4.pt")
    atomic_write(tmp_path / "last.pt", b"step 8")
    assert (tmp_path / "step-4.pt").read_bytes() == b"step 4"
    assert (tmp_path / "last.pt").read_bytes() == b"step 8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-4.pt"]


def test_a_link_falls_back_to_a_copy_where_links_fail(tmp_path, monkeypatch):
    atomic_write(tmp_path / "a", b"data")

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    atomic_link(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"data"


def test_stale_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / ".last.pt.tmp-1234-abcd").write_bytes(b"half")
    (tmp_path / ".hidden").write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path, tmp_path / "missing")
    assert [p.name for p in removed] == [".last.pt.tmp-1234-abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.pt"]
