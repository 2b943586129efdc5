"""Corpora, train/validation splits, token streams and next-token batches.

The old trainer drew its validation set from the training set, did not shift its labels
and did not mask its pads (LESSONS.md). Here:

- a corpus is split BY FILE (a single file: by contiguous segment) with a stable hash of
  the file's relative path, so no validation text is ever trained on, and the split is
  the same in every process and on every machine;
- a batch is a set of windows of ``seq_len + 1`` tokens: inputs are ``window[:-1]`` and
  targets ``window[1:]``, the next token;
- validation keeps the stream's last, partial window; its pads are ``pad_id`` in the
  inputs and ``IGNORE_INDEX`` in the targets, so the loss never sees them.

Shape letters: b batch (windows), l sequence length, n tokens in a stream.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stability import sources
from stability.sources import (  # noqa: F401 -- the split rule and readers, re-exported
    DEFAULT_VAL_FRACTION,
    SEGMENT_CHARS,
    DataError,
    Source,
    SplitRule,
    check_val_fraction,
    segments,
    stdlib_root,
    validation_keys,
)
from stability.sources import unit_hash as _unit_hash  # noqa: F401

IGNORE_INDEX = -100
"""Target of a pad: ``torch.nn.functional.cross_entropy``'s default ignore_index."""
DATASETS: tuple[str, ...] = ("stdlib", "wikitext2")
"""Names accepted by ``--dataset``; ``stdlib`` is the embedded default."""
_TASK_LABEL_CHARS = 72
_WIKITEXT_TITLE = re.compile(r" = ([^=].*?) = \n?")


@dataclass(frozen=True)
class Document:
    """One file (or one segment of a single file) of a corpus."""

    path: str
    """Relative path with POSIX separators; a segment of a single file is ``name#00003``."""
    text: str = field(repr=False)
    """The document's text, decoded as UTF-8."""
    domain: str = ""
    """The group ``Corpus.partition`` keeps together; empty: the first path component."""

    @property
    def group(self) -> str:
        return self.domain or self.path.split("/", 1)[0]


@dataclass(frozen=True)
class Corpus:
    """Documents split into train and validation; no document is in both."""

    name: str
    """What the corpus is, for logs: "stdlib", "--data notes/", "task 2: email, json"."""
    train: list[Document] = field(repr=False)
    val: list[Document] = field(repr=False)
    skipped: int = 0
    """Files left out because they were binary, not UTF-8, or empty (the CLI reports it)."""

    def fingerprint(self) -> str:
        """sha256 over split, path and text of every document, in path order.

        Equal content and split give an equal fingerprint in every process; the split
        is part of it because a tokenizer cached under it was trained on ``train`` only.
        """
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for doc in sorted(docs, key=lambda d: d.path):
                for part in (split, doc.path, doc.text):
                    data = part.encode("utf-8", "surrogatepass")
                    h.update(len(data).to_bytes(8, "little"))  # length-prefixed: unambiguous
                    h.update(data)
        return h.hexdigest()

    def num_chars(self) -> tuple[int, int]:
        """(train, validation) size in characters."""
        return sum(len(d.text) for d in self.train), sum(len(d.text) for d in self.val)

    def partition(self, k: int) -> list[Corpus]:
        """K disjoint tasks for continual learning, by domain, each with its own val split
        (``assign_domains``). Each document keeps its train/validation side."""
        groups: dict[str, int] = {}
        for doc in self.train + self.val:
            groups[doc.group] = groups.get(doc.group, 0) + len(doc.text)
        members = assign_domains(groups, k, self.name)
        return [self._part(i, names, k) for i, names in enumerate(members)]

    def _part(self, i: int, names: list[str], k: int) -> Corpus:
        label = task_label(i, names)
        chosen = set(names)
        train = [d for d in self.train if d.group in chosen]
        val = [d for d in self.val if d.group in chosen]
        check_task(label, k, len(train), len(val), len(self.val), len(self.train) + len(self.val))
        return Corpus(label, train, val)


def assign_domains(sizes: dict[str, int], k: int, corpus: str) -> list[list[str]]:
    """The domains of each of ``k`` tasks: domains (with their sizes in characters) go,
    largest first, to the task with the fewest characters so far (ties: the lowest task),
    so tasks are balanced and the result is deterministic."""
    if k < 1:
        raise DataError(f"--num-tasks {k}: must be at least 1")
    if len(sizes) < k:
        raise DataError(f"--num-tasks {k}: the corpus {corpus} has only {len(sizes)} domains; lower --num-tasks")
    loads = [0] * k
    members: list[list[str]] = [[] for _ in range(k)]
    for name in sorted(sizes, key=lambda g: (-sizes[g], g)):
        task = min(range(k), key=lambda i: (loads[i], i))
        loads[task] += sizes[name]
        members[task].append(name)
    return members


def check_task(label: str, k: int, train: int, val: int, all_val: int, all_docs: int) -> None:
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"--num-tasks {k}: {label} would have no {side} documents (the corpus has {all_val} "
                        f"validation documents of {all_docs}); lower --num-tasks or raise --val-fraction")


def task_label(i: int, names: list[str]) -> str:
    label = f"task {i + 1}: " + ", ".join(names)
    if len(label) <= _TASK_LABEL_CHARS:
        return label
    return label[: _TASK_LABEL_CHARS - 5].rsplit(", ", 1)[0] + ", ..."


# --- corpora in memory, read through the same sources as prepared corpora --------------------


def corpus_from_source(source: Source, name: str, val_fraction: float) -> Corpus:
    """Every document of ``source`` in memory, split as a prepared corpus splits it: for
    small text (tests, ``lsnn eval --data``); training reads prepared shards instead."""
    check_val_fraction(val_fraction)
    docs = [doc for _, unit in source.scan() for doc in unit]
    source.finish(len(docs))
    rule = SplitRule(val_fraction)
    for doc in docs:
        if doc.split is None:
            rule.see(doc.key)
    held = [doc.split == "val" if doc.split is not None else rule.is_val(doc.key) for doc in docs]
    train = [Document(d.name, d.text, d.domain) for d, v in zip(docs, held, strict=True) if not v]
    val = [Document(d.name, d.text, d.domain) for d, v in zip(docs, held, strict=True) if v]
    if not train or not val:
        raise DataError(f"{source.what}: {len(docs)} {source.doc_unit} of text is too small to hold out a "
                        "validation split; give more text")
    return Corpus(name, train, val, source.skipped)


def stdlib_corpus(val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """The embedded corpus in memory: see ``sources.StdlibSource``."""
    check_val_fraction(val_fraction)
    return corpus_from_source(sources.StdlibSource(sources.stdlib_root()), "stdlib", val_fraction)


def text_corpus(path: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION, data_format: str = "auto",
                text_field: str = "text") -> Corpus:
    """``--data PATH`` in memory: a UTF-8 text file, or a directory of them (recursive),
    or JSON Lines / Parquet / Arrow files (``sources.open_source``).

    A directory is split by file, with one domain per top-level directory (a flat
    directory: per file); a single file is split into ~16 KB segments of whole
    paragraphs, by a stable hash of the segment index, one domain per segment.
    Hidden files and directories are ignored; binary, non-UTF-8 and empty files in a
    directory are skipped and counted in ``Corpus.skipped``.
    """
    check_val_fraction(val_fraction)
    return corpus_from_source(sources.open_source(path, data_format, text_field), str(path), val_fraction)


# --- --dataset wikitext2 ----------------------------------------------------------------


def wikitext2_corpus() -> Corpus:
    """WikiText-2 (raw) from the local ``datasets`` cache; never touches the network.

    Its own train and validation splits are used as given; documents are articles,
    split on the `` = Title = `` heading lines, one domain per article.
    """
    # Before the import: datasets and huggingface_hub read these when they load.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "--dataset wikitext2 needs the datasets package: pip install lsnn[datasets], "
            "or use --data"
        ) from e
    _force_offline(datasets)
    try:
        splits = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    # An offline cache miss is a ConnectionError, FileNotFoundError or ValueError,
    # depending on the version: re-raised, with the original named, never swallowed.
    except Exception as e:
        raise DataError(
            f"--dataset wikitext2: wikitext-2-raw-v1 is not in the local datasets cache "
            f"({type(e).__name__}: {e}); run once on a machine with network access, or use --data"
        ) from e
    train = _wikitext_articles("train", list(splits["train"]["text"]))
    val = _wikitext_articles("validation", list(splits["validation"]["text"]))
    if not train or not val:
        raise DataError(
            "--dataset wikitext2: the cached dataset has an empty split; "
            "clear it from the cache and reload"
        )
    return Corpus("wikitext2", train, val)


def _force_offline(datasets_module: object) -> None:
    """If datasets was imported before the environment was set, set its flags too."""
    config = getattr(datasets_module, "config", None)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if config is not None and hasattr(config, name):
            setattr(config, name, True)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and hasattr(hub, "HF_HUB_OFFLINE"):
        setattr(hub, "HF_HUB_OFFLINE", True)  # noqa: B010 -- a module only known at run time


def _wikitext_articles(split: str, lines: list[str]) -> list[Document]:
    articles: list[tuple[str, list[str]]] = []
    for line in lines:
        heading = _WIKITEXT_TITLE.fullmatch(line)
        if heading or not articles:
            articles.append((heading.group(1) if heading else "", []))
        articles[-1][1].append(line)
    docs: list[Document] = []
    for title, body in articles:
        text = "".join(body)
        if text.strip():
            path = f"{split}/{len(docs):05d}"
            docs.append(Document(path, text, title or path))
    return docs


# --- dispatch ---------------------------------------------------------------------------


def load_corpus(
    data: str | Path | None, dataset: str | None, val_fraction: float = DEFAULT_VAL_FRACTION
) -> Corpus:
    """``--data PATH`` or ``--dataset NAME`` (default: the embedded stdlib corpus).

    ``val_fraction`` applies to stdlib and ``--data``; wikitext2 has its own splits.
    """
    if data is not None and dataset is not None:
        raise DataError(f"--data {data} and --dataset {dataset} were both given; pass one of them")
    if data is not None:
        return text_corpus(data, val_fraction)
    name = dataset or "stdlib"
    if name == "stdlib":
        return stdlib_corpus(val_fraction)
    if name == "wikitext2":
        return wikitext2_corpus()
    raise DataError(
        f"--dataset {name}: unknown dataset; choose one of {', '.join(DATASETS)} "
        "(stdlib is the embedded default), or pass --data PATH"
    )


# --- token streams and batches ----------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


_U64 = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread hash of 64-bit words (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A pseudo-random permutation of range(n), applied to ``positions`` (int64), without
    ever holding it: a Feistel network over the smallest power of 4 >= n, cycle-walked
    back into range. Memory is that of ``positions`` whatever n is, so a corpus of 10^9
    windows shuffles as cheaply as one of 10^3 (``torch.randperm`` would hold 8 GB)."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask = _U64((1 << half) - 1)
    keys = _mix(np.arange(rounds, dtype=_U64) + _U64(key & (2**64 - 1)))
    out = positions.astype(_U64)
    todo = np.ones(len(out), dtype=bool)
    while todo.any():  # a cycle from a value in range comes back into range: this ends
        x = out[todo]
        left, right = x >> _U64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        out[todo] = (left << _U64(half)) | right
        todo[todo] = out[todo] >= n
    return out.astype(np.int64)


class TokenSource(Protocol):
    """A stream of token ids that need not be in memory: prepared shards, or an array."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray: ...

    def chunks(self, size: int) -> Iterator[np.ndarray]: ...


class ArrayTokens:
    """A token stream held in memory (a tensor's numpy view, no copy)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        return self.array[starts[:, None] + np.arange(length)]  # (b, length)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        yield from np.split(self.array, np.arange(size, len(self.array), size))  # views, no copy


def as_token_source(tokens: torch.Tensor | TokenSource) -> TokenSource:
    if not isinstance(tokens, torch.Tensor):
        return tokens
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
        raise DataError(
            "token stream must be a 1-D integer tensor, "
            f"got {tokens.dtype} of shape {tuple(tokens.shape)}"
        )
    return ArrayTokens(tokens.cpu().numpy())


class TokenBatches:
    """Next-token batches over one token stream (a tensor, or prepared shards on disk).

    The n tokens are cut into windows of l + 1 tokens with stride l (window w is
    ``tokens[w*l : w*l + l + 1]``), so every token but the first is a target exactly
    once. ``inputs[:, t] == window[t]`` and ``targets[:, t] == window[t + 1]``.

    Training (``drop_last``, default: ``shuffle``) drops the last partial window and the
    last partial batch and reshuffles windows every epoch with a permutation keyed by
    (seed, epoch) (``permute``: none is ever held in memory). Validation (``shuffle=False``)
    goes in order and keeps the last partial window, its input pads ``pad_id`` and target
    pads ``IGNORE_INDEX``, and a last smaller batch. Only a batch's own windows are read.
    """

    def __init__(
        self,
        tokens: torch.Tensor | TokenSource,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        *,
        drop_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size {batch_size}: must be a positive integer")
        if seq_len < 1:
            raise DataError(f"--sequence-length {seq_len}: must be a positive integer")
        self.tokens = as_token_source(tokens)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.drop_last = shuffle if drop_last is None else drop_last
        n = len(self.tokens)
        self.num_full = max(n - 1, 0) // seq_len
        self.tail = max(n - 1, 0) - self.num_full * seq_len  # targets in the partial window
        self.num_windows = self.num_full + (self.tail > 0 and not self.drop_last)
        self._check_enough(n)

    def _check_enough(self, n: int) -> None:
        b, length = self.batch_size, self.seq_len
        if self.drop_last and self.num_full == 0:
            raise DataError(
                f"--sequence-length {length}: the training stream has only {n} tokens, fewer "
                f"than one window of {length + 1}; lower --sequence-length or give more text"
            )
        if self.drop_last and self.num_full < b:
            raise DataError(
                f"--batch-size {b}: the training stream holds only {self.num_full} windows of "
                f"{length + 1} tokens ({n} tokens); lower --batch-size or --sequence-length, "
                "or give more text"
            )
        if self.num_windows == 0:
            raise DataError(
                f"--sequence-length {length}: the validation stream has only {n} tokens, no target "
                "to predict; give more text"
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_windows // self.batch_size
        return math.ceil(self.num_windows / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The window ids of ``epoch`` in visiting order (w,); built whole, for inspection:
        batches compute only their own slice of it."""
        return torch.from_numpy(self._ids(epoch, 0, self.num_windows))

    def _ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        positions = np.arange(start, min(stop, self.num_windows), dtype=np.int64)
        if not self.shuffle:
            return positions
        return permute(positions, self.num_windows, _epoch_seed(self.seed, epoch))

    def _batch_ids(self, epoch: int, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: an epoch has {len(self)} batches")
        return self._ids(epoch, index * self.batch_size, (index + 1) * self.batch_size)

    def window_ids(self, epoch: int, index: int) -> list[int]:
        """The windows batch ``index`` of ``epoch`` is made of; window w holds tokens
        ``w * l`` to ``w * l + l`` of the stream."""
        return self._batch_ids(epoch, index).tolist()

    def get(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: (inputs (b, l), targets (b, l)), both int64."""
        ids = self._batch_ids(epoch, index)  # (b,)
        full = ids < self.num_full
        length = self.seq_len
        if full.all():
            windows = torch.from_numpy(self._windows(ids))  # (b, l+1)
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        inputs = torch.full((len(ids), length), self.pad_id, dtype=torch.long)  # (b, l)
        targets = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)  # (b, l)
        mask = torch.from_numpy(full)
        windows = torch.from_numpy(self._windows(ids[full]))
        inputs[mask], targets[mask] = windows[:, :-1], windows[:, 1:]
        start = self.num_full * length
        tail = torch.from_numpy(self.tokens.read(start, start + self.tail + 1).astype(np.int64))  # (tail + 1,)
        row = int(np.flatnonzero(~full)[0])
        inputs[row, : self.tail] = tail[:-1]
        targets[row, : self.tail] = tail[1:]
        return inputs, targets

    def _windows(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.zeros((0, self.seq_len + 1), dtype=np.int64)
        return self.tokens.windows(ids * self.seq_len, self.seq_len + 1).astype(np.int64)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch``: resuming at ``start`` gives
        exactly the rest of the epoch an uninterrupted run would have seen."""
        if not 0 <= start <= len(self):
            raise IndexError(f"start {start} out of range: an epoch has {len(self)} batches")
        for index in range(start, len(self)):
            yield self.get(epoch, index)


def token_counts(tokens: TokenSource, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    """How often each id occurs in ``tokens``, read a chunk at a time (vocab_size,) int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in tokens.chunks(chunk):
        if len(part) and int(part.max()) >= vocab_size:
            raise DataError(f"--vocab-size {vocab_size}: token ids reach {int(part.max())}; "
                            "the vocabulary is too small")
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_from_counts(counts: np.ndarray) -> float:
    """``unigram_loss`` of a stream with these token counts."""
    total = int(counts.sum())
    if total == 0:
        raise DataError("unigram loss of an empty token stream: give more validation text")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mode_accuracy_from_counts(counts: np.ndarray, first: int) -> float:
    """Next-token accuracy of always guessing the most frequent target, from the counts
    of a whole stream whose first token (never a target) is ``first``."""
    targets = counts.copy()
    targets[first] -= 1
    return float(targets.max()) / max(int(targets.sum()), 1)


def unigram_loss(tokens: torch.Tensor, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Cross-entropy in nats per token of predicting ``tokens`` with their own unigram
    frequencies, i.e. their unigram entropy: the loss a model must beat to show that
    it uses context. At most ln(vocab_size)."""
    flat = tokens.reshape(-1)
    flat = flat[flat != ignore_index].long()
    if flat.numel() == 0:
        raise DataError("unigram loss of an empty token stream: give more validation text")
    low, high = int(flat.min()), int(flat.max())  # host sync, once per run
    if low < 0 or high >= vocab_size:
        raise DataError(
            f"--vocab-size {vocab_size}: token ids span {low}..{high}; the vocabulary is too small"
        )
    p = torch.bincount(flat, minlength=vocab_size).double() / flat.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())  # host sync, once per run
