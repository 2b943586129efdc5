"""Tokenizers behind one small interface: byte-level BPE (default), bytes, tiktoken's.

``--tokenizer bpe`` trains a byte-level BPE with the Rust ``tokenizers`` library on the
corpus' TRAINING split only: training runs give it a bounded sample of that split
(``stability.prepare``) and keep it in the prepared corpus; ``bpe_tokenizer`` trains one on
an in-memory corpus and caches it on disk under the corpus fingerprint. ``gpt2`` and ``o200k`` need tiktoken and its
encoding files already in tiktoken's cache: the cache is checked before tiktoken is
called, so nothing here ever reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from stability.atomic import atomic_write
from stability.sources import DataError

if TYPE_CHECKING:  # this module imports no torch: lsnn prepare's workers load it
    import tiktoken
    import tokenizers
    import torch

    from stability.data import Corpus, Document

TOKENIZERS: tuple[str, ...] = ("bpe", "byte", "gpt2", "o200k")
"""Kinds accepted by ``--tokenizer``; ``bpe`` is the default."""
DEFAULT_VOCAB_SIZE = 8192
ENCODE_CHUNK_DOCS = 64
"""Documents per ``encode_batch`` call: bounds the tokenizer's per-call memory."""
EOS = "<|endoftext|>"
BPE_RECIPE = "bytelevel-v1"
"""Part of the cache key: change it when the training recipe below changes."""

# What tiktoken_ext/openai_public.py reads through tiktoken.load.read_file_cached, which
# caches a blob at <cache dir>/sha1(url) and re-downloads it if its sha256 differs.
_TIKTOKEN_FILES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "gpt2": (
        "gpt2",
        (
            (
                "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            ),
            (
                "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            ),
        ),
    ),
    "o200k": (
        "o200k_base",
        (
            (
                "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            ),
        ),
    ),
}


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer needs of a tokenizer."""

    name: str
    vocab_size: int
    """Every id is below it; the model's embedding has this many rows."""
    eos_id: int
    """Separates documents in a token stream."""
    pad_id: int
    """Fills the inputs of validation's last partial window (its targets are masked)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, no training. ``vocab_size`` is 256 whatever ``--vocab-size``
    says (the caller decides whether that is an error). eos and pad are 0: NUL never
    occurs in text this project accepts (files with NUL bytes are skipped as binary)."""

    name = "byte"
    vocab_size = 256
    eos_id = 0
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")


class BPETokenizer:
    """A trained ``tokenizers.Tokenizer`` and the cache file ``path`` it was written to or,
    when ``from_cache``, loaded from. ``vocab_size`` is the trained size: at most the
    ``--vocab-size`` asked for, fewer when the corpus runs out of merges."""

    def __init__(self, tok: tokenizers.Tokenizer, path: Path, from_cache: bool) -> None:
        # Text that happens to contain "<|endoftext|>" is text: it must not become the
        # document separator, and decode(encode(x)) must give x back.
        tok.encode_special_tokens = True
        self.tok = tok
        self.name = "bpe"
        self.vocab_size = tok.get_vocab_size()
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise DataError(f"--tokenizer bpe: {path} has no {EOS} token; delete it to retrain")
        self.eos_id = self.pad_id = eos
        self.from_cache = from_cache
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class TiktokenTokenizer:
    """A ``tiktoken.Encoding``. Special-token strings in text are encoded as text."""

    def __init__(self, encoding: tiktoken.Encoding, name: str | None = None) -> None:
        self.encoding = encoding
        self.name = name or encoding.name
        self.vocab_size = encoding.n_vocab
        self.eos_id = self.pad_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


def load_tokenizer(
    kind: str,
    corpus: Corpus | None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """``--tokenizer KIND``; ``corpus`` and ``vocab_size`` matter to ``bpe`` only."""
    if kind == "bpe":
        if corpus is None:
            raise DataError("--tokenizer bpe: needs a corpus to train on")
        return bpe_tokenizer(corpus, vocab_size, cache_dir)
    tokenizer = _fixed_tokenizer(kind)
    if tokenizer is None:
        raise DataError(f"--tokenizer {kind}: unknown tokenizer; choose one of {', '.join(TOKENIZERS)}")
    return tokenizer


def _fixed_tokenizer(kind: str) -> Tokenizer | None:
    """The kinds that are neither trained nor saved whole (byte, gpt2, o200k); None for another."""
    if kind == "byte":
        return ByteTokenizer()
    if kind in _TIKTOKEN_FILES:
        return tiktoken_tokenizer(kind)
    return None


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """All documents as one int64 stream (n,), each followed by ``tokenizer.eos_id``."""
    return encode_documents_with_offsets(tokenizer, docs)[0]


def encode_documents_with_offsets(tokenizer: Tokenizer, docs: Sequence[Document]) -> tuple[torch.Tensor, list[int]]:
    """The stream of ``encode_documents`` and the token at which each document starts."""
    import torch

    parts = [np.zeros(0, dtype=np.int64)]
    offsets, n = [], 0
    texts = [d.text for d in docs]
    chunks = (texts[i : i + ENCODE_CHUNK_DOCS] for i in range(0, len(texts), ENCODE_CHUNK_DOCS))
    for chunk in chunks:
        for ids in tokenizer.encode_batch(chunk):
            offsets.append(n)
            n += len(ids) + 1
            parts.append(np.asarray(ids, dtype=np.int64))
            parts.append(np.array([tokenizer.eos_id], dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts)), offsets  # (n,)


def tokenizer_spec(tokenizer: Tokenizer) -> tuple[str, str]:
    """What rebuilds ``tokenizer`` in another process: (kind, the BPE's JSON or "")."""
    if isinstance(tokenizer, BPETokenizer):
        return "bpe", tokenizer.tok.to_str()
    return tokenizer.name, ""


def tokenizer_from_spec(spec: tuple[str, str], path: Path = Path("tokenizer.json")) -> Tokenizer:
    kind, text = spec
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(text), path, from_cache=True)
    return load_tokenizer(kind, None)


# --- a tokenizer saved beside a run or an exported model --------------------------------

TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> Path:
    """Write ``directory/tokenizer.json``: for BPE the ``tokenizers`` library's own file
    (loadable by it and by ``transformers``), for the others a note naming the kind."""
    path = Path(directory) / TOKENIZER_FILE
    if isinstance(tokenizer, BPETokenizer):
        text = tokenizer.tok.to_str()
    else:
        text = json.dumps({"lsnn_tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size})
    atomic_write(path, text)
    return path


def load_saved_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer ``save_tokenizer`` wrote into ``directory``; DataError if it is missing
    or unreadable."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(directory) / TOKENIZER_FILE
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the tokenizer ({e}); is {directory} a run or an export?") from e
    kind = data.get("lsnn_tokenizer") if isinstance(data, dict) else None
    if kind is None:
        try:
            return BPETokenizer(HFTokenizer.from_str(text), path, from_cache=True)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise DataError(f"{path}: not a tokenizers file ({e})") from e
    tokenizer = _fixed_tokenizer(kind)
    if tokenizer is None:
        raise DataError(f"{path}: unknown tokenizer {kind!r}; valid: {', '.join(TOKENIZERS)}")
    return tokenizer


# --- byte-level BPE ---------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSNN_CACHE_DIR") or Path.home() / ".cache" / "lsnn")


def bpe_cache_path(corpus: Corpus, vocab_size: int, cache_dir: Path | None = None) -> Path:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"bpe-{BPE_RECIPE}-{corpus.fingerprint()[:32]}-{vocab_size}.json"


def bpe_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path | None = None) -> BPETokenizer:
    """The BPE of ``corpus``'s training split: from the cache, or trained and cached."""
    from tokenizers import Tokenizer as HFTokenizer

    minimum = 256 + 1  # the byte alphabet and <|endoftext|>
    if vocab_size < minimum:
        raise DataError(
            f"--vocab-size {vocab_size}: byte-level BPE needs at least {minimum} tokens "
            f"(256 bytes + {EOS}); raise --vocab-size"
        )
    path = bpe_cache_path(corpus, vocab_size, cache_dir)
    if path.exists():
        try:
            return BPETokenizer(HFTokenizer.from_file(str(path)), path, from_cache=True)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise DataError(
                f"--tokenizer bpe: cached tokenizer {path} is unreadable ({e}); "
                "delete it to retrain"
            ) from e
    tok = train_bpe([d.text for d in corpus.train], vocab_size)
    atomic_write(path, tok.to_str())
    return BPETokenizer(tok, path, from_cache=False)


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens, id 0 = ``<|endoftext|>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


# --- tiktoken ---------------------------------------------------------------------------


def tiktoken_cache_dir() -> str:
    """The directory tiktoken.load.read_file_cached uses; "" means caching is disabled."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def missing_tiktoken_files(kind: str) -> list[str]:
    """Cache paths tiktoken would have to download for ``kind`` (empty: all cached)."""
    cache_dir = tiktoken_cache_dir()
    missing = []
    for url, sha256 in _TIKTOKEN_FILES[kind][1]:
        cached = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not cache_dir or not _has_sha256(cached, sha256):
            missing.append(f"{cached} ({url})")
    return missing


def _has_sha256(path: str, sha256: str) -> bool:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == sha256
    except OSError:
        return False


def tiktoken_tokenizer(kind: str) -> TiktokenTokenizer:
    """``gpt2`` or ``o200k`` (o200k_base) from tiktoken's cache, never the network."""
    encoding_name = _TIKTOKEN_FILES[kind][0]
    try:
        import tiktoken
    except ImportError as e:
        raise DataError(
            f"--tokenizer {kind}: needs tiktoken: pip install lsnn[tiktoken]; "
            "or use --tokenizer bpe or byte"
        ) from e
    missing = missing_tiktoken_files(kind)
    if missing:
        raise DataError(
            f"--tokenizer {kind}: tokenizer {kind} needs tiktoken's cached encoding files, and "
            f"these are missing or corrupt: {'; '.join(missing)}. Run once with network access "
            "(or copy them there, or set TIKTOKEN_CACHE_DIR to a directory that has them); "
            "or use --tokenizer bpe or byte"
        )
    return TiktokenTokenizer(tiktoken.get_encoding(encoding_name), kind)
