"""stability/data.py: splits that never leak, shifted targets, masked pads, exact resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from stability import data, sources
from stability.data import (
    IGNORE_INDEX,
    Corpus,
    DataError,
    Document,
    TokenBatches,
    load_corpus,
    stdlib_corpus,
    text_corpus,
    unigram_loss,
    validation_keys,
    wikitext2_corpus,
)
from stability.tokenizers import ByteTokenizer, encode_documents
from tests.strategies import relative_paths, token_streams, window_shapes

ROOT = Path(__file__).resolve().parents[2]
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return stdlib_corpus()


def paragraphs(n: int, seed: int = 0) -> str:
    """n paragraphs of varied prose, about 350 characters each."""
    words = "liquid spiking mamba neuron membrane gate scan token state decay".split()  # noqa: SIM905
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        picks = torch.randint(len(words), (50,), generator=g).tolist()
        out.append(f"Paragraph {i}. " + " ".join(words[j] for j in picks) + ".\n")
    return "\n".join(out)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def all_paths(corpus: Corpus) -> list[str]:
    return [d.path for d in corpus.train + corpus.val]


# --- the embedded stdlib corpus ---------------------------------------------------------


def test_validation_files_never_appear_in_training(stdlib):
    train, val = {d.path for d in stdlib.train}, {d.path for d in stdlib.val}
    assert train.isdisjoint(val)
    assert len(train) == len(stdlib.train) and len(val) == len(stdlib.val)
    train_texts = {d.text for d in stdlib.train}
    assert not any(d.text in train_texts for d in stdlib.val if len(d.text) > 200)


def test_validation_is_about_val_fraction_of_files(stdlib):
    n = len(stdlib.train) + len(stdlib.val)
    assert 0.02 < len(stdlib.val) / n < 0.10
    larger = stdlib_corpus(val_fraction=0.2)
    # raising the fraction only moves files from train to validation
    assert {d.path for d in stdlib.val} < {d.path for d in larger.val}


def test_stdlib_split_is_identical_in_another_process(stdlib):
    code = (
        "from stability.data import stdlib_corpus; c = stdlib_corpus(); "
        "print(c.fingerprint()); print(*sorted(d.path for d in c.val), sep='\\n')"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash() than ours
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == stdlib.fingerprint()
    assert out[1:] == sorted(d.path for d in stdlib.val)


def test_stdlib_corpus_skips_test_packages_and_site_packages(stdlib):
    paths = all_paths(stdlib)
    assert all(p.endswith(".py") for p in paths)
    offending = [p for p in paths if EXCLUDED_DIRS & set(p.split("/")[:-1])]
    assert offending == []
    assert {"json/decoder.py", "asyncio/base_events.py", "collections/__init__.py"} <= set(paths)
    assert not any(p.startswith("_sysconfigdata") for p in paths)


def test_stdlib_corpus_size_is_plausible(stdlib):
    train_chars, val_chars = stdlib.num_chars()
    assert 5_000_000 < train_chars + val_chars < 40_000_000
    assert len(stdlib.train) + len(stdlib.val) > 300
    assert stdlib.name == "stdlib"


def test_stdlib_walk_skips_excluded_dirs_and_undecodable_files(tmp_path, monkeypatch):
    for rel in ("os.py", "zz.py", "email/parser.py", "email/mime/text.py", "lib2to3/fixer.py"):
        write(tmp_path / rel, f"# {rel}\n" + paragraphs(2))
    for rel in (
        "test/test_os.py",
        "email/tests/t.py",
        "idlelib/idle_test/x.py",
        "lib2to3/tests/data/bom.py",
        "tkinter/test/widgets.py",
        "site-packages/numpy/core.py",
        "dist-packages/six.py",
        "__pycache__/os.py",
        "json/__pycache__/a.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux.py",
        "README.txt",
    ):
        write(tmp_path / rel, "excluded = True\n")
    write(tmp_path / "latin1.py", "caf\xe9 = 1\n".encode("latin-1"))
    write(tmp_path / "nul.py", b"x = 1\x00\n")
    monkeypatch.setattr(sources, "stdlib_root", lambda: tmp_path)
    corpus = stdlib_corpus(val_fraction=0.5)
    assert sorted(all_paths(corpus)) == [
        "email/mime/text.py",
        "email/parser.py",
        "lib2to3/fixer.py",
        "os.py",
        "zz.py",
    ]
    assert corpus.skipped == 2
    assert {d.group for d in corpus.train + corpus.val} == {"email", "lib2to3", "modules os..zz"}


# --- the split rule ---------------------------------------------------------------------


@given(relative_paths(), st.floats(1e-9, 1 - 1e-9))
def test_split_holds_out_low_hashes_and_never_leaves_a_side_empty(keys, fraction):
    val = validation_keys(keys, fraction)
    assert 0 < len(val) < len(keys)
    by_rule = {k for k in keys if data._unit_hash(k) < fraction}
    if 0 < len(by_rule) < len(keys):
        assert val == by_rule
    assert validation_keys(list(reversed(keys)), fraction) == val  # order does not matter


def test_split_falls_back_to_the_smallest_hash_when_none_hashes_in():
    keys = [f"doc{i}.txt" for i in range(5)]
    assert validation_keys(keys, 1e-12) == {min(keys, key=data._unit_hash)}


# --- --data PATH ------------------------------------------------------------------------


def test_data_file_is_split_into_disjoint_contiguous_segments(tmp_path):
    text = paragraphs(600)  # ~210 KB: ~13 segments
    corpus = text_corpus(write(tmp_path / "book.txt", text))
    segments = sorted(corpus.train + corpus.val, key=lambda d: d.path)
    assert "".join(d.text for d in segments) == text  # nothing lost, nothing duplicated
    assert all(len(d.text) <= data.SEGMENT_CHARS for d in segments)
    assert all(d.text.endswith("\n\n") for d in segments[:-1])  # cut between paragraphs
    assert corpus.train and corpus.val
    assert {d.path for d in corpus.train}.isdisjoint(d.path for d in corpus.val)
    assert text_corpus(tmp_path / "book.txt").fingerprint() == corpus.fingerprint()


def test_segments_cut_lines_without_blank_lines_and_hard_cut_without_newlines():
    lines = "".join(f"line {i:06d}\n" for i in range(5000))
    pieces = data.segments(lines, 1000)
    assert "".join(pieces) == lines and all(p.endswith("\n") for p in pieces)
    blob = "x" * 2500
    assert data.segments(blob, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]


def test_data_directory_is_split_by_file_and_skips_hidden_and_binary_files(tmp_path):
    for i in range(30):
        write(tmp_path / f"part{i % 3}" / f"doc{i:02d}.txt", paragraphs(3, seed=i))
    write(tmp_path / "top.md", paragraphs(3))
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config.txt", "secret")
    write(tmp_path / "image.png", b"\x89PNG\x00\x00")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    corpus = text_corpus(tmp_path)
    paths = all_paths(corpus)
    assert len(paths) == 31 and "top.md" in paths and "part1/doc01.txt" in paths
    assert not any("hidden" in p or ".git" in p or "png" in p for p in paths)
    assert corpus.skipped == 2
    assert corpus.train and corpus.val
    assert {d.path for d in corpus.train}.isdisjoint(d.path for d in corpus.val)


def too_small_file(tmp_path: Path) -> Path:
    return write(tmp_path / "small.txt", "one short paragraph\n")


DATA_ERRORS = {
    "missing path": (lambda t: t / "nope", "no such file or directory"),
    "empty file": (lambda t: write(t / "empty.txt", "  \n"), "the file is empty"),
    "binary file": (lambda t: write(t / "x.bin", b"\x00\x01"), "binary or not UTF-8"),
    "file too small": (too_small_file, "too small to hold out a validation split"),
    "no text files": (lambda t: write(t / "d" / "x.bin", b"\x00").parent, "no text files"),
    "one text file": (lambda t: write(t / "d" / "a.txt", "text").parent, "too small to hold out"),
}


@pytest.mark.parametrize("case", DATA_ERRORS, ids=list(DATA_ERRORS))
def test_bad_data_path_raises_naming_the_flag_and_path(tmp_path, case):
    make, message = DATA_ERRORS[case]
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        text_corpus(path)
    assert f"--data {path}" in str(err.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_zero_one_raises(fraction, tmp_path):
    with pytest.raises(DataError, match="--val-fraction"):
        text_corpus(write(tmp_path / "a.txt", paragraphs(100)), val_fraction=fraction)


def test_data_and_dataset_together_raise_naming_both_flags(tmp_path):
    with pytest.raises(DataError, match=r"--data .* and --dataset stdlib were both given"):
        load_corpus(str(tmp_path), "stdlib")


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(
        DataError, match="--dataset wikitext103: unknown dataset; choose one of stdlib, wikitext2"
    ):
        load_corpus(None, "wikitext103")


def test_load_corpus_dispatches(tmp_path, stdlib):
    assert load_corpus(None, None).fingerprint() == stdlib.fingerprint()
    assert load_corpus(None, "stdlib").fingerprint() == stdlib.fingerprint()
    path = write(tmp_path / "a.txt", paragraphs(200))
    assert load_corpus(str(path), None).fingerprint() == text_corpus(path).fingerprint()


# --- partition into continual-learning tasks --------------------------------------------


def test_partition_gives_disjoint_balanced_tasks_each_with_validation(stdlib):
    tasks = stdlib.partition(4)
    assert [t.name.split(":")[0] for t in tasks] == ["task 1", "task 2", "task 3", "task 4"]
    domains = [{d.group for d in t.train + t.val} for t in tasks]
    assert all(a.isdisjoint(b) for i, a in enumerate(domains) for b in domains[i + 1 :])
    paths = [p for t in tasks for p in all_paths(t)]
    assert sorted(paths) == sorted(all_paths(stdlib))
    assert all(t.train and t.val for t in tasks)
    assert {d.path for t in tasks for d in t.val} == {d.path for d in stdlib.val}  # sides kept
    sizes = [sum(t.num_chars()) for t in tasks]
    assert max(sizes) < 1.1 * min(sizes)
    assert [t.fingerprint() for t in stdlib.partition(4)] == [t.fingerprint() for t in tasks]


def test_partition_names_tasks_by_domain_and_truncates():
    docs = [
        Document(f"{name}/{i}.py", "x" * (100 - i))
        for name in ("asyncio", "email")
        for i in range(4)
    ]
    corpus = Corpus("c", docs[1:4] + docs[5:], [docs[0], docs[4]])
    assert [t.name for t in corpus.partition(2)] == ["task 1: asyncio", "task 2: email"]
    assert data.task_label(0, [f"domain{i}" for i in range(30)]).endswith(", ...")
    assert len(data.task_label(0, [f"domain{i}" for i in range(30)])) <= data._TASK_LABEL_CHARS


def test_partition_of_a_data_directory_groups_by_top_level_directory(tmp_path):
    for i in range(60):
        write(tmp_path / f"area{i % 3}" / f"doc{i:02d}.txt", paragraphs(2, seed=i))
    tasks = text_corpus(tmp_path, val_fraction=0.3).partition(3)
    areas = [{p.split("/")[0] for p in all_paths(t)} for t in tasks]
    assert sorted(a for task_areas in areas for a in task_areas) == ["area0", "area1", "area2"]
    assert [t.name for t in tasks] == [f"task {i + 1}: {a.pop()}" for i, a in enumerate(areas)]


def test_partition_of_a_flat_data_directory_groups_by_file(tmp_path):
    for i in range(6):
        write(tmp_path / f"doc{i}.txt", paragraphs(2 + i, seed=i))
    corpus = text_corpus(tmp_path, val_fraction=0.5)
    tasks = corpus.partition(2)
    sizes = sorted(((len(d.text), d.path) for d in corpus.train + corpus.val), reverse=True)
    # greedy, largest first, to the lighter task: 5 -> task 1, 4 -> task 2, 3 -> task 2, ...
    assert tasks[0].name.startswith(f"task 1: {sizes[0][1]}, ")
    assert tasks[1].name.startswith(f"task 2: {sizes[1][1]}, {sizes[2][1]}")


def test_partition_with_more_tasks_than_domains_raises(stdlib):
    n = len({d.group for d in stdlib.train + stdlib.val})
    with pytest.raises(
        DataError,
        match=f"--num-tasks {n + 1}: the corpus stdlib has only {n} domains; lower --num-tasks",
    ):
        stdlib.partition(n + 1)


def test_partition_raises_when_a_task_would_have_no_validation():
    docs = [Document(f"{name}/a.py", "text " * 10) for name in ("a", "b", "c")]
    corpus = Corpus("c", docs[:2], docs[2:])
    with pytest.raises(
        DataError, match="--num-tasks 2: task .* would have no validation documents"
    ):
        corpus.partition(2)


# --- wikitext2 through a fake `datasets` ------------------------------------------------

WIKI_TRAIN = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 is a tactical role @-@ playing game . \n",
    " = = Gameplay = = \n",
    " The game takes place during the Second Europan War . \n",
    " = Tower Building of the Little Rock Arsenal = \n",
    " The building was constructed in 1840 . \n",
]
WIKI_VAL = [" = Homarus gammarus = \n", " Homarus gammarus is a species of lobster . \n"]


@pytest.fixture
def hf_env(monkeypatch):
    """Restore the HF offline variables wikitext2_corpus sets."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def fake_datasets(calls: list, error: Exception | None = None) -> types.SimpleNamespace:
    def load_dataset(*args, **kwargs):
        calls.append(
            (args, kwargs, os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
        )
        if error is not None:
            raise error
        return {
            "train": {"text": WIKI_TRAIN},
            "validation": {"text": WIKI_VAL},
            "test": {"text": []},
        }

    return types.SimpleNamespace(load_dataset=load_dataset)  # all `import datasets` needs


def test_wikitext2_loads_offline_and_keeps_its_splits(monkeypatch, hf_env):
    calls: list = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))
    corpus = load_corpus(None, "wikitext2")
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {}, "1", "1")]
    assert [d.domain for d in corpus.train] == [
        "Valkyria Chronicles III",
        "Tower Building of the Little Rock Arsenal",
    ]
    assert "= = Gameplay = =" in corpus.train[0].text  # sections stay in their article
    assert [d.text for d in corpus.val] == ["".join(WIKI_VAL)]
    assert "".join(d.text for d in corpus.train) == "".join(WIKI_TRAIN)


def test_wikitext2_without_datasets_says_how_to_install(monkeypatch, hf_env):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"--dataset wikitext2 .*pip install lsnn\[datasets\]"):
        wikitext2_corpus()


def test_wikitext2_not_in_cache_says_to_fetch_it_once(monkeypatch, hf_env):
    calls: list = []
    error = ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls, error))
    with pytest.raises(
        DataError,
        match="--dataset wikitext2: .*not in the local datasets cache.*or use --data",
    ):
        wikitext2_corpus()
    assert calls[0][2:] == ("1", "1")


# --- token streams and batches ----------------------------------------------------------


def test_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(1000) * 7 % 1009  # distinct values: positions are recoverable
    batches = TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    for inputs, targets in batches.iter_epoch(0):
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (
            4,
            16,
        )
        for row_in, row_tg in zip(inputs, targets, strict=True):
            start = int((tokens == row_in[0]).nonzero()[0, 0])
            window = tokens[start : start + 17]
            assert torch.equal(row_in, window[:-1]) and torch.equal(row_tg, window[1:])
            assert start % 16 == 0


def test_validation_pads_are_masked():
    tokens = torch.arange(1, 11)  # 10 tokens, 9 targets: windows [1..5], [5..9], tail [9, 10]
    batches = TokenBatches(tokens, batch_size=8, seq_len=4, shuffle=False, pad_id=0)
    assert len(batches) == 1
    inputs, targets = batches.get(0, 0)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert targets.tolist() == [
        [2, 3, 4, 5],
        [6, 7, 8, 9],
        [10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    # the loss over the batch is the loss over the real targets only
    logits = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1))
    real = targets.reshape(-1) != IGNORE_INDEX
    assert torch.allclose(
        loss, F.cross_entropy(logits.reshape(-1, 16)[real], targets.reshape(-1)[real])
    )


@given(token_streams(), window_shapes())
def test_validation_predicts_every_token_but_the_first_exactly_once(tokens, shape):
    batch_size, seq_len = shape
    if tokens.numel() < 2:
        with pytest.raises(DataError, match="--sequence-length"):
            TokenBatches(tokens, batch_size, seq_len, shuffle=False)
        return
    batches = TokenBatches(tokens, batch_size, seq_len, shuffle=False, pad_id=-1)
    inputs, targets = (torch.cat(t) for t in zip(*batches.iter_epoch(0), strict=True))
    real = targets != IGNORE_INDEX
    assert torch.equal(targets[real], tokens[1:])
    assert torch.equal(inputs[real], tokens[:-1])
    assert bool((inputs[~real] == -1).all())
    assert all(len(t) <= batch_size for t, _ in batches.iter_epoch(0))


def test_training_drops_the_partial_window_and_batch():
    tokens = torch.arange(103)  # 102 targets: 10 full windows of 10, 2 left over
    batches = TokenBatches(tokens, batch_size=3, seq_len=10, seed=0)
    assert len(batches) == 3  # 10 windows // 3
    for epoch in range(5):
        for inputs, targets in batches.iter_epoch(epoch):
            assert inputs.shape == (3, 10) and bool((targets != IGNORE_INDEX).all())
            assert int(targets.max()) <= 100


def test_batches_are_deterministic_per_seed_epoch_and_index():
    tokens = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0))
    a = TokenBatches(tokens, batch_size=8, seq_len=12, seed=7)
    b = TokenBatches(tokens, batch_size=8, seq_len=12, seed=7)
    for epoch, index in [(0, 0), (0, 5), (3, 2), (0, 5)]:
        assert all(
            torch.equal(x, y) for x, y in zip(a.get(epoch, index), b.get(epoch, index), strict=True)
        )
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), TokenBatches(tokens, 8, 12, seed=8).order(0))
    assert torch.equal(a.order(2).sort().values, torch.arange(a.num_windows))  # a permutation


def test_validation_order_is_sequential_whatever_the_epoch():
    batches = TokenBatches(torch.arange(500), batch_size=4, seq_len=10, shuffle=False, seed=1)
    assert torch.equal(batches.get(0, 1)[0], batches.get(9, 1)[0])
    assert batches.get(0, 0)[0][:, 0].tolist() == [0, 10, 20, 30]


@pytest.mark.parametrize("start", [0, 1, 7, 12])
def test_iter_epoch_from_start_equals_the_tail_of_a_full_epoch(start):
    tokens = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(1))
    batches = TokenBatches(tokens, batch_size=4, seq_len=9, seed=11)
    full = list(batches.iter_epoch(2))
    resumed = list(
        TokenBatches(tokens, batch_size=4, seq_len=9, seed=11).iter_epoch(2, start=start)
    )
    assert len(resumed) == len(full) - start
    assert all(
        torch.equal(x, y)
        for a, b in zip(resumed, full[start:], strict=True)
        for x, y in zip(a, b, strict=True)
    )


def test_stream_shorter_than_one_window_raises_naming_sequence_length():
    with pytest.raises(
        DataError, match="--sequence-length 64: the training stream has only 40 tokens"
    ):
        TokenBatches(torch.arange(40), batch_size=1, seq_len=64)


def test_too_few_windows_for_a_batch_raises_naming_batch_size():
    with pytest.raises(DataError, match="--batch-size 8: the training stream holds only 3 windows"):
        TokenBatches(torch.arange(40), batch_size=8, seq_len=12)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"batch_size": 0}, "--batch-size 0"), ({"seq_len": 0}, "--sequence-length 0")],
)
def test_non_positive_batch_shape_raises_naming_the_flag(kwargs, flag):
    with pytest.raises(DataError, match=flag):
        TokenBatches(torch.arange(100), **{"batch_size": 2, "seq_len": 4, **kwargs})


def test_get_out_of_range_raises_index_error():
    batches = TokenBatches(torch.arange(100), batch_size=2, seq_len=4)
    with pytest.raises(IndexError, match="an epoch has 12 batches"):
        batches.get(0, 12)


# --- the unigram baseline ---------------------------------------------------------------


def test_unigram_loss_equals_a_hand_computation():
    tokens = torch.tensor([0, 0, 1, 2, IGNORE_INDEX])  # p = 1/2, 1/4, 1/4
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert unigram_loss(tokens, vocab_size=4) == pytest.approx(expected, rel=1e-12)
    assert unigram_loss(torch.arange(16), vocab_size=16) == pytest.approx(math.log(16))
    assert unigram_loss(torch.zeros(10, dtype=torch.long), vocab_size=16) == 0.0


def test_unigram_loss_of_real_validation_text_is_below_ln_vocab(stdlib):
    stream = encode_documents(ByteTokenizer(), stdlib.val[:5])
    assert 1.0 < unigram_loss(stream, 256) < math.log(256)


def test_unigram_loss_with_ids_outside_the_vocabulary_raises():
    with pytest.raises(DataError, match="--vocab-size 4: token ids span 0..9"):
        unigram_loss(torch.arange(10), vocab_size=4)


# --- the shuffle ----------------------------------------------------------------------------


@given(st.integers(1, 3000), st.integers(0, 2**63 - 1))
def test_permute_is_a_bijection_of_range_n(n, key):
    out = data.permute(np.arange(n), n, key)
    assert sorted(out.tolist()) == list(range(n))


def test_permute_of_a_slice_is_the_slice_of_the_permutation_and_depends_on_the_key():
    whole = data.permute(np.arange(5000), 5000, 7)
    assert np.array_equal(data.permute(np.arange(1200, 1300), 5000, 7), whole[1200:1300])
    assert not np.array_equal(data.permute(np.arange(5000), 5000, 8), whole)
    assert abs(np.corrcoef(np.arange(5000), whole)[0, 1]) < 0.05  # no trace of the order left


class _Huge:
    """A stream of 10^10 tokens that exists only where it is read: token i is i % 1000."""

    def __len__(self) -> int:
        return 10**10

    def windows(self, starts, length):
        return (starts[:, None] + np.arange(length)) % 1000

    def read(self, start, stop):
        return np.arange(start, stop) % 1000


def test_batches_of_a_stream_of_ten_billion_tokens_hold_no_order_in_memory():
    batches = TokenBatches(_Huge(), batch_size=8, seq_len=100, seed=1)
    ids = batches.window_ids(3, 123_456)
    assert len(set(ids)) == 8 and all(0 <= w < batches.num_windows for w in ids)
    x, y = batches.get(3, 123_456)
    assert x[:, 0].tolist() == [w * 100 % 1000 for w in ids] and torch.equal(x[:, 1:], y[:, :-1])


def test_baselines_from_counts_read_a_chunk_at_a_time_equal_those_of_the_whole_stream():
    from stability.stream import _mode_accuracy

    tokens = torch.randint(0, 50, (10_001,), generator=torch.Generator().manual_seed(2))
    counts = data.token_counts(data.ArrayTokens(tokens.numpy()), 64, chunk=999)
    assert counts.sum() == 10_001 and counts[50:].sum() == 0
    assert data.unigram_from_counts(counts) == pytest.approx(unigram_loss(tokens, 64), rel=1e-12)
    assert data.mode_accuracy_from_counts(counts, int(tokens[0])) == pytest.approx(_mode_accuracy(tokens), rel=1e-12)
    with pytest.raises(DataError, match="--vocab-size 40: token ids reach 49"):
        data.token_counts(data.ArrayTokens(tokens.numpy()), 40)
