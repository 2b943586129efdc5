"""stability/shards.py: a prepared directory checked cheaply, read exactly, split into tasks;
the cache reads no text on a second start."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from stability import prepare as prep
from stability import shards
from stability.config import TrainConfig
from stability.data import TokenBatches, text_corpus
from stability.prepare import Settings, prepare
from stability.shards import corpus_mismatch, load_prepared, open_prepared, task_tokens, task_views
from stability.sources import DataError, TextDirectory, open_source
from stability.tokenizers import ByteTokenizer, encode_documents_with_offsets
from tests.stability.test_data import hf_env, paragraphs, write  # noqa: F401 -- a fixture


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i in range(60):
        write(root / f"area{i % 3}" / f"doc{i:02d}.txt", paragraphs(2 + i % 4, seed=i))
    return root


@pytest.fixture
def prepared(tree, tmp_path):
    return prepare(open_source(tree), tmp_path / "p", Settings(tokenizer="byte", workers=1, shard_tokens=1009,
                                                                val_fraction=0.2))


def test_an_untouched_directory_opens_without_reading_a_token(prepared, monkeypatch):
    monkeypatch.setattr(shards, "sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    corpus = open_prepared(prepared, "fix")
    assert corpus.fingerprint().startswith("prepared:")


def test_a_truncated_shard_is_named_with_what_to_do(prepared):
    shard = prepared / "train-00001.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=r"train-00001.bin is truncated \(2016 bytes, the manifest says 2018\); "
                                        r"the prepared corpus is damaged: prepare it again"):
        open_prepared(prepared, "prepare it again")


def test_a_changed_shard_of_the_same_size_is_found_by_its_hash(prepared):
    shard = prepared / "val-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="val-00000.bin changed since it was prepared"):
        open_prepared(prepared, "fix")


def test_a_copied_directory_with_new_mtimes_is_hashed_once_and_accepted(prepared):
    os.utime(prepared / "train-00000.bin", ns=(1, 1))
    assert open_prepared(prepared, "fix").fingerprint() == prep.fingerprint(prep.json.loads(
        (prepared / prep.MANIFEST).read_text()))


def test_a_missing_index_and_another_format_version_are_refused(prepared):
    (prepared / "val.names").unlink()
    with pytest.raises(DataError, match="val.names is missing"):
        open_prepared(prepared, "fix")
    text = (prepared / prep.MANIFEST).read_text().replace('"version": 1', '"version": 99')
    (prepared / prep.MANIFEST).write_text(text)
    with pytest.raises(DataError, match="prepared by another lsnn .*version 99"):
        open_prepared(prepared, "fix")


def test_tasks_are_views_equal_to_the_in_memory_partition(tree, prepared):
    corpus = open_prepared(prepared, "fix")
    memory = text_corpus(tree, val_fraction=0.2).partition(3)
    views = task_views(corpus, 3)
    assert [v.name for v in views] == [m.name for m in memory]
    for view, part in zip(views, memory, strict=True):
        for split, docs, ids in (("train", part.train, view.train_docs), ("val", part.val, view.val_docs)):
            tokens = task_tokens(corpus, split, ids)
            stream, offsets = encode_documents_with_offsets(ByteTokenizer(), docs)
            assert np.array_equal(tokens.read(0, len(tokens)).astype(np.int64), stream.numpy())
            assert np.array_equal(np.concatenate(list(tokens.chunks(333))).astype(np.int64), stream.numpy())
        train_offsets = encode_documents_with_offsets(ByteTokenizer(), part.train)[1]
        assert list(shards.doc_offsets(corpus, view.train_docs)) == train_offsets
        assert corpus.names("train", view.train_docs)[:] == [str(tree / d.path) for d in part.train]


def test_batches_over_shards_equal_batches_over_the_same_tensor(prepared):
    corpus = open_prepared(prepared, "fix")
    tokens = corpus.splits["train"].tokens
    tensor = torch.from_numpy(tokens.read(0, len(tokens)).astype(np.int64))
    for shuffle in (True, False):
        a = TokenBatches(tokens, 4, 50, seed=3, shuffle=shuffle)  # windows cross the 1009-token shards
        b = TokenBatches(tensor, 4, 50, seed=3, shuffle=shuffle)
        for index in range(len(a)):
            assert all(torch.equal(x, y) for x, y in zip(a.get(2, index), b.get(2, index), strict=True))


def test_a_second_start_reads_no_text_and_a_changed_file_prepares_anew(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("LSNN_CACHE_DIR", str(tmp_path / "cache"))
    t = TrainConfig(data=str(tree), tokenizer="byte", val_fraction=0.2)
    said: list[str] = []
    first = load_prepared(t, said.append)
    assert any("preparing" in line for line in said)
    monkeypatch.setattr(TextDirectory, "scan", lambda self: pytest.fail("read the text again"))
    assert load_prepared(t).path == first.path
    monkeypatch.undo()
    monkeypatch.setenv("LSNN_CACHE_DIR", str(tmp_path / "cache"))
    changed = tree / "area0" / "doc00.txt"
    original = changed.read_text()
    try:
        changed.write_text(original + "one more line\n")
        said.clear()
        second = load_prepared(t, said.append)
    finally:
        changed.write_text(original)
    assert second.path != first.path and second.path.parent == first.path.parent
    assert second.fingerprint() != first.fingerprint()
    assert any("changed since it was last prepared" in line for line in said)


def test_a_prepared_directory_refuses_flags_it_was_not_made_with(prepared):
    t = TrainConfig(data=str(prepared), tokenizer="bpe", val_fraction=0.2)
    with pytest.raises(DataError, match=r"prepared with --tokenizer byte, but this command has --tokenizer bpe; "
                                        r"pass --tokenizer byte"):
        load_prepared(t)
    with pytest.raises(DataError, match="prepared with --val-fraction 0.2, but this command has --val-fraction 0.05"):
        load_prepared(replace(t, tokenizer="byte", val_fraction=0.05))
    assert load_prepared(replace(t, tokenizer="byte")).path == prepared


def test_an_old_checkpoints_corpus_is_explained_and_a_changed_one_named():
    assert "kept its corpus in memory" in corpus_mismatch("ab" * 32)
    assert "fingerprint differs" in corpus_mismatch("prepared:" + "ab" * 32)


def test_wikitext2_is_prepared_with_its_own_splits(tmp_path, monkeypatch, hf_env):
    from tests.stability.test_data import WIKI_VAL, fake_datasets

    monkeypatch.setenv("LSNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([]))
    corpus = load_prepared(TrainConfig(dataset="wikitext2", tokenizer="byte"))
    assert corpus.name == "wikitext2" and corpus.manifest["splits"]["val"]["documents"] == 1
    val = corpus.splits["val"].tokens
    assert bytes(val.read(0, len(val) - 1).astype(np.uint8)).decode() == "".join(WIKI_VAL)
    assert list(corpus.names("train")) == ["train/00000", "train/00001"]
    assert [corpus.domains[i] for i in corpus.splits["train"].docs["domain"][:-1]] == [
        "Valkyria Chronicles III", "Tower Building of the Little Rock Arsenal"]
