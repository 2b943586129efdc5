"""Training on a prepared corpus: its shards memory-mapped, its tasks, the cache.

``open_prepared(DIR)`` checks a prepared directory (``stability.prepare``) against its
manifest without reading its tokens: every file must have the size it was written with,
and a file whose mtime moved is hashed again (as rsync's quick check does), so a truncated
or changed shard is named before anything trains on it. The corpus fingerprint comes from
the manifest, never from re-reading the text.

``ShardTokens`` is a split's token stream over its shards: ``windows`` reads a batch's own
windows through ``np.memmap`` (a few pages a step), and ``chunks`` reads the stream with
plain file reads (the unigram baseline), so scanning it never maps it into the process.
A task (continual learning) is a subset of the split's documents: ``TaskTokens`` strings
their token ranges together, so tasks are views, never copies.

``load_prepared(train)`` is what ``lsnn train`` trains on: ``--data`` naming a prepared
directory, or any other ``--data``/``--dataset`` prepared on first use into
``$LSNN_CACHE_DIR/prepared/`` under a key made of the settings and of the source files'
paths, sizes and mtimes (so a second start reads no text).

Shape letters: b batch (windows), n tokens, d documents.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from stability import sources
from stability.config import TrainConfig
from stability.data import (
    DATASETS,
    assign_domains,
    check_task,
    mode_accuracy_from_counts,
    task_label,
    token_counts,
    unigram_from_counts,
    wikitext2_corpus,
)
from stability.prepare import FORMAT, MANIFEST, SPLITS, VERSION, Settings, prepare, sha256_file
from stability.sources import DataError, Doc, Source
from stability.tokenizers import BPE_RECIPE, Tokenizer, default_cache_dir, load_saved_tokenizer, tokenizer_spec


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


# --- token streams over shards -------------------------------------------------------------------


class ShardTokens:
    """A split's token stream: ``shard_tokens`` tokens a file, the last one shorter."""

    def __init__(self, paths: list[Path], total: int, shard_tokens: int, dtype: np.dtype):
        self.paths, self.total, self.shard_tokens, self.dtype = paths, total, shard_tokens, dtype
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.total

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        while start < stop:
            shard, at = divmod(start, self.shard_tokens)
            take = min(stop - start, self.shard_tokens - at)
            parts.append(self._map(shard)[at:at + take])
            start += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        return np.stack([self.read(int(s), int(s) + length) for s in starts])  # (b, length)

    def chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """``[start, stop)`` a chunk at a time, by file reads: the pages stay out of this
        process' resident memory, unlike a memory map's."""
        stop = self.total if stop is None else stop
        while start < stop:
            shard, at = divmod(start, self.shard_tokens)
            take = min(stop - start, size, self.shard_tokens - at)
            yield np.fromfile(self.paths[shard], dtype=self.dtype, count=take, offset=at * self.dtype.itemsize)
            start += take


class TaskTokens:
    """The concatenation of some ranges of a split's stream (a task's documents)."""

    def __init__(self, base: ShardTokens, runs: np.ndarray):
        self.base, self.runs = base, runs  # (k, 2): [start, stop) in the split's stream
        self.ends = np.cumsum(runs[:, 1] - runs[:, 0])  # (k,)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """The split-stream ranges that make up ``[start, stop)`` of this stream."""
        run = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[run - 1]) if run else 0
            base = int(self.runs[run, 0]) + start - begin
            take = min(stop, int(self.ends[run])) - start
            yield base, base + take
            start += take
            run += 1

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = [self.base.read(a, b) for a, b in self._pieces(start, stop)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        return np.stack([self.read(int(s), int(s) + length) for s in starts])

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for a, b in self._pieces(0, len(self)):
            yield from self.base.chunks(size, a, b)


class Names(Sequence[str]):
    """Documents' names, read from the names file when asked for, joined to ``root``."""

    def __init__(self, blob: np.memmap, starts: np.ndarray, docs: np.ndarray | None, root: str):
        self.blob, self.starts, self.docs, self.root = blob, starts, docs, root  # starts: (d+1,)

    def __len__(self) -> int:
        return len(self.docs) if self.docs is not None else len(self.starts) - 1

    def _name(self, i: int) -> str:
        doc = int(self.docs[i]) if self.docs is not None else i
        text = bytes(self.blob[int(self.starts[doc]):int(self.starts[doc + 1])]).decode("utf-8", "surrogatepass")
        return str(Path(self.root) / text) if self.root else text

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._name(j) for j in range(*i.indices(len(self)))]
        return self._name(i if i >= 0 else len(self) + i)


# --- a prepared directory ------------------------------------------------------------------------


@dataclass
class Split:
    tokens: ShardTokens
    docs: np.ndarray  # (d+1,) of prepare.DOC_DTYPE, memory-mapped
    names: np.memmap  # uint8


@dataclass
class PreparedCorpus:
    """An opened, checked prepared directory."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    name: str
    """What the corpus is, for logs: "stdlib", the --data path."""
    splits: dict[str, Split] = field(repr=False)
    display_root: str = ""
    """What document names are joined to: the source as this command names it."""

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def domains(self) -> list[str]:
        return self.manifest["domains"]

    def summary(self) -> dict[str, Any]:
        """What a run's config.json records about its data."""
        m = self.manifest
        return {"prepared": str(self.path), "source": m["source"], "fingerprint": m["fingerprint"],
                "tokenizer_sample": m["tokenizer"]["sample"], "dtype": m["dtype"],
                "splits": {s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in SPLITS}}

    def names(self, split: str, docs: np.ndarray | None = None) -> Names:
        sp = self.splits[split]
        return Names(sp.names, sp.docs["name"], docs, self.display_root)


def _damaged(path: Path, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: {problem}; the prepared corpus is damaged: {fix}")


def read_manifest(path: Path, fix: str) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged(path, f"cannot read {MANIFEST} ({e})", fix) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(path, f"{MANIFEST} is not an lsnn prepared corpus's", fix)
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: prepared by another lsnn (format version {manifest.get('version')}, this lsnn "
                        f"reads {VERSION}); {fix}")
    return manifest


def verify(path: Path, manifest: dict[str, Any], fix: str) -> None:
    """Every file as the manifest has it: present, of its size, and (if its mtime moved)
    of its sha256. Reads nothing of an untouched directory."""
    for name, rec in manifest["files"].items():
        file = path / name
        try:
            st = file.stat()
        except OSError as e:
            raise _damaged(path, f"{name} is missing ({e.strerror})", fix) from e
        if st.st_size != rec["bytes"]:
            what = "truncated" if st.st_size < rec["bytes"] else "longer than it was written"
            raise _damaged(path, f"{name} is {what} ({st.st_size} bytes, the manifest says {rec['bytes']})", fix)
        if st.st_mtime_ns != rec["mtime_ns"] and sha256_file(file) != rec["sha256"]:
            raise _damaged(path, f"{name} changed since it was prepared (its sha256 differs)", fix)


def open_prepared(path: str | Path, fix: str, name: str | None = None) -> PreparedCorpus:
    """A prepared directory, checked (``verify``); ``fix`` says what to do if it is not whole."""
    path = Path(path)
    manifest = read_manifest(path, fix)
    verify(path, manifest, fix)
    tokenizer = load_saved_tokenizer(path)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for s in SPLITS:
        info = manifest["splits"][s]
        tokens = ShardTokens([path / f for f in info["shards"]], info["tokens"], manifest["shard_tokens"], dtype)
        names_file = path / f"{s}.names"
        names = np.memmap(names_file, dtype=np.uint8, mode="r") if names_file.stat().st_size else np.zeros(0, np.uint8)
        splits[s] = Split(tokens, np.load(path / f"{s}.docs.npy", mmap_mode="r"), names)
    label = name or manifest.get("source_label") or str(path)
    return PreparedCorpus(path, manifest, tokenizer, label, splits, manifest["source"].get("display_root", ""))


# --- tasks ------------------------------------------------------------------------------------------


def _runs(docs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Token ranges (k, 2) of the documents ``chosen`` (sorted ids), consecutive ones merged."""
    if not len(chosen):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
    firsts = chosen[np.r_[0, breaks]]
    lasts = chosen[np.r_[breaks - 1, len(chosen) - 1]]
    return np.stack([docs["start"][firsts], docs["start"][lasts + 1]], axis=1).astype(np.int64)


@dataclass
class TaskView:
    name: str
    train_docs: np.ndarray | None  # document ids of the training split; None: all of them
    val_docs: np.ndarray | None


def task_views(corpus: PreparedCorpus, k: int) -> list[TaskView]:
    """``Corpus.partition`` on a prepared corpus: the same domains per task, the same names."""
    if k == 1:
        return [TaskView(corpus.name, None, None)]
    doms = {s: np.asarray(corpus.splits[s].docs["domain"][:-1]) for s in SPLITS}
    chars = sum(np.bincount(doms[s], weights=corpus.splits[s].docs["chars"][:-1], minlength=len(corpus.domains))
                for s in SPLITS)
    sizes = {corpus.domains[i]: int(c) for i, c in enumerate(chars)}
    ids = {d: i for i, d in enumerate(corpus.domains)}
    views = []
    for i, members in enumerate(assign_domains(sizes, k, corpus.name)):
        label = task_label(i, members)
        chosen = np.array([ids[m] for m in members])
        train, val = (np.flatnonzero(np.isin(doms[s], chosen)) for s in SPLITS)
        check_task(label, k, len(train), len(val), len(doms["val"]), len(doms["train"]) + len(doms["val"]))
        views.append(TaskView(label, train, val))
    return views


def task_tokens(corpus: PreparedCorpus, split: str, docs: np.ndarray | None) -> ShardTokens | TaskTokens:
    sp = corpus.splits[split]
    if docs is None:
        return sp.tokens
    return TaskTokens(sp.tokens, _runs(sp.docs, docs))


def doc_offsets(corpus: PreparedCorpus, docs: np.ndarray | None) -> Sequence[int]:
    """Where each training document starts in the task's stream (for naming a batch's sources)."""
    starts = corpus.splits["train"].docs["start"]
    if docs is None:
        return starts[:-1]  # memory-mapped: only the pages a lookup touches are read
    lengths = starts[docs + 1] - starts[docs]
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def baselines(tokens: ShardTokens | TaskTokens, vocab_size: int) -> tuple[float, float]:
    """The validation stream's unigram loss and mode accuracy, read a chunk at a time."""
    counts = token_counts(tokens, vocab_size)
    return unigram_from_counts(counts), mode_accuracy_from_counts(counts, int(tokens.read(0, 1)[0]))


# --- the cache and the flags ------------------------------------------------------------------------


def settings_of(t: TrainConfig, workers: int = 0) -> Settings:
    return Settings(t.tokenizer, t.vocab_size, t.tokenizer_sample_mb, t.val_fraction, workers)


def source_of(t: TrainConfig) -> Source:
    """The source ``--data``/``--dataset`` name (not a prepared directory)."""
    if t.data is not None and t.dataset is not None:
        raise DataError(f"--data {t.data} and --dataset {t.dataset} were both given; pass one of them")
    if t.data is not None:
        return sources.open_source(t.data, t.data_format, t.text_field)
    name = t.dataset or "stdlib"
    if name == "stdlib":
        return sources.StdlibSource(sources.stdlib_root())
    if name == "wikitext2":
        corpus = wikitext2_corpus()
        docs = [Doc(d.path, d.path, d.group, d.text, split) for split, part in (("train", corpus.train),
                                                                                  ("val", corpus.val)) for d in part]
        return sources.InMemory("wikitext2", docs)
    raise DataError(f"--dataset {name}: unknown dataset; choose one of {', '.join(DATASETS)} "
                    "(stdlib is the embedded default), or pass --data PATH")


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def cache_entry(source: Source, settings: Settings, cache_dir: Path, tokenizer: Tokenizer | None = None) -> Path:
    """Where ``source`` prepared with ``settings`` lives in the cache: a folder per source
    and settings, and in it one per state of the source's files (path, size, mtime)."""
    made = ({"given": hashlib.sha256(tokenizer_spec(tokenizer)[1].encode()).hexdigest(), "kind": tokenizer.name}
            if tokenizer is not None else
            {"kind": settings.tokenizer, "vocab": settings.vocab_size if settings.tokenizer == "bpe" else None,
             "sample_mb": settings.tokenizer_sample_mb if settings.tokenizer == "bpe" else None, "bpe": BPE_RECIPE})
    where = {**source.describe(), "path": str(Path(source.root).resolve()) if source.root.exists() else source.kind}
    what = {"source": where, "val_fraction": settings.val_fraction, "tokenizer": made,
            "format": VERSION, "shard_tokens": settings.shard_tokens}
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(source.root)).name or source.kind)[:40]
    return cache_dir / "prepared" / f"{slug}-{_key(what)}" / _key(source.listing())


def _note_older(entry: Path, say: Callable[[str], None]) -> None:
    older = [p for p in entry.parent.iterdir() if p != entry and is_prepared(p)] if entry.parent.is_dir() else []
    if older:
        size = sum(f.stat().st_size for p in older for f in p.iterdir()) / 1e9
        say(f"the source's files changed since it was last prepared; preparing it again (the older copy, "
            f"{size:.1f} GB in {entry.parent}, stays until you delete it)")


def check_flags(corpus: PreparedCorpus, t: TrainConfig) -> None:
    """A prepared directory was made with one tokenizer and split: the flags must agree."""
    m = corpus.manifest
    req = m["tokenizer"]["requested"]
    have = {"tokenizer": req["tokenizer"], "val_fraction": m["split"]["val_fraction"]}
    want = {"tokenizer": t.tokenizer, "val_fraction": t.val_fraction}
    if req["tokenizer"] == "bpe":
        have["vocab_size"], want["vocab_size"] = req["vocab_size"], t.vocab_size
        have["tokenizer_sample_mb"] = m["tokenizer"]["sample"].get("budget_mb", t.tokenizer_sample_mb)
        want["tokenizer_sample_mb"] = t.tokenizer_sample_mb
    wrong = [n for n in have if have[n] != want[n]]
    if wrong:
        def flags(values: dict[str, Any]) -> str:
            return " ".join(f"--{n.replace('_', '-')} {values[n]}" for n in wrong)

        raise DataError(f"--data {t.data}: prepared with {flags(have)}, but this command has {flags(want)}; "
                        f"pass {flags(have)} (or leave them out), or prepare the source again with the flags you want")


def load_prepared(t: TrainConfig, say: Callable[[str], None] = lambda text: None, bar: bool = False,
                  tokenizer: Tokenizer | None = None) -> PreparedCorpus:
    """The prepared corpus a run trains on (see the module's docstring)."""
    if t.data is not None and is_prepared(t.data):
        fix = f"prepare it again (lsnn prepare SOURCE {t.data}, into an empty directory)"
        corpus = open_prepared(t.data, fix, name=str(t.data))
        if tokenizer is None:
            check_flags(corpus, t)
        return corpus
    source = source_of(t)
    label = str(t.data) if t.data is not None else (t.dataset or "stdlib")
    settings = settings_of(t)
    entry = cache_entry(source, settings, default_cache_dir(), tokenizer)
    fix = f"delete {entry} and run again to prepare it anew"
    if not is_prepared(entry):
        _note_older(entry, say)
        say(f"preparing {label} into {entry} (once: later runs map it from there)")
        prepare(source, entry, settings, say, bar, tokenizer, extra={"source_label": label})
    corpus = open_prepared(entry, fix, name=label)
    corpus.display_root = source.display_root()  # names as this command's --data spells the path
    return corpus


def corpus_mismatch(saved: str) -> str:
    """Why a checkpoint's corpus fingerprint is not this run's, for --resume's refusal."""
    if not str(saved).startswith("prepared:"):
        return ("the checkpoint was written by an lsnn that kept its corpus in memory: its data position indexes "
                "that token stream, not these prepared shards; start a new run (another --output-dir, or "
                "--overwrite), or finish this one with the lsnn that started it")
    return "the training text changed since the checkpoint (its prepared corpus' fingerprint differs)"


def progress_bar(progress: str) -> bool:
    """Whether ``--progress`` means a bar for the preparation (on stderr)."""
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


__all__ = ["PreparedCorpus", "ShardTokens", "TaskTokens", "baselines", "corpus_mismatch", "is_prepared",
           "load_prepared", "open_prepared", "task_views"]
