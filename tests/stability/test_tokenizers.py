"""stability/tokenizers.py: round trips, a BPE trained on train only and cached, no network."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("tiktoken", reason="the test extra brings tiktoken (the gpt2/o200k adapter's oracle)")
pytest.importorskip("tokenizers", reason="the bpe tokenizer is the tokenizers library's (a default dependency)")
import tiktoken  # noqa: E402
import tiktoken.load  # noqa: E402
import tiktoken_ext.openai_public  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stability import tokenizers as tk  # noqa: E402
from stability.data import (
    Corpus,
    DataError,
    Document,
    stdlib_corpus,
    unigram_loss,
)
from stability.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    encode_documents,
    load_tokenizer,
)

UNICODE = "héllo wörld — naïve café; 日本語のテキスト 🐍🚀\n\ttabs  and   spaces\r\nΩ≈ç√∫"
SMALL_DOMAINS = {"json", "html", "http", "wsgiref"}  # ~420 KB of real text


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return stdlib_corpus()


@pytest.fixture(scope="module")
def small(stdlib) -> Corpus:
    train = [d for d in stdlib.train if d.group in SMALL_DOMAINS]
    return Corpus("small", train, stdlib.val[:4])


@pytest.fixture(scope="module")
def bpe(small, tmp_path_factory) -> BPETokenizer:
    return tk.bpe_tokenizer(small, vocab_size=600, cache_dir=tmp_path_factory.mktemp("bpe"))


# --- byte-level BPE ---------------------------------------------------------------------


def load_bpe(corpus: Corpus, vocab_size: int, cache_dir: Path | None = None) -> BPETokenizer:
    tok = load_tokenizer("bpe", corpus, vocab_size=vocab_size, cache_dir=cache_dir)
    assert isinstance(tok, BPETokenizer)
    return tok


def test_bpe_round_trips_real_text_and_unicode(bpe, small):
    assert isinstance(bpe, Tokenizer)
    for text in [d.text for d in small.val] + [UNICODE, "", " leading space", "trailing\n\n"]:
        assert bpe.decode(bpe.encode(text)) == text
    texts = [d.text for d in small.val]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


@given(st.text(max_size=200))
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_compresses_and_keeps_ids_in_the_vocabulary(bpe, small):
    text = small.val[0].text
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges were learned
    assert bpe.vocab_size <= 600 and max(ids) < bpe.vocab_size
    assert bpe.eos_id == bpe.pad_id == 0


def test_literal_endoftext_in_text_is_text_not_the_separator(bpe):
    text = "a <|endoftext|> b"
    assert bpe.eos_id not in bpe.encode(text)
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_second_call_loads_from_cache_without_training(small, tmp_path, monkeypatch):
    first = load_bpe(small, 400, tmp_path)
    assert not first.from_cache

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the tokenizer is cached")

    monkeypatch.setattr(tk, "train_bpe", no_training)
    second = load_bpe(small, 400, tmp_path)
    assert second.from_cache and second.path == first.path
    assert second.encode(UNICODE) == first.encode(UNICODE)
    with pytest.raises(AssertionError, match="trained again"):  # a new key does train
        load_tokenizer("bpe", small, vocab_size=401, cache_dir=tmp_path)


def test_bpe_cache_is_keyed_by_corpus_content(small, tmp_path):
    other = Corpus("other", small.train[1:], small.val)
    assert tk.bpe_cache_path(small, 400, tmp_path) != tk.bpe_cache_path(other, 400, tmp_path)
    renamed = Corpus("renamed", list(small.train), list(small.val))
    assert tk.bpe_cache_path(small, 400, tmp_path) == tk.bpe_cache_path(renamed, 400, tmp_path)


def test_bpe_cache_is_written_atomically(small, tmp_path, monkeypatch):
    bpe = load_bpe(small, 300, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [bpe.path.name]  # no temp file left
    json.loads(bpe.path.read_text())

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tk.os, "replace", crash)
    target = tmp_path / "again"
    with pytest.raises(OSError, match="disk full"):
        load_tokenizer("bpe", small, vocab_size=300, cache_dir=target)
    assert list(target.iterdir()) == []  # neither a half file nor a temp file


def test_default_cache_dir_honours_lsnn_cache_dir(small, tmp_path, monkeypatch):
    monkeypatch.setenv("LSNN_CACHE_DIR", str(tmp_path / "env-cache"))
    bpe = load_bpe(small, 300)
    assert bpe.path.parent == tmp_path / "env-cache" and bpe.path.exists()
    monkeypatch.delenv("LSNN_CACHE_DIR")
    assert tk.default_cache_dir() == Path.home() / ".cache" / "lsnn"


def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    """Control and treatment: the same rare word learned as a token from train, not from val."""
    filler = [
        Document(f"f{i}.txt", f"plain words number {i} and more plain words\n" * 20)
        for i in range(20)
    ]
    rare = Document("rare.txt", "zyxwvutsrq " * 400)

    def has_rare_token(corpus: Corpus) -> bool:
        bpe = load_tokenizer("bpe", corpus, vocab_size=320, cache_dir=tmp_path)
        return any("zyxwv" in bpe.decode([i]) for i in range(bpe.vocab_size))

    assert has_rare_token(Corpus("control", filler + [rare], filler[:1]))
    assert not has_rare_token(Corpus("treatment", filler, [rare]))


def test_bpe_vocab_smaller_than_the_byte_alphabet_raises(small, tmp_path):
    with pytest.raises(
        DataError, match="--vocab-size 200: byte-level BPE needs at least 257 tokens"
    ):
        load_tokenizer("bpe", small, vocab_size=200, cache_dir=tmp_path)


def test_bpe_without_a_corpus_raises():
    with pytest.raises(DataError, match="--tokenizer bpe: needs a corpus"):
        load_tokenizer("bpe", None)


def test_corrupt_cached_bpe_raises_naming_the_file(small, tmp_path):
    path = tk.bpe_cache_path(small, 300, tmp_path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="is unreadable .*delete it to retrain"):
        load_tokenizer("bpe", small, vocab_size=300, cache_dir=tmp_path)


@pytest.mark.slow
def test_bpe_on_the_full_stdlib_corpus_round_trips_and_beats_bytes(stdlib, tmp_path):
    start = time.perf_counter()
    bpe = load_tokenizer("bpe", stdlib, vocab_size=8192, cache_dir=tmp_path)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    stream = encode_documents(bpe, stdlib.val)
    encoded = time.perf_counter() - start
    print(f"bpe 8192 on stdlib: train {trained:.1f} s, encode val {encoded:.1f} s")
    assert bpe.vocab_size == 8192
    assert all(bpe.decode(bpe.encode(d.text)) == d.text for d in stdlib.val)
    assert stream.numel() < sum(len(d.text) for d in stdlib.val) / 3
    assert unigram_loss(stream, bpe.vocab_size) < math.log(bpe.vocab_size)


# --- bytes ------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8():
    byte = load_tokenizer("byte", None, vocab_size=8192)  # vocab_size is 256 whatever is asked
    assert isinstance(byte, Tokenizer)
    assert (byte.vocab_size, byte.eos_id, byte.pad_id) == (256, 0, 0)
    ids = byte.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and max(ids) < 256
    assert byte.decode(ids) == UNICODE
    assert byte.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]


# --- tiktoken ---------------------------------------------------------------------------


def tiny_encoding() -> tiktoken.Encoding:
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    return tiktoken.Encoding(
        name="tiny",
        pat_str=r"""\s+|\S+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 258},
    )


def test_tiktoken_adapter_encodes_decodes_and_exposes_eos():
    tok = TiktokenTokenizer(tiny_encoding(), "gpt2")
    assert isinstance(tok, Tokenizer)
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.pad_id) == ("gpt2", 259, 258, 258)
    assert tok.encode("abc ab") == [257, 32, 256]
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert 258 not in tok.encode("x <|endoftext|> y")  # text, not the separator
    assert tok.encode_batch(["abc", UNICODE]) == [tok.encode("abc"), tok.encode(UNICODE)]


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch) -> Path:
    """An empty tiktoken cache, and a tiktoken that fails the test if asked to load."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def refuse(name):
        raise AssertionError(f"tiktoken.get_encoding({name!r}) called without cached files")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    return tmp_path


@pytest.mark.parametrize("kind", ["gpt2", "o200k"])
def test_tiktoken_not_cached_raises_before_calling_tiktoken(kind, tiktoken_cache):
    with pytest.raises(
        DataError,
        match=f"--tokenizer {kind}: tokenizer {kind} needs tiktoken's cached encoding files",
    ) as err:
        load_tokenizer(kind, None)
    assert "use --tokenizer bpe or byte" in str(err.value)
    assert str(tiktoken_cache) in str(err.value)


def test_tiktoken_cached_file_with_the_wrong_hash_counts_as_missing(tiktoken_cache):
    missing = tk.missing_tiktoken_files("o200k")
    (tiktoken_cache / Path(missing[0].split(" ")[0]).name).write_bytes(b"truncated download")
    assert tk.missing_tiktoken_files("o200k") == missing  # tiktoken would re-download it
    with pytest.raises(DataError, match="missing or corrupt"):
        load_tokenizer("o200k", None)


@pytest.mark.parametrize(("kind", "encoding"), [("gpt2", "gpt2"), ("o200k", "o200k_base")])
def test_tiktoken_cache_paths_are_the_ones_tiktoken_reads(
    kind, encoding, tiktoken_cache, monkeypatch
):
    read: list[tuple[str, str]] = []

    class Stop(Exception):
        pass

    def record(blobpath, expected_hash=None):
        read.append((blobpath, expected_hash))
        if blobpath.endswith("vocab.bpe"):
            return b"#version: 0.2\n"  # no merges: lets gpt2 go on to read encoder.json
        raise Stop

    monkeypatch.setattr(tiktoken.load, "read_file_cached", record)
    with pytest.raises(Stop):
        tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[encoding]()
    expected = [
        f"{tiktoken_cache / hashlib.sha1(url.encode()).hexdigest()} ({url})" for url, _ in read
    ]
    assert tk.missing_tiktoken_files(kind) == expected
    assert [h for _, h in tk._TIKTOKEN_FILES[kind][1]] == [h for _, h in read]  # the same sha256


@pytest.mark.parametrize(("kind", "encoding"), [("gpt2", "gpt2"), ("o200k", "o200k_base")])
def test_tiktoken_loads_through_get_encoding_when_cached(
    kind, encoding, tiktoken_cache, monkeypatch
):
    files = []
    for url, _ in tk._TIKTOKEN_FILES[kind][1]:
        (tiktoken_cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
            b"cached " + url.encode()
        )
        files.append((url, hashlib.sha256(b"cached " + url.encode()).hexdigest()))
    monkeypatch.setitem(tk._TIKTOKEN_FILES, kind, (encoding, tuple(files)))
    calls: list[str] = []

    def get_encoding(name: str) -> tiktoken.Encoding:
        calls.append(name)
        return tiny_encoding()

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    tok = load_tokenizer(kind, None)
    assert calls == [encoding]
    assert tok.name == kind and tok.eos_id == 258


def test_tiktoken_cache_dir_follows_tiktokens_order(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert tk.tiktoken_cache_dir() == os.path.join(tempfile.gettempdir(), "data-gym-cache")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert tk.tiktoken_cache_dir() == str(tmp_path / "gym")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tik"))
    assert tk.tiktoken_cache_dir() == str(tmp_path / "tik")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's "caching disabled": always download
    assert len(tk.missing_tiktoken_files("gpt2")) == 2


def test_tiktoken_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import raises ImportError
    with pytest.raises(
        DataError, match=r"--tokenizer gpt2: needs tiktoken: pip install lsnn\[tiktoken\]"
    ):
        load_tokenizer("gpt2", None)


def test_unknown_tokenizer_lists_the_valid_kinds():
    with pytest.raises(
        DataError,
        match="--tokenizer sentencepiece: unknown tokenizer; choose one of bpe, byte, gpt2, o200k",
    ):
        load_tokenizer("sentencepiece", None)


def test_encode_documents_separates_documents_with_eos():
    stream = encode_documents(ByteTokenizer(), [Document("a", "hi"), Document("b", "é")])
    assert stream.dtype == torch.int64
    assert stream.tolist() == [104, 105, 0, 0xC3, 0xA9, 0]
    assert encode_documents(ByteTokenizer(), []).shape == (0,)


def test_a_saved_bpe_tokenizer_loads_back_and_encodes_the_same(tmp_path):
    corpus = Corpus("tiny", [Document("a.txt", UNICODE * 20), Document("b.txt", "def f(x):\n    return x\n" * 50)],
                    [Document("c.txt", "print('hi')\n")])
    bpe = load_tokenizer("bpe", corpus, 300, tmp_path / "cache")
    tk.save_tokenizer(bpe, tmp_path / "run")
    again = tk.load_saved_tokenizer(tmp_path / "run")
    assert isinstance(again, BPETokenizer) and again.vocab_size == bpe.vocab_size and again.eos_id == bpe.eos_id
    assert again.encode(UNICODE) == bpe.encode(UNICODE) and again.decode(again.encode(UNICODE)) == UNICODE


def test_a_saved_byte_tokenizer_loads_back(tmp_path):
    tk.save_tokenizer(ByteTokenizer(), tmp_path)
    assert isinstance(tk.load_saved_tokenizer(tmp_path), ByteTokenizer)


@pytest.mark.parametrize("content", [None, "", "{not json", '{"lsnn_tokenizer": "wordpiece"}'])
def test_a_missing_or_bad_saved_tokenizer_is_a_data_error_naming_the_file(tmp_path, content):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(DataError, match="tokenizer.json"):
        tk.load_saved_tokenizer(tmp_path)
