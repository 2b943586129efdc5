"""stability/prepare.py: shards equal to encoding the corpus in memory, a bounded sample,
the same result on every core count, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stability import prepare as prep
from stability import sources
from stability.data import text_corpus
from stability.prepare import Sample, Settings, prepare, token_dtype
from stability.shards import open_prepared
from stability.sources import DataError, Doc, open_source
from stability.tokenizers import ByteTokenizer, encode_documents_with_offsets
from tests.stability.test_data import paragraphs, write

BYTE = Settings(tokenizer="byte", workers=1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i in range(40):
        write(root / f"area{i % 3}" / f"doc{i:02d}.txt", paragraphs(3 + i % 5, seed=i))
    return root


def split_tokens(corpus, split: str) -> np.ndarray:
    tokens = corpus.splits[split].tokens
    return tokens.read(0, len(tokens)).astype(np.int64)


def test_shards_hold_exactly_the_in_memory_encoding_of_each_split(tree, tmp_path):
    out = prepare(open_source(tree), tmp_path / "p", Settings(tokenizer="byte", workers=1, shard_tokens=997))
    corpus = open_prepared(out, "fix")
    memory = text_corpus(tree)
    for split, docs in (("train", memory.train), ("val", memory.val)):
        stream, offsets = encode_documents_with_offsets(ByteTokenizer(), docs)
        assert np.array_equal(split_tokens(corpus, split), stream.numpy())
        rows = corpus.splits[split].docs
        assert rows["start"][:-1].tolist() == offsets and rows["start"][-1] == len(stream)
        assert rows["chars"][:-1].tolist() == [len(d.text) for d in docs]
        assert list(corpus.names(split)) == [str(tree / d.path) for d in docs]
        assert [corpus.domains[i] for i in rows["domain"][:-1]] == [d.group for d in docs]
    shards = corpus.manifest["splits"]["train"]["shards"]
    assert len(shards) == -(-len(split_tokens(corpus, "train")) // 997) > 1  # documents span shards
    assert corpus.manifest["dtype"] == "uint16"


def test_every_core_count_prepares_the_same_corpus(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "UNIT_BYTES", 8_000)  # a dozen units
    here: list[int] = []  # units encoded in this process (a forked worker appends to its own copy)
    original = prep.encode
    monkeypatch.setattr(prep, "encode", lambda *a: (here.append(1), original(*a))[1])
    one = prepare(open_source(tree), tmp_path / "one", Settings(tokenizer="byte", workers=1))
    assert len(here) > 3
    here.clear()
    two = prepare(open_source(tree), tmp_path / "two", Settings(tokenizer="byte", workers=2))
    assert here == [], "the units went to the worker processes"
    manifests = [json.loads((p / prep.MANIFEST).read_text()) for p in (one, two)]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_the_sample_is_the_lowest_hashes_that_fit_whatever_the_order():
    docs = [Doc(f"k{i}", f"k{i}", "", "x" * (10 + i % 7)) for i in range(300)]
    forward, backward = Sample(500), Sample(500)
    for i, d in enumerate(docs):
        forward.offer(i, d)
    for i, d in reversed(list(enumerate(docs))):
        backward.offer(i, d)
    assert forward.docs() == backward.docs()
    chosen = forward.docs()
    assert sum(len(d.text) for d in chosen) <= 500
    by_hash = sorted(docs, key=lambda d: sources.unit_hash(d.key, prep._SAMPLE_SALT))
    assert {d.key for d in chosen} == {d.key for d in by_hash[:len(chosen)]}
    assert sum(len(d.text) for d in by_hash[:len(chosen) + 1]) > 500  # the next one would not fit
    assert [d.key for d in chosen] == sorted((d.key for d in chosen), key=lambda k: int(k[1:]))  # source order


def test_the_bpe_is_trained_on_a_bounded_sample_of_the_training_split(tree, tmp_path, monkeypatch):
    seen: list[list[str]] = []
    original = prep.train_bpe
    monkeypatch.setattr(prep, "train_bpe", lambda texts, size: (seen.append(list(texts)), original(texts, size))[1])
    budgets: list[int] = []  # the tree is 80 KB: the test shrinks the flag's megabyte to 20 KB
    monkeypatch.setattr(prep, "Sample", lambda budget: (budgets.append(budget), Sample(20_000))[1])
    settings = Settings(tokenizer="bpe", vocab_size=300, tokenizer_sample_mb=1, workers=1)
    out = prepare(open_source(tree), tmp_path / "p", settings)
    (texts,) = seen
    assert budgets == [10**6]
    val = {d.text for d in text_corpus(tree).val}
    assert 0 < sum(map(len, texts)) <= 20_000 and not val & set(texts)
    sample = json.loads((out / prep.MANIFEST).read_text())["tokenizer"]["sample"]
    assert sample["documents"] == len(texts) and sample["chars"] == sum(map(len, texts)) and sample["budget_mb"] == 1


def test_a_vocabulary_over_65536_is_stored_as_uint32(tree, tmp_path):
    class Wide(ByteTokenizer):
        name, vocab_size, eos_id, pad_id = "wide", 70_000, 69_999, 69_999

    out = prepare(open_source(tree), tmp_path / "p", BYTE, tokenizer=Wide())
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    manifest = json.loads((out / prep.MANIFEST).read_text())
    assert manifest["dtype"] == "uint32"
    tokens = np.fromfile(out / manifest["splits"]["train"]["shards"][0], dtype="<u4")
    assert tokens.max() == 69_999  # the end-of-text id survives


def test_a_failure_midway_leaves_neither_the_directory_nor_a_temporary(tree, tmp_path, monkeypatch):
    original = prep.SplitWriter.write_tokens
    calls = []

    def failing(self, tokens):
        calls.append(1)
        if len(calls) == 2:  # the validation split of the only unit
            raise OSError(28, "No space left on device")
        return original(self, tokens)

    monkeypatch.setattr(prep.SplitWriter, "write_tokens", failing)
    with pytest.raises(OSError, match="No space left"):
        prepare(open_source(tree), tmp_path / "p", BYTE)
    assert list(tmp_path.iterdir()) == []


def test_a_source_too_small_to_split_is_refused_before_anything_is_written(tmp_path):
    path = write(tmp_path / "one.txt", "one short paragraph\n")
    with pytest.raises(DataError, match=r"--data .*one.txt: 1 segment\(s\) of up to 16 KB of text is too small"):
        prepare(open_source(path), tmp_path / "p", BYTE)
    assert [p.name for p in tmp_path.iterdir()] == ["one.txt"]


def test_temporaries_of_dead_preparations_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".p.tmp-{dead.stdout.strip()}-abc"
    live = tmp_path / f".q.tmp-{os.getpid()}-abc"
    gone.mkdir()
    live.mkdir()
    prep.remove_abandoned(tmp_path)
    assert not gone.exists() and live.exists()


def test_progress_says_a_line_every_10_s_without_a_bar_and_draws_one_with_it(monkeypatch, capsys):
    clock = iter([0.0, 4.0, 12.0, 12.0])  # start, two updates, the line's rate
    monkeypatch.setattr(prep.time, "monotonic", lambda: next(clock))
    said: list[str] = []
    lines = prep.Progress("encoding x", 40_000_000, said.append, bar=False)
    lines.update(5_000_000, 1_000_000)  # at 4 s: nothing yet
    lines.update(5_000_000, 1_000_000)  # at 12 s: a line
    assert said == ["encoding x: 10 of 40 MB, ETA 36s, 2.0 M tokens, 0.8 MB/s"]
    monkeypatch.undo()
    bar = prep.Progress("encoding y", 1_000_000, said.append, bar=True)
    bar.update(500_000, 10)
    bar.close()
    assert "encoding y" in capsys.readouterr().err and len(said) == 1
