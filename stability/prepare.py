"""``lsnn prepare``: a corpus tokenised once into token shards on disk.

Two streaming passes over the source (``stability.sources``), neither holding more than a
unit of text per process:

1. *scan* (this process): every document's split key, the units to encode, and the
   tokenizer's training sample: the documents of lowest sample hash whose text fits in
   ``--tokenizer-sample-mb``, a deterministic choice that does not depend on the order the
   documents come in. The BPE is trained on the training documents of that sample.
2. *encode* (``--workers`` processes, every core by default): each worker reads a unit
   again, encodes it, and hands back its tokens; this process writes them, in order, to
   the split's shards.

A prepared directory holds:

    manifest.json       format, source, tokenizer (and its sample), split, shards, domains,
                        every file's size, mtime and sha256, and the corpus fingerprint
    tokenizer.json      the tokenizer (``stability.tokenizers.save_tokenizer``)
    train-00000.bin ... the training split's token stream, uint16 (uint32 for vocabularies
                        over 65536), each document followed by end-of-text, cut into shards
                        of ``shard_tokens`` tokens (a document may span two)
    train.docs.npy      one row per document, and a last one closing the stream: its first
                        token, its length in characters, where its name starts in
                        train.names, its domain (an index into the manifest's list)
    train.names         the documents' names (UTF-8, back to back)
    val-*.bin, val.docs.npy, val.names: the same for the validation split

It is written into a temporary directory beside ``out`` and renamed into place, so it is
never seen half-written. This module imports no torch: its workers start in a fraction
of a second.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stability.atomic import TMP_MARK, atomic_write, fsync_dir
from stability.sources import DataError, Doc, Source, SplitRule, unit_hash
from stability.tokenizers import (
    BPE_RECIPE,
    EOS,
    TOKENIZERS,
    BPETokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_spec,
    tokenizer_spec,
    train_bpe,
)

FORMAT, VERSION = "lsnn-prepared", 1
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 28
"""Tokens per shard file: 512 MB of uint16."""
DOC_DTYPE = np.dtype([("start", "<i8"), ("chars", "<i8"), ("name", "<i8"), ("domain", "<i4")])
SPLITS = ("train", "val")
DEFAULT_SAMPLE_MB = 64
_SAMPLE_SALT = "tokenizer-sample:"  # independent of the split's hash


@dataclass(frozen=True)
class Settings:
    """How a source is prepared: the flags of ``lsnn prepare`` (and of ``lsnn train``)."""

    tokenizer: str = "bpe"
    vocab_size: int = 8192
    tokenizer_sample_mb: int = DEFAULT_SAMPLE_MB
    val_fraction: float = 0.05
    workers: int = 0
    """Encoding processes; 0: one per core this process may use."""
    shard_tokens: int = SHARD_TOKENS

    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- progress -------------------------------------------------------------------------------


class Progress:
    """Bytes of text, tokens, rate and ETA: a tqdm bar on a terminal, else a line every 10 s."""

    def __init__(self, label: str, total: int | None, say: Callable[[str], None], bar: bool):
        self.label, self.total, self.say = label, total, say
        self.done = self.tokens = 0
        self.started = self.shown = time.monotonic()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def update(self, nbytes: int, tokens: int = 0) -> None:
        self.done += nbytes
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            if tokens:
                self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f} M tokens", refresh=False)
            return
        now = time.monotonic()
        if now - self.shown >= 10:
            self.shown = now
            self.say(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done / 1e6:,.0f}"
        if self.total:
            eta = (self.total - self.done) / rate if rate else 0
            text += f" of {self.total / 1e6:,.0f} MB, ETA {eta:.0f}s"
        else:
            text += " MB"
        tokens = f", {self.tokens / 1e6:,.1f} M tokens" if self.tokens else ""
        return f"{text}{tokens}, {rate / 1e6:.1f} MB/s"

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.started


# --- pass 1: scan -----------------------------------------------------------------------------


class Sample:
    """The documents of lowest sample hash whose text fits in ``budget`` characters:
    a bounded, uniform, order-independent choice (the set is the same whatever order the
    documents are offered in)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.heap: list[tuple[float, int, Doc]] = []  # (-hash, index, doc): the largest hash on top
        self.chars = 0
        self.cutoff = 1.0  # every document hashed at or above it has been let go

    def offer(self, index: int, doc: Doc) -> None:
        score = unit_hash(doc.key, _SAMPLE_SALT)
        if score >= self.cutoff:
            return
        heapq.heappush(self.heap, (-score, index, doc))
        self.chars += len(doc.text)
        while self.chars > self.budget:
            neg, _, dropped = heapq.heappop(self.heap)
            self.chars -= len(dropped.text)
            self.cutoff = -neg

    def docs(self) -> list[Doc]:
        """The sample in the source's order."""
        return [doc for _, _, doc in sorted(self.heap, key=lambda item: item[1])]


@dataclass
class Scan:
    units: list[tuple[Any, int, int]]  # (unit, documents, characters)
    rule: SplitRule
    forced: dict[str, int]  # documents a source put in a split itself, per split
    documents: int
    chars: int
    sample: Sample

    def counts(self) -> dict[str, int]:
        """Documents per split, the split rule's fallback applied."""
        by_rule = self.rule.seen
        val = self.rule.below
        if by_rule >= 2 and val == 0:
            val = 1
        elif by_rule >= 2 and val == by_rule:
            val -= 1
        return {"train": by_rule - val + self.forced["train"], "val": val + self.forced["val"]}


def scan(source: Source, settings: Settings, progress: Progress) -> Scan:
    """Pass 1: read every document once, keeping no text but the sample's."""
    rule = SplitRule(settings.val_fraction)
    sample = Sample(settings.tokenizer_sample_mb * 10**6)
    forced = {"train": 0, "val": 0}
    units: list[tuple[Any, int, int]] = []
    n = chars = 0
    for unit, docs in source.scan():
        for doc in docs:
            if doc.split is None:
                rule.see(doc.key)
            else:
                forced[doc.split] += 1
            if settings.tokenizer == "bpe":
                sample.offer(n, doc)
            n += 1
        size = sum(len(d.text) for d in docs)
        units.append((unit, len(docs), size))
        chars += size
        progress.update(size)
    source.finish(n)
    result = Scan(units, rule, forced, n, chars, sample)
    counts = result.counts()
    if not counts["train"] or not counts["val"]:
        raise DataError(f"{source.what}: {n} {source.doc_unit} of text is too small to hold out a validation "
                        "split; give more text")
    return result


def is_val(doc_split: str | None, key: str, rule: SplitRule) -> bool:
    return doc_split == "val" if doc_split is not None else rule.is_val(key)


# --- the tokenizer ------------------------------------------------------------------------------


def check_tokenizer(settings: Settings) -> None:
    """Refuse a tokenizer that cannot be built, before minutes of scanning."""
    if settings.tokenizer not in TOKENIZERS:
        raise DataError(f"--tokenizer {settings.tokenizer}: unknown tokenizer; choose one of {', '.join(TOKENIZERS)}")
    if settings.tokenizer == "bpe" and settings.vocab_size < 257:
        raise DataError(f"--vocab-size {settings.vocab_size}: byte-level BPE needs at least 257 tokens "
                        f"(256 bytes + {EOS}); raise --vocab-size")
    if settings.tokenizer == "bpe" and settings.tokenizer_sample_mb < 1:
        raise DataError(f"--tokenizer-sample-mb {settings.tokenizer_sample_mb}: must be a positive integer")
    if settings.tokenizer != "bpe":
        load_tokenizer(settings.tokenizer, None)  # tiktoken's files must be cached


def build_tokenizer(settings: Settings, found: Scan, say: Callable[[str], None]) -> tuple[Tokenizer, dict]:
    """The tokenizer and, for BPE, what it was trained on (recorded in the manifest)."""
    if settings.tokenizer != "bpe":
        return load_tokenizer(settings.tokenizer, None), {}
    texts = [d.text for d in found.sample.docs() if not is_val(d.split, d.key, found.rule)]
    chars = sum(len(t) for t in texts)
    say(f"training the bpe tokenizer ({settings.vocab_size} tokens) on {len(texts)} training documents "
        f"({chars / 1e6:.1f} M characters)")
    started = time.monotonic()
    tok = BPETokenizer(train_bpe(texts, settings.vocab_size), Path("tokenizer.json"), from_cache=False)
    sample = {"documents": len(texts), "chars": chars, "budget_mb": settings.tokenizer_sample_mb,
              "of_documents": found.documents, "of_chars": found.chars, "recipe": BPE_RECIPE,
              "rule": "the documents of lowest sha256('tokenizer-sample:' + key) whose text fits in the budget, "
                      "less the validation documents", "seconds": round(time.monotonic() - started, 1)}
    return tok, sample


# --- pass 2: encode, in worker processes ---------------------------------------------------------


@dataclass
class Encoded:
    """One unit, encoded: its documents' tokens back to back, each ending in end-of-text."""

    tokens: np.ndarray  # (n,) uint16 or uint32
    lengths: np.ndarray  # (docs,) int64, tokens per document with its end-of-text
    chars: np.ndarray  # (docs,) int64
    keys: list[str]
    names: list[str]
    domains: list[str]
    splits: list[str | None]


_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, spec: tuple[str, str], dtype: str) -> None:
    # one process per core: the Rust tokenizer's own thread pool would only oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER.update(source=source, tokenizer=tokenizer_from_spec(spec), dtype=np.dtype(dtype))


def _encode_unit(unit: Any) -> Encoded:
    return encode(_WORKER["source"].read(unit), _WORKER["tokenizer"], _WORKER["dtype"])


def encode(docs: list[Doc], tokenizer: Tokenizer, dtype: np.dtype) -> Encoded:
    ids = tokenizer.encode_batch([d.text for d in docs])
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
    tokens = np.empty(int(lengths.sum()), dtype)
    at = 0
    for x in ids:
        tokens[at:at + len(x)] = x
        tokens[at + len(x)] = tokenizer.eos_id
        at += len(x) + 1
    chars = np.fromiter((len(d.text) for d in docs), np.int64, len(docs))
    return Encoded(tokens, lengths, chars, [d.key for d in docs], [d.name for d in docs], [d.domain for d in docs],
                   [d.split for d in docs])


def _in_order(pool: ProcessPoolExecutor, units: Iterable[Any], ahead: int) -> Iterator[Encoded]:
    """Encode ``units`` in the pool, results in order, at most ``ahead`` in flight (so a
    slow unit cannot make results pile up without bound)."""
    queue: deque[Future] = deque()
    todo = iter(units)
    for unit in itertools.islice(todo, ahead):
        queue.append(pool.submit(_encode_unit, unit))
    while queue:
        result = queue.popleft().result()
        for unit in itertools.islice(todo, 1):
            queue.append(pool.submit(_encode_unit, unit))
        yield result


def encoded_units(source: Source, tokenizer: Tokenizer, units: list[Any], workers: int,
                  dtype: np.dtype) -> Iterator[Encoded]:
    """Pass 2's results in the source's order: in this process for one unit or one worker,
    else in a pool of ``workers`` spawned processes."""
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            yield encode(source.read(unit), tokenizer, dtype)
        return
    # fork, as torch's DataLoader does: a spawned worker would import the `lsnn` script's
    # module, torch and the model with it (3 s each); a forked one starts at once. The
    # workers touch neither torch nor the parent's thread pools: the Rust tokenizer's is
    # turned off in them, through the environment they are forked with.
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(source, tokenizer_spec(tokenizer), dtype.str))
    try:
        results = _in_order(pool, units, 2 * workers)
        first = next(results)  # every worker has been started by now
        _restore_env("TOKENIZERS_PARALLELISM", saved)
        yield first
        yield from results
    finally:
        _restore_env("TOKENIZERS_PARALLELISM", saved)
        pool.shutdown(wait=True, cancel_futures=True)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# --- writing ----------------------------------------------------------------------------------------


class SplitWriter:
    """One split's shards, document rows and names, written as the documents come."""

    def __init__(self, directory: Path, split: str, documents: int, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[tuple[str, str]] = []  # (file, sha256)
        self.tokens = self.in_shard = self.docs_written = 0
        self.file: BinaryIO | None = None
        self.hash = hashlib.sha256()
        self.rows = np.lib.format.open_memmap(directory / f"{split}.docs.npy", "w+", DOC_DTYPE, (documents + 1,))
        self.names = open(directory / f"{split}.names", "wb")
        self.name_bytes = 0

    def write_tokens(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self.in_shard)
            data = tokens[:take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.in_shard += take
            self.tokens += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file, self.hash, self.in_shard = open(self.directory / name, "wb"), hashlib.sha256(), 0
        self.shards.append((name, ""))

    def _close_shard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.shards[-1] = (self.shards[-1][0], self.hash.hexdigest())
            self.file = None

    def write_docs(self, lengths: np.ndarray, chars: np.ndarray, names: list[str], domains: np.ndarray) -> None:
        n, at = len(lengths), self.docs_written
        if at + n >= len(self.rows):
            raise DataError("the source changed while it was being prepared (more documents than the scan "
                            "found); prepare it again from files nothing writes to")
        encoded = [name.encode("utf-8", "surrogatepass") for name in names]
        rows = self.rows[at:at + n]
        rows["start"] = self.tokens - np.cumsum(lengths[::-1])[::-1]  # called after their tokens
        rows["chars"] = chars
        rows["name"] = self.name_bytes + np.cumsum([0] + [len(b) for b in encoded[:-1]])
        rows["domain"] = domains
        self.names.write(b"".join(encoded))
        self.name_bytes += sum(len(b) for b in encoded)
        self.docs_written += n

    def close(self) -> dict[str, Any]:
        self._close_shard()
        self.names.close()
        if self.docs_written != len(self.rows) - 1:
            raise DataError("the source changed while it was being prepared (fewer documents than the scan "
                            "found); prepare it again from files nothing writes to")
        self.rows[-1] = (self.tokens, 0, self.name_bytes, -1)
        self.rows.flush()
        del self.rows
        return {"documents": self.docs_written, "tokens": self.tokens, "shards": [f for f, _ in self.shards]}


def write_unit(writers: dict[str, SplitWriter], enc: Encoded, rule: SplitRule, domain_ids: dict[str, int]) -> None:
    """Route a unit's documents to their splits, keeping their order."""
    val = np.array([is_val(s, k, rule) for s, k in zip(enc.splits, enc.keys, strict=True)], dtype=bool)
    ends = np.cumsum(enc.lengths)
    starts = ends - enc.lengths
    domains = np.array([domain_ids.setdefault(d, len(domain_ids)) for d in enc.domains], dtype=np.int32)
    for split, chosen in (("train", ~val), ("val", val)):
        idx = np.flatnonzero(chosen)
        if not len(idx):
            continue
        w = writers[split]
        if len(idx) == len(val):
            w.write_tokens(enc.tokens)
        else:
            w.write_tokens(np.concatenate([enc.tokens[starts[i]:ends[i]] for i in idx]))
        w.write_docs(enc.lengths[idx], enc.chars[idx], [enc.names[i] for i in idx], domains[idx])


def file_record(path: Path, sha256: str | None = None) -> dict[str, Any]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fingerprint(manifest: dict[str, Any]) -> str:
    """What the training data is, exactly: the format, the tokenizer, the split and every
    file's content hash (names and mtimes aside, so a copy has the same fingerprint)."""
    identity = {"format": manifest["format"], "version": manifest["version"], "dtype": manifest["dtype"],
                "val_fraction": manifest["split"]["val_fraction"], "domains": manifest["domains"],
                "splits": manifest["splits"],
                "files": {name: rec["sha256"] for name, rec in sorted(manifest["files"].items())}}
    return "prepared:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --- the whole preparation -----------------------------------------------------------------------


def prepare(source: Source, out: Path, settings: Settings, say: Callable[[str], None] = lambda text: None,
            bar: bool = False, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Prepare ``source`` into the directory ``out`` (which must not exist); returns ``out``.
    ``tokenizer``: use this one instead of building one (``lsnn eval`` with a run's own)."""
    if tokenizer is None:
        check_tokenizer(settings)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{TMP_MARK}{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared corpus from its other users
    try:
        manifest = _prepare_into(source, tmp, settings, say, bar, tokenizer)
        manifest.update(extra or {})
        manifest["fingerprint"] = fingerprint(manifest)
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _publish(tmp, out, say)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary: out is renamed away from it
    return out


def _publish(tmp: Path, out: Path, say: Callable[[str], None]) -> None:
    """Rename the finished directory into place: it appears whole or not at all. If another
    process finished the same preparation first, its copy stands."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if not (out / MANIFEST).exists():
            raise
        say(f"{out} was prepared by another process meanwhile ({e.strerror}); using it")
        return
    fsync_dir(out.parent)


def _prepare_into(source: Source, directory: Path, settings: Settings, say: Callable[[str], None], bar: bool,
                  given: Tokenizer | None) -> dict[str, Any]:
    listing = source.listing()
    total = sum(size for _, size, _ in listing) if source.kind not in ("tables", "in-memory") else None
    progress = Progress(f"scanning {source.what}", total, say, bar)
    found = scan(source, settings, progress)
    scanned = progress.close()
    tokenizer, sample = (given, {"given": True}) if given is not None else build_tokenizer(settings, found, say)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = found.counts()
    writers = {s: SplitWriter(directory, s, counts[s], dtype, settings.shard_tokens) for s in SPLITS}
    domain_ids: dict[str, int] = {}
    workers = settings.worker_count()
    progress = Progress(f"encoding {source.what} ({workers} workers)", found.chars, say, bar)
    for enc, (_, docs, size) in zip(encoded_units(source, tokenizer, [u for u, _, _ in found.units], workers, dtype),
                                    found.units, strict=True):
        if len(enc.keys) != docs:
            raise DataError(f"{source.what}: a unit changed while it was being prepared ({docs} documents when "
                            f"scanned, {len(enc.keys)} now); prepare it again from files nothing writes to")
        write_unit(writers, enc, found.rule, domain_ids)
        progress.update(size, len(enc.tokens))
    encoded = progress.close()
    splits = {s: w.close() for s, w in writers.items()}
    save_tokenizer(tokenizer, directory)
    files = {name: file_record(directory / name, sha) for w in writers.values() for name, sha in w.shards}
    for name in [f"{s}.{suffix}" for s in SPLITS for suffix in ("docs.npy", "names")] + ["tokenizer.json"]:
        files[name] = file_record(directory / name)
    tokens = sum(s["tokens"] for s in splits.values())
    say(f"prepared {found.documents:,} documents ({found.chars / 1e6:,.1f} M characters) into {tokens / 1e6:,.1f} M "
        f"tokens in {scanned + encoded:.0f}s ({found.chars / 1e6 / max(encoded, 1e-9):.1f} MB/s encoding)")
    return {
        "format": FORMAT, "version": VERSION,
        "source": {**source.describe(), "display_root": source.display_root(), "skipped": source.skipped,
                   "documents": found.documents, "chars": found.chars},
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id, "requested": {"tokenizer": settings.tokenizer,
                                                                "vocab_size": settings.vocab_size},
                      "sample": sample},
        "split": {"val_fraction": settings.val_fraction,
                  "rule": "a document is validation when sha256(key) maps below val_fraction"},
        "dtype": dtype.name, "shard_tokens": settings.shard_tokens, "splits": splits,
        "domains": sorted(domain_ids, key=domain_ids.__getitem__),
        "files": files,
        "timing": {"scan_s": round(scanned, 2), "encode_s": round(encoded, 2), "workers": workers},
    }


def remove_abandoned(directory: Path) -> None:
    """Delete the temporary directories of preparations whose process is gone."""
    for path in directory.glob(f".*{TMP_MARK}*"):
        pid = path.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
