"""benchmarks/bigdata.py: the generated corpora are the size asked for, and not one text repeated."""

from benchmarks import bigdata


def test_make_corpus_writes_about_the_size_asked_with_each_copy_renamed(tmp_path):
    one_copy = sum(len(text.encode()) for _, text in bigdata.stdlib_texts())
    megabytes = one_copy // 10**6 + 1  # into the second copy
    root = bigdata.make_corpus(tmp_path / "c", megabytes)
    files = sorted(root.rglob("*.py"))
    size = sum(p.stat().st_size for p in files)
    assert megabytes * 10**6 <= size < megabytes * 10**6 + 5 * 10**5
    first, second = (root / f"copy{i:04d}" / "__future__.py" for i in (0, 1))
    assert "class _Feature_0:" in first.read_text() and "class _Feature_1:" in second.read_text()
    assert bigdata.make_corpus(root, megabytes) == root and sorted(root.rglob("*.py")) == files  # reused
