"""Where a corpus' text comes from, read as a stream of documents, in a fixed order.

A source is read in *units*: a few files of a directory, a run of ~16 KB segments of a
single file, a byte range of a JSON Lines file, a row group of a Parquet file, a record
batch of an Arrow file. ``scan()`` reads the whole source once, in order, and yields each
unit with its documents; ``read(unit)`` reads one unit again, anywhere (a worker process
of ``lsnn prepare``), and must give the same documents. So a corpus is read twice, and
neither pass holds more than a unit of its text.

Sources (``open_source``):

- a directory of text files (recursive; hidden names ignored; binary, non-UTF-8 and empty
  files skipped and counted), one domain per top-level directory;
- a single text file, split into ~16 KB segments of whole paragraphs, one domain each;
- JSON Lines files (``.jsonl``), a document per line, its text in ``--text-field``;
- Parquet and Arrow files (``.parquet``, ``.arrow``: what ``datasets.save_to_disk`` writes
  and the Hugging Face caches hold), the text in column ``--text-field`` (needs pyarrow);
- the embedded corpus: the running interpreter's standard library sources;
- documents already in memory (WikiText-2 from the ``datasets`` cache).

This module imports neither torch nor the model, so ``lsnn prepare``'s workers start fast.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_VAL_FRACTION = 0.05
SEGMENT_CHARS = 16 * 1024
"""Target size of the segments a single ``--data`` file is split into."""
UNIT_BYTES = 1 << 20
"""About how much source text one unit holds: a worker's share of work at a time."""
FORMATS: tuple[str, ...] = ("auto", "text", "jsonl", "parquet", "arrow")
"""Values of ``--data-format``; ``auto`` goes by the files' suffixes."""
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
_READ_BLOCK = 4 << 20

# Tests (with their deliberately malformed data files) and installed packages are not the
# standard library's own source.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# The stdlib's ~190 top-level modules (4.7 MB of 12) are chunked, in name order, into
# domains of about this many characters, comparable to a large package such as asyncio.
_TOP_LEVEL_DOMAIN_CHARS = 512 * 1024


class DataError(ValueError):
    """A bad data flag or file. The CLI prints it and exits with code 2, writing nothing."""


@dataclass(frozen=True)
class Doc:
    """One document of a source."""

    key: str
    """What the train/validation split hashes: a relative path, a segment index, file:line."""
    name: str
    """Where a user finds it, relative to the source: a path, ``book.txt#00003``,
    ``a.jsonl:12`` (line 12), ``t.parquet#7`` (row 7, from 0)."""
    domain: str
    """The group continual learning keeps together (a top-level directory, a file)."""
    text: str = field(repr=False)
    split: Literal["train", "val"] | None = None
    """A split the source fixes itself (WikiText-2's); None: by the hash of ``key``."""


# --- the split rule ---------------------------------------------------------------------


def unit_hash(key: str, salt: str = "") -> float:
    """A stable hash of ``key`` in [0, 1): sha256, never Python's per-process ``hash()``."""
    digest = hashlib.sha256((salt + key).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_keys(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The keys held out for validation: those whose hash is below ``val_fraction``.

    Fallback, so that with two or more keys both sides are never empty: if no key hashes
    below the fraction, the key with the smallest hash is held out (the first to join as
    the fraction grows); if every key does, the one with the largest hash trains.
    """
    rule = SplitRule(val_fraction)
    for key in keys:
        rule.see(key)
    return {key for key in keys if rule.is_val(key)}


class SplitRule:
    """``validation_keys`` for a stream of keys: ``see`` every key first (remembering only
    the extremes), then ask ``is_val`` of each."""

    def __init__(self, val_fraction: float):
        check_val_fraction(val_fraction)
        self.fraction = val_fraction
        self.seen = self.below = 0
        self.lowest: tuple[float, str] | None = None
        self.highest: tuple[float, str] | None = None

    def see(self, key: str) -> None:
        score = (unit_hash(key), key)
        self.seen += 1
        self.below += score[0] < self.fraction
        self.lowest = score if self.lowest is None else min(self.lowest, score)
        self.highest = score if self.highest is None else max(self.highest, score)

    def is_val(self, key: str) -> bool:
        if self.seen >= 2 and self.below == 0 and self.lowest is not None and key == self.lowest[1]:
            return True
        if self.seen >= 2 and self.below == self.seen and self.highest is not None and key == self.highest[1]:
            return False
        return unit_hash(key) < self.fraction


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")


# --- reading files ----------------------------------------------------------------------


def decode(data: bytes) -> str | None:
    """The text of a file, or None if it is binary (NUL bytes) or not UTF-8."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e.strerror or e}); fix or remove it") from e


def read_range(path: Path, start: int, stop: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e.strerror or e}); fix or remove it") from e


Listing = list[tuple[str, int, int]]
"""(relative POSIX path, size, mtime_ns) of each file of a source, in path order."""


def walk_files(root: Path, keep_dir: Callable[[str], bool] = lambda d: True,
               keep_file: Callable[[str], bool] = lambda f: True) -> Listing:
    """The files under ``root`` with their sizes and mtimes, hidden names never: one
    ``scandir`` walk, each file stat-ed once (260,000 files are a few seconds)."""
    found = []
    todo = [(root, "")]
    while todo:
        directory, prefix = todo.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if keep_dir(entry.name):
                        todo.append((Path(entry.path), f"{prefix}{entry.name}/"))
                elif entry.is_file() and keep_file(entry.name):
                    st = entry.stat()
                    found.append((prefix + entry.name, st.st_size, st.st_mtime_ns))
    return sorted(found)


def stat_listing(root: Path, names: Sequence[str]) -> Listing:
    """(name, size, mtime_ns) of each file: what a prepared corpus was made from, by metadata."""
    out = []
    for name in names:
        st = (root / name).stat() if name else root.stat()
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def segments(text: str, size: int) -> list[str]:
    """Contiguous pieces of ``text`` of at most ``size`` characters whose concatenation
    is ``text``: cut after the last blank line in reach, else the last newline, else at
    ``size``."""
    pieces = []
    start = 0
    while start < len(text):
        end = _cut(text, start, size, final=True)
        pieces.append(text[start:end])
        start = end
    return pieces


def _cut(text: str, start: int, size: int, final: bool) -> int:
    """Where the segment starting at ``start`` ends; ``final``: no text follows ``text``."""
    end = start + size
    if end >= len(text):
        return len(text) if final else -1  # not final: the cut needs more text
    window = text[start:end]
    blank = window.rfind("\n\n", size // 2)  # only in the second half: no slivers
    if blank >= 0:
        return start + blank + 2
    newline = window.rfind("\n", size // 2)
    return start + newline + 1 if newline >= 0 else end


# --- sources ----------------------------------------------------------------------------


class Source:
    """A corpus read unit by unit. Subclasses set ``kind``, ``root`` and ``what``."""

    kind: str
    root: Path
    """The file or directory given; document names are relative to it (its parent for a file)."""
    what: str
    """How messages name it: ``--data PATH``."""
    skipped: int = 0
    """Files or records left out as binary, not UTF-8, or empty (counted by ``scan``)."""
    doc_unit: str = "records"
    """What a document is, for messages: "files", "segment(s) of up to 16 KB"."""

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        """Every unit, in order, with its documents."""
        raise NotImplementedError

    def read(self, unit: Any) -> list[Doc]:
        """One unit's documents again, exactly as ``scan`` gave them."""
        raise NotImplementedError

    def listing(self) -> Listing:
        """(path, size, mtime_ns) of every file read: the source's identity by metadata."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root)}

    def display_root(self) -> str:
        """What a document's name is joined to so a user can open it ("" for none)."""
        return str(self.root if self.root.is_dir() else self.root.parent)

    def finish(self, documents: int) -> None:
        """Called after ``scan`` with how many documents it found: refuse what is unusable."""
        if documents == 0:
            raise DataError(f"{self.what}: no text in it; pass UTF-8 text")


def _group_by_size(names: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    unit: list[str] = []
    total = 0
    for name in names:
        unit.append(name)
        total += sizes[name]
        if total >= UNIT_BYTES:
            yield unit
            unit, total = [], 0
    if unit:
        yield unit


class TextDirectory(Source):
    """A directory of UTF-8 text files, a document per file."""

    kind = "text-directory"
    doc_unit = "files"

    def __init__(self, root: Path, what: str, files: Listing | None = None,
                 domains: dict[str, str] | None = None):
        self.root, self.what = root, what
        self.files = walk_files(root) if files is None else files
        self.names = [name for name, _, _ in self.files]
        self.domains = domains or {}  # path -> domain, where it is not the first path component

    def listing(self) -> Listing:
        return self.files

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        sizes = {name: size for name, size, _ in self.files}
        for names in _group_by_size(self.names, sizes):
            docs = self._docs(names)
            self.skipped += len(names) - len(docs)
            yield tuple(d.key for d in docs), docs

    def read(self, unit: tuple[str, ...]) -> list[Doc]:
        docs = self._docs(list(unit))
        if len(docs) != len(unit):
            raise DataError(f"{self.what}: a file changed while it was being read ({unit[0]} ...); "
                            "run again on files nothing writes to")
        return docs

    def _docs(self, names: list[str]) -> list[Doc]:
        docs = []
        for name in names:
            text = decode(read_bytes(self.root / name, self.what))
            if text is not None and text.strip():
                docs.append(Doc(name, name, self.domains.get(name) or name.split("/", 1)[0], text))
        return docs

    def finish(self, documents: int) -> None:
        if documents == 0:
            raise DataError(
                f"{self.what}: no text files in the directory ({self.skipped} skipped as binary, not UTF-8 "
                "or empty; hidden files are ignored); pass a directory of UTF-8 text files")
        if documents == 1:
            only = next(n for n in self.names if decode(read_bytes(self.root / n, self.what)))
            raise DataError(
                f"{self.what}: one text file is too small to hold out a validation split by file; "
                f"give more text, or pass the file itself ({self.root / only}) to split it by segment")


class StdlibSource(TextDirectory):
    """The running interpreter's standard library ``.py`` sources (~12 MB, ~730 files).

    Test packages, site-/dist-packages, ``__pycache__`` and the build's generated config
    (``config-*/``, ``_sysconfigdata*``) are left out, and so are files that are not
    UTF-8. Domains: each package (the first path component), plus the top-level modules
    chunked in name order into domains of about 512 K characters.
    """

    kind = "stdlib"

    def __init__(self, root: Path):
        files = walk_files(root, keep_dir=lambda d: d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"),
                           keep_file=lambda f: f.endswith(".py") and not f.startswith("_sysconfigdata"))
        super().__init__(root, "--dataset stdlib", files)

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        # the top-level modules' domains need all their sizes first (4.7 MB): read them here,
        # not in __init__, so that finding a prepared copy in the cache reads no text at all
        top = {}
        for name in (n for n in self.names if "/" not in n):
            text = decode(read_bytes(self.root / name, self.what))
            if text is not None and text.strip():
                top[name] = len(text)
        self.domains = top_level_domains(top)
        yield from super().scan()

    def display_root(self) -> str:
        return ""  # document names of the embedded corpus, as they always were

    def finish(self, documents: int) -> None:
        if documents == 0:
            raise DataError(f"--dataset stdlib: no Python sources under {self.root}; "
                            "this interpreter ships without its standard library sources, pass --data")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_level_domains(sizes: dict[str, int]) -> dict[str, str]:
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


class TextFile(Source):
    """One UTF-8 text file, split into segments of up to ``SEGMENT_CHARS`` characters of
    whole paragraphs, read a block at a time (the file never whole in memory)."""

    kind = "text-file"
    doc_unit = f"segment(s) of up to {SEGMENT_CHARS // 1024} KB"
    per_unit = 64  # segments, about 1 MB

    def __init__(self, path: Path, what: str):
        self.root, self.what = path, what
        self.found_text = False

    def listing(self) -> Listing:
        return stat_listing(self.root, [""])

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        index, offset = 0, 0
        pending: list[str] = []
        for piece in self._pieces():
            pending.append(piece)
            if len(pending) == self.per_unit:
                unit = self._unit(index, offset, pending)
                yield unit
                index, offset, pending = index + len(pending), offset + sum(unit[0][2]), []
        if pending:
            yield self._unit(index, offset, pending)

    def _unit(self, index: int, offset: int, pieces: list[str]) -> tuple[Any, list[Doc]]:
        lengths = tuple(len(p.encode("utf-8")) for p in pieces)  # a segment is cut between characters
        return (index, offset, lengths), [self._doc(index + i, p) for i, p in enumerate(pieces)]

    def _doc(self, index: int, text: str) -> Doc:
        name = f"{self.root.name}#{index:05d}"
        return Doc(str(index), name, name, text)

    def read(self, unit: tuple[int, int, tuple[int, ...]]) -> list[Doc]:
        index, offset, lengths = unit
        data = read_range(self.root, offset, offset + sum(lengths), self.what)
        docs, at = [], 0
        for i, n in enumerate(lengths):
            docs.append(self._doc(index + i, data[at:at + n].decode("utf-8")))
            at += n
        return docs

    def _pieces(self) -> Iterator[str]:
        """The segments of the file, as ``segments(whole_text)`` would cut them."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        buf, start = "", 0
        try:
            f = open(self.root, "rb")
        except OSError as e:
            raise DataError(f"{self.what}: cannot read {self.root} ({e.strerror or e}); fix or remove it") from e
        with f:
            while block := f.read(_READ_BLOCK):
                buf = buf[start:] + self._decode(decoder, block)
                start = 0
                while (end := _cut(buf, start, SEGMENT_CHARS, final=False)) >= 0:
                    yield buf[start:end]
                    start = end
            buf = buf[start:] + self._decode(decoder, b"", final=True)
        yield from segments(buf, SEGMENT_CHARS)

    def _decode(self, decoder: codecs.IncrementalDecoder, block: bytes, final: bool = False) -> str:
        try:
            text = decoder.decode(block, final)
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise DataError(f"{self.what}: the file is binary or not UTF-8 text; pass a UTF-8 text file")
        self.found_text = self.found_text or bool(text.strip())
        return text

    def finish(self, documents: int) -> None:
        if not self.found_text:
            raise DataError(f"{self.what}: the file is empty; pass a file with text in it")


def _field_text(record: Any, text_field: str, where: str) -> str | None:
    """The text of a JSON record, None if empty; a DataError naming the record if unusable."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON object per line is needed, found {type(record).__name__}; fix the line")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); pass --text-field with the field "
                        "that holds the text")
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text; pass --text-field "
                        "with the field that holds the text")
    return text if text.strip() else None


class JsonLines(Source):
    """``.jsonl`` files (one, or every one under a directory): a document per line, its
    text in ``text_field``. Blank lines are ignored; records whose text is empty or null
    are skipped and counted. Domains: one per file (per top-level directory in a tree)."""

    kind = "jsonl"

    def __init__(self, root: Path, what: str, text_field: str, files: Listing):
        self.root, self.what, self.text_field, self.files = root, what, text_field, files
        self.names = [name for name, _, _ in files]

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def _label(self, name: str) -> str:
        return name or self.root.name

    def listing(self) -> Listing:
        return self.files

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "text_field": self.text_field, "files": len(self.names)}

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        for name in self.names:
            try:
                f = open(self._path(name), "rb")
            except OSError as e:
                raise DataError(f"{self.what}: cannot read {self._path(name)} ({e.strerror or e}); fix or remove it") \
                    from e
            with f:
                yield from self._scan_file(name, f)

    def _scan_file(self, name: str, f) -> Iterator[tuple[Any, list[Doc]]]:
        start = offset = 0
        first = line = 1
        lines: list[bytes] = []
        for raw in f:
            lines.append(raw)
            offset += len(raw)
            line += 1
            if offset - start >= UNIT_BYTES:
                yield (name, start, offset, first), self._docs(name, first, lines)
                start, first, lines = offset, line, []
        if lines:
            yield (name, start, offset, first), self._docs(name, first, lines)

    def read(self, unit: tuple[str, int, int, int]) -> list[Doc]:
        name, start, stop, first = unit
        data = read_range(self._path(name), start, stop, self.what)
        lines = [line + b"\n" for line in data.split(b"\n")]  # as iterating the file splits: on \n only
        lines[-1] = lines[-1][:-1]
        return self._docs(name, first, lines if lines[-1] else lines[:-1], count=False)

    def _docs(self, name: str, first: int, lines: list[bytes], count: bool = True) -> list[Doc]:
        docs = []
        label = self._label(name)
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            where = f"{self.what}: {self._path(name)}, line {first + i}"
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{where} is not valid JSON ({e}); fix or remove the line") from e
            text = _field_text(record, self.text_field, where)
            if text is None:
                self.skipped += count
                continue
            key = f"{label}:{first + i}"
            docs.append(Doc(key, key, label.split("/", 1)[0], text))
        return docs


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError(f"{what}: reading Parquet and Arrow files needs pyarrow: pip install 'lsnn[parquet]'") from e
    return pyarrow


class Tables(Source):
    """Parquet (``.parquet``) and Arrow IPC (``.arrow``, file or stream format) files: a
    document per row, its text in column ``text_field``; null or empty texts are skipped
    and counted. A unit is a row group (Parquet) or a record batch (Arrow)."""

    kind = "tables"

    def __init__(self, root: Path, what: str, text_field: str, files: Listing):
        self.root, self.what, self.text_field, self.files = root, what, text_field, files
        self.names = [name for name, _, _ in files]
        self.pa = _pyarrow(what)

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def listing(self) -> Listing:
        return self.files

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "text_field": self.text_field, "files": len(self.names)}

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        for name in self.names:
            row = 0
            for part, column in enumerate(self._parts(name)):
                texts = column.to_pylist()
                docs = self._docs(name, row, texts)
                self.skipped += len(texts) - len(docs)
                yield (name, part, row), docs
                row += len(texts)

    def read(self, unit: tuple[str, int, int]) -> list[Doc]:
        name, part, row = unit
        return self._docs(name, row, self._part(name, part).to_pylist())

    def _docs(self, name: str, row: int, texts: list[Any]) -> list[Doc]:
        label = name or self.root.name
        docs = []
        for i, text in enumerate(texts):
            if text is not None and text.strip():
                key = f"{label}#{row + i}"
                docs.append(Doc(key, key, label.split("/", 1)[0], text))
        return docs

    def _suffix(self, name: str) -> str:
        return _TABLE_SUFFIXES[self._path(name).suffix.lower()]

    def _parts(self, name: str) -> Iterator[Any]:
        """The text column of each row group or record batch of a file, in order."""
        if self._suffix(name) == "parquet":
            pf = self._parquet(name)
            for group in range(pf.num_row_groups):
                yield self._column(pf.read_row_group(group, columns=[self.text_field]), name)
        else:
            for batch in self._arrow_batches(name):
                yield self._column(batch, name)

    def _part(self, name: str, part: int) -> Any:
        if self._suffix(name) == "parquet":
            return self._column(self._parquet(name).read_row_group(part, columns=[self.text_field]), name)
        for i, batch in enumerate(self._arrow_batches(name)):
            if i == part:
                return self._column(batch, name)
        raise DataError(f"{self.what}: {self._path(name)} has fewer record batches than when it was scanned; "
                        "run again on files nothing writes to")

    def _parquet(self, name: str) -> Any:
        path = self._path(name)
        try:
            pf = self.pa.parquet.ParquetFile(path, memory_map=True)
        except (OSError, self.pa.ArrowException) as e:
            raise DataError(f"{self.what}: cannot read {path} as Parquet ({e}); fix or remove it") from e
        self._check_field(pf.schema_arrow.names, path)
        return pf

    def _arrow_batches(self, name: str) -> Iterator[Any]:
        """Record batches of an Arrow IPC file: the file format (a footer indexes them)
        or the stream format ``datasets`` writes; memory-mapped, so nothing is copied."""
        path = self._path(name)
        try:
            source = self.pa.memory_map(str(path))
            if source.read(6) == b"ARROW1":
                reader = self.pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                source.seek(0)
                reader = self.pa.ipc.open_stream(source)
                batches = iter(reader)
            self._check_field(reader.schema.names, path)
            yield from batches
        except (OSError, self.pa.ArrowException) as e:
            raise DataError(f"{self.what}: cannot read {path} as Arrow ({e}); fix or remove it") from e

    def _check_field(self, names: list[str], path: Path) -> None:
        if self.text_field not in names:
            raise DataError(f"{self.what}: {path} has no column {self.text_field!r} (columns: "
                            f"{', '.join(names[:8])}); pass --text-field with the column that holds the text")

    def _column(self, table: Any, name: str) -> Any:
        column = table.column(self.text_field)
        kind = column.type
        if not (self.pa.types.is_string(kind) or self.pa.types.is_large_string(kind)):
            raise DataError(f"{self.what}: column {self.text_field!r} of {self._path(name)} holds {kind}, not text; "
                            "pass --text-field with the column that holds the text")
        return column


class InMemory(Source):
    """Documents already in memory (a small named dataset), in units of ~1 MB."""

    kind = "in-memory"

    def __init__(self, name: str, docs: list[Doc]):
        self.root, self.what, self.docs = Path(name), f"--dataset {name}", docs

    def listing(self) -> Listing:
        h = hashlib.sha256()  # no files to stat: the text is what it is
        for d in self.docs:
            h.update(json.dumps([d.key, d.domain, d.split, d.text]).encode("utf-8", "surrogatepass"))
        return [(h.hexdigest(), len(self.docs), 0)]

    def display_root(self) -> str:
        return ""

    def scan(self) -> Iterator[tuple[Any, list[Doc]]]:
        unit: list[Doc] = []
        size = 0
        for doc in self.docs:
            unit.append(doc)
            size += len(doc.text)
            if size >= UNIT_BYTES:
                yield tuple(unit), unit
                unit, size = [], 0
        if unit:
            yield tuple(unit), unit

    def read(self, unit: tuple[Doc, ...]) -> list[Doc]:
        return list(unit)


# --- choosing a source -------------------------------------------------------------------


def _kind_of(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    return _TABLE_SUFFIXES.get(suffix, "text")


def _directory_kind(files: Listing, data_format: str) -> str:
    """``--data-format auto`` for a directory: the kind of file holding most of its bytes
    (tables and their .json metadata as ``datasets`` writes them, JSON Lines, or text)."""
    if data_format != "auto":
        return "tables" if data_format in ("parquet", "arrow") else data_format
    sizes: dict[str, int] = {}
    for name, size, _ in files:
        kind = _kind_of(name)
        kind = "tables" if kind in ("parquet", "arrow") else kind
        sizes[kind] = sizes.get(kind, 0) + size
    return max(sizes, key=lambda k: (sizes[k], k)) if sizes else "text"


def open_source(path: str | Path, data_format: str = "auto", text_field: str = "text") -> Source:
    """``--data PATH`` as a source: a file by its suffix, a directory by the kind of file
    that holds most of its bytes; ``data_format`` overrides the guess."""
    root, what = Path(path), f"--data {path}"
    if data_format not in FORMATS:
        raise DataError(f"--data-format {data_format}: choose one of {', '.join(FORMATS)}")
    if not root.exists():
        raise DataError(f"{what}: no such file or directory; pass a text file or a directory of text files")
    if not root.is_dir():
        kind = _kind_of(root.name) if data_format == "auto" else data_format
        if kind == "text":
            return TextFile(root, what)
        if kind == "jsonl":
            return JsonLines(root, what, text_field, stat_listing(root, [""]))
        return Tables(root, what, text_field, stat_listing(root, [""]))
    files = walk_files(root)
    kind = _directory_kind(files, data_format)
    if kind == "text":
        return TextDirectory(root, what, files)
    wanted = {"jsonl": _JSONL_SUFFIXES, "tables": tuple(_TABLE_SUFFIXES)}[kind]
    chosen = [f for f in files if Path(f[0]).suffix.lower() in wanted]
    if not chosen:
        raise DataError(f"{what}: --data-format {data_format} but the directory holds no {' or '.join(wanted)} "
                        "files; pass another --data-format")
    if kind == "jsonl":
        return JsonLines(root, what, text_field, chosen)
    return Tables(root, what, text_field, chosen)
