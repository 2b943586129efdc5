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
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100
"""Target of a pad: ``torch.nn.functional.cross_entropy``'s default ignore_index."""
DATASETS: tuple[str, ...] = ("stdlib", "wikitext2")
"""Names accepted by ``--dataset``; ``stdlib`` is the embedded default."""
DEFAULT_VAL_FRACTION = 0.05
SEGMENT_CHARS = 16 * 1024
"""Target size of the segments a single ``--data`` file is split into."""

# Tests (with their deliberately malformed data files) and installed packages are not the
# standard library's own source.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
# The stdlib's ~190 top-level modules (4.7 MB of 12) are chunked, in name order, into
# domains of about this many characters, comparable to a large package such as asyncio.
_TOP_LEVEL_DOMAIN_CHARS = 512 * 1024
_TASK_LABEL_CHARS = 72
_WIKITEXT_TITLE = re.compile(r" = ([^=].*?) = \n?")


class DataError(ValueError):
    """A bad data flag or file. The CLI prints it and exits with code 2, writing nothing."""


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
        """K disjoint tasks for continual learning, by domain, each with its own val split.

        Domains (``Document.group``) go, largest first, to the task with the fewest
        characters so far (ties: the lowest task), so tasks are balanced and the result
        is deterministic. Each document keeps its train/validation side.
        """
        groups: dict[str, int] = {}
        for doc in self.train + self.val:
            groups[doc.group] = groups.get(doc.group, 0) + len(doc.text)
        if k < 1:
            raise DataError(f"--num-tasks {k}: must be at least 1")
        if len(groups) < k:
            raise DataError(
                f"--num-tasks {k}: the corpus {self.name} has only {len(groups)} domains; "
                "lower --num-tasks"
            )
        loads = [0] * k
        members: list[list[str]] = [[] for _ in range(k)]
        for name in sorted(groups, key=lambda g: (-groups[g], g)):
            task = min(range(k), key=lambda i: (loads[i], i))
            loads[task] += groups[name]
            members[task].append(name)
        return [self._part(i, names, k) for i, names in enumerate(members)]

    def _part(self, i: int, names: list[str], k: int) -> Corpus:
        label = _task_label(i, names)
        chosen = set(names)
        train = [d for d in self.train if d.group in chosen]
        val = [d for d in self.val if d.group in chosen]
        if not train or not val:
            side = "training" if not train else "validation"
            raise DataError(
                f"--num-tasks {k}: {label} would have no {side} documents "
                f"(the corpus has {len(self.val)} validation documents of "
                f"{len(self.train) + len(self.val)}); "
                "lower --num-tasks or raise --val-fraction"
            )
        return Corpus(label, train, val)


def _task_label(i: int, names: list[str]) -> str:
    label = f"task {i + 1}: " + ", ".join(names)
    if len(label) <= _TASK_LABEL_CHARS:
        return label
    return label[: _TASK_LABEL_CHARS - 5].rsplit(", ", 1)[0] + ", ..."


# --- the split --------------------------------------------------------------------------


def _unit_hash(key: str) -> float:
    """A stable hash of ``key`` in [0, 1): sha256, never Python's per-process ``hash()``."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_keys(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The keys held out for validation: those whose hash is below ``val_fraction``.

    Fallback, so that with two or more keys both sides are never empty: if no key hashes
    below the fraction, the key with the smallest hash is held out (the first to join as
    the fraction grows); if every key does, the one with the largest hash trains.
    """
    scores = {key: _unit_hash(key) for key in keys}
    val = {key for key, score in scores.items() if score < val_fraction}
    if len(scores) >= 2 and not val:
        val = {min(scores, key=lambda key: (scores[key], key))}
    elif len(scores) >= 2 and len(val) == len(scores):
        val.discard(max(scores, key=lambda key: (scores[key], key)))
    return val


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")


def _split(
    name: str, docs: list[Document], keys: list[str], val_fraction: float, what: str, unit: str
) -> Corpus:
    """Split ``docs`` (one key each) into a corpus; ``what`` names the flag and path,
    ``unit`` what a document is ("files", "segments of ~16 KB")."""
    held_out = validation_keys(keys, val_fraction)
    train = [d for d, key in zip(docs, keys, strict=True) if key not in held_out]
    val = [d for d, key in zip(docs, keys, strict=True) if key in held_out]
    if not train or not val:
        raise DataError(
            f"{what}: {len(docs)} {unit} of text is too small to hold out a validation "
            "split; give more text"
        )
    return Corpus(name, train, val)


# --- reading files ----------------------------------------------------------------------


def _decode(data: bytes) -> str | None:
    """The text of a file, or None if it is binary (NUL bytes) or not UTF-8."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e.strerror or e}); fix or remove it") from e


def _walk_texts(
    root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool], what: str
) -> tuple[dict[str, str], int]:
    """Relative POSIX path -> text of the text files under ``root``, in path order,
    and how many files were skipped as binary, not UTF-8 or empty. Hidden names are
    never read."""
    texts: dict[str, str] = {}
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and keep_dir(d))
        for filename in sorted(filenames):
            if filename.startswith(".") or not keep_file(filename):
                continue
            path = Path(dirpath, filename)
            text = _decode(_read(path, what))
            if text is None or not text.strip():
                skipped += 1
                continue
            texts[path.relative_to(root).as_posix()] = text
    return dict(sorted(texts.items())), skipped


# --- the embedded corpus ----------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """The running interpreter's standard library ``.py`` sources (~12 MB, ~730 files).

    Test packages, site-/dist-packages, ``__pycache__`` and the build's generated config
    (``config-*/``, ``_sysconfigdata*``) are left out, and so are files that are not
    UTF-8. Domains: each package (the first path component), plus the top-level modules
    chunked in name order into domains of about 512 K characters.
    """
    _check_val_fraction(val_fraction)
    texts, skipped = _walk_texts(
        stdlib_root(),
        keep_dir=lambda d: d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"),
        keep_file=lambda f: f.endswith(".py") and not f.startswith("_sysconfigdata"),
        what="--dataset stdlib",
    )
    if not texts:
        raise DataError(
            f"--dataset stdlib: no Python sources under {stdlib_root()}; "
            "this interpreter ships without its standard library sources, pass --data"
        )
    domains = _top_level_domains({p: len(t) for p, t in texts.items() if "/" not in p})
    docs = [Document(p, t, domains.get(p, "")) for p, t in texts.items()]
    corpus = _split("stdlib", docs, list(texts), val_fraction, "--dataset stdlib", "files")
    return Corpus(corpus.name, corpus.train, corpus.val, skipped)


def _top_level_domains(sizes: dict[str, int]) -> dict[str, str]:
    """Chunk top-level modules, in name order, into domains of about
    ``_TOP_LEVEL_DOMAIN_CHARS``, each named by its first and last module."""
    chunks: list[list[str]] = [[]]
    total = 0
    for path in sorted(sizes):
        if chunks[-1] and total + sizes[path] > _TOP_LEVEL_DOMAIN_CHARS:
            chunks.append([])
            total = 0
        chunks[-1].append(path)
        total += sizes[path]
    stem = lambda p: p.removesuffix(".py")  # noqa: E731
    return {p: f"modules {stem(c[0])}..{stem(c[-1])}" for c in chunks if c for p in c}


# --- --data PATH ------------------------------------------------------------------------


def text_corpus(path: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """``--data PATH``: a UTF-8 text file, or a directory of them (recursive).

    A directory is split by file, with one domain per top-level directory (a flat
    directory: per file); a single file is split into ~16 KB segments of whole
    paragraphs, by a stable hash of the segment index, one domain per segment.
    Hidden files and directories are ignored; binary, non-UTF-8 and empty files in a
    directory are skipped and counted in ``Corpus.skipped``.
    """
    _check_val_fraction(val_fraction)
    root = Path(path)
    what = f"--data {path}"
    if not root.exists():
        raise DataError(
            f"{what}: no such file or directory; pass a text file or a directory of text files"
        )
    if root.is_dir():
        return _directory_corpus(root, val_fraction, what)
    return _file_corpus(root, val_fraction, what)


def _directory_corpus(root: Path, val_fraction: float, what: str) -> Corpus:
    texts, skipped = _walk_texts(root, lambda d: True, lambda f: True, what)
    if not texts:
        raise DataError(
            f"{what}: no text files in the directory ({skipped} skipped as binary, not UTF-8 "
            "or empty; hidden files are ignored); pass a directory of UTF-8 text files"
        )
    if len(texts) == 1:
        raise DataError(
            f"{what}: one text file is too small to hold out a validation split by file; "
            f"give more text, or pass the file itself ({root / next(iter(texts))}) "
            "to split it by segment"
        )
    docs = [Document(p, t) for p, t in texts.items()]
    corpus = _split(str(root), docs, list(texts), val_fraction, what, "files")
    return Corpus(corpus.name, corpus.train, corpus.val, skipped)


def _file_corpus(path: Path, val_fraction: float, what: str) -> Corpus:
    data = _read(path, what)
    if not data.strip():
        raise DataError(f"{what}: the file is empty; pass a file with text in it")
    text = _decode(data)
    if text is None:
        raise DataError(f"{what}: the file is binary or not UTF-8 text; pass a UTF-8 text file")
    pieces = segments(text, SEGMENT_CHARS)
    docs = [
        Document(f"{path.name}#{i:05d}", s, f"{path.name}#{i:05d}") for i, s in enumerate(pieces)
    ]
    keys = [str(i) for i in range(len(docs))]
    return _split(
        str(path), docs, keys, val_fraction, what, f"segment(s) of up to {SEGMENT_CHARS // 1024} KB"
    )


def segments(text: str, size: int) -> list[str]:
    """Contiguous pieces of ``text`` of at most ``size`` characters whose concatenation
    is ``text``: cut after the last blank line in reach, else the last newline, else at
    ``size``."""
    pieces = []
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            window = text[start:end]
            blank = window.rfind("\n\n", size // 2)  # only in the second half: no slivers
            newline = window.rfind("\n", size // 2)
            if blank >= 0:
                end = start + blank + 2
            elif newline >= 0:
                end = start + newline + 1
        pieces.append(text[start:end])
        start = end
    return pieces


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


class TokenBatches:
    """Next-token batches over one token stream.

    The n tokens are cut into windows of l + 1 tokens with stride l (window w is
    ``tokens[w*l : w*l + l + 1]``), so every token but the first is a target exactly
    once. ``inputs[:, t] == window[t]`` and ``targets[:, t] == window[t + 1]``.

    Training (``drop_last``, default: ``shuffle``) drops the last partial window and the
    last partial batch and reshuffles windows every epoch with a generator seeded from
    (seed, epoch). Validation (``shuffle=False``) goes in order and keeps the last
    partial window, its input pads ``pad_id`` and target pads ``IGNORE_INDEX``, and a
    last smaller batch.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
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
        if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
            raise DataError(
                "token stream must be a 1-D integer tensor, "
                f"got {tokens.dtype} of shape {tuple(tokens.shape)}"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.drop_last = shuffle if drop_last is None else drop_last
        n = tokens.numel()
        self.num_full = max(n - 1, 0) // seq_len
        self.tail = max(n - 1, 0) - self.num_full * seq_len  # targets in the partial window
        self.num_windows = self.num_full + (self.tail > 0 and not self.drop_last)
        self._check_enough(n)
        full = (
            tokens[: self.num_full * seq_len + 1]
            if self.num_full
            else tokens.new_zeros(seq_len + 1)
        )
        self._full = full.unfold(0, seq_len + 1, seq_len)[: self.num_full]  # (w, l+1), a view
        self._order_cache: tuple[int, torch.Tensor] | None = None

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
        """The window ids of ``epoch`` in visiting order (w,)."""
        if not self.shuffle:
            return torch.arange(self.num_windows)
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order_cache = (epoch, torch.randperm(self.num_windows, generator=g))
        return self._order_cache[1]

    def window_ids(self, epoch: int, index: int) -> list[int]:
        """The windows batch ``index`` of ``epoch`` is made of; window w holds tokens
        ``w * l`` to ``w * l + l`` of the stream."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: an epoch has {len(self)} batches")
        return self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def get(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: (inputs (b, l), targets (b, l)), both int64."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: an epoch has {len(self)} batches")
        ids = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]  # (b,)
        full = ids < self.num_full
        if bool(full.all()):  # CPU tensor, no device sync
            windows = self._full[ids].long()  # (b, l+1)
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        inputs = torch.full((len(ids), self.seq_len), self.pad_id, dtype=torch.long)  # (b, l)
        targets = torch.full((len(ids), self.seq_len), IGNORE_INDEX, dtype=torch.long)  # (b, l)
        windows = self._full[ids[full]].long()
        inputs[full], targets[full] = windows[:, :-1], windows[:, 1:]
        tail = self.tokens[self.num_full * self.seq_len :].long()  # (tail + 1,)
        row = int((~full).nonzero()[0, 0])
        inputs[row, : self.tail] = tail[:-1]
        targets[row, : self.tail] = tail[1:]
        return inputs, targets

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch``: resuming at ``start`` gives
        exactly the rest of the epoch an uninterrupted run would have seen."""
        if not 0 <= start <= len(self):
            raise IndexError(f"start {start} out of range: an epoch has {len(self)} batches")
        for index in range(start, len(self)):
            yield self.get(epoch, index)


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
