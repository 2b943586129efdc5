"""Checkpoints written atomically (``stability.atomic``): a reader never sees a half-written
checkpoint, and a crash mid-write leaves the previous one intact. A state with non-finite
weights is never written. Files hold only tensors and plain Python values, so they load
with ``weights_only=True``; a checkpoint that does not load is reported by name.

With one process or DDP a checkpoint is one file. Under FSDP2 every rank holds a shard of
the weights and optimizer state, and a checkpoint is a directory of the same name in
``torch.distributed.checkpoint``'s format (every rank writes its shards) plus ``state.pt``,
the rest of the state, written by rank 0. It is written to a temporary directory and
renamed into place by rank 0 after a barrier, so it is as atomic as a file.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from stability.atomic import TMP_MARK, atomic_link, atomic_write, fsync_dir, remove_path
from stability.distributed import Dist, all_reduce_, barrier, is_sharded, local

SHARDED_STATE = "state.pt"  # the non-sharded part of a sharded checkpoint
_LEAF = "__sharded__"  # where a sharded tensor stood in state.pt


class CorruptStateError(RuntimeError):
    """Refused to checkpoint weights that are not finite."""


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint that is truncated, empty or not a checkpoint at all."""


def nonfinite_tensors(tensors: dict[str, torch.Tensor], dist: Dist = Dist()) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (one host sync). Sharded tensors
    are checked shard by shard, with one all-reduce, so every rank gets the same answer."""
    named = [(n, t) for n, t in tensors.items() if t.is_floating_point()]
    if not named:
        return []
    bad = torch.stack([local(t.detach()).isfinite().all().logical_not() for _, t in named]).float()
    if dist.mode == "fsdp":
        all_reduce_(dist, bad, "max")
    flags = bad.tolist()  # host sync
    return [n for (n, _), b in zip(named, flags) if b]


def serialize(state: dict[str, Any]) -> bytes:
    """``state`` as torch.save writes it, in memory first: streamed to a full disk, torch.save
    fails with an opaque RuntimeError; the write of the bytes fails with the OSError itself."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Write ``state`` atomically, unless ``weights`` (its model state dict) are not finite."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise CorruptStateError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:5])}")
    atomic_write(Path(path), serialize(state))


def link_checkpoint(src: Path, dst: Path) -> None:
    """``dst`` becomes the checkpoint ``src`` is now, without writing it again."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        atomic_link(src, dst)
        return
    tmp = dst.with_name(f".{dst.name}{TMP_MARK}{os.getpid()}-link")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        atomic_link(f, tmp / f.name)
    replace_dir(tmp, dst)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished directory ``tmp`` over ``dst``. A directory cannot be renamed over
    another, so the old one steps aside first; ``recover_dirs`` undoes a crash in between."""
    old = dst.with_name(f".{dst.name}{TMP_MARK}old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dirs(root: Path) -> None:
    """Put back a checkpoint directory a crash left standing aside (see ``replace_dir``)."""
    if not Path(root).is_dir():
        return
    for old in Path(root).glob(f".*{TMP_MARK}old"):
        dst = old.with_name(old.name[1:-len(f"{TMP_MARK}old")])
        if not dst.exists():
            os.rename(old, dst)


def _readable(load, path: Path):
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - a file parser's errors, named and re-raised, never swallowed
        # torch.load reports a truncated or foreign file as RuntimeError, EOFError, UnpicklingError,
        # BadZipFile..., and random bytes reach its legacy unpickler, which raises IndexError,
        # KeyError or TypeError as they fall
        first = str(e).splitlines()[0] if str(e) else ""
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint (truncated, empty or corrupt: "
                                   f"{type(e).__name__}: {first})") from e


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU; ``UnreadableCheckpoint`` names one that is not one.
    ``mmap`` maps the tensors instead of reading them (cheap, to read a field or two). A
    sharded checkpoint comes back whole, with full tensors, in any process."""
    path = Path(path)
    if path.is_dir():
        plain = _load_plain(path / SHARDED_STATE, mmap)
        return _join(plain, _readable(lambda: _load_full_shards(path), path))
    return _load_plain(path, mmap)


def _load_plain(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = _readable(lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), path)
    if not isinstance(state, dict) or "trainer" not in state:
        raise UnreadableCheckpoint(f"{path} is not an lsnn checkpoint (no trainer state)")
    return state


def _load_full_shards(path: Path) -> dict[str, torch.Tensor]:
    """Every shard of a sharded checkpoint, as full tensors, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    leaves = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
              if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(leaves, storage_reader=reader, no_dist=True)
    return leaves


def _split(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` with every sharded tensor replaced by a marker, and those tensors by key."""
    if is_sharded(state):
        return {_LEAF: prefix}, {prefix: state}
    if isinstance(state, dict):
        out, leaves = {}, {}
        for k, v in state.items():
            out[k], sub = _split(v, f"{prefix}/{k}")
            leaves.update(sub)
        return out, leaves
    if isinstance(state, (list, tuple)):
        parts = [_split(v, f"{prefix}/{i}") for i, v in enumerate(state)]
        leaves = {k: t for _, sub in parts for k, t in sub.items()}
        return type(state)(p for p, _ in parts), leaves
    return state, {}


def _join(state: Any, leaves: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if set(state) == {_LEAF}:
            return leaves[state[_LEAF]]
        return {k: _join(v, leaves) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_join(v, leaves) for v in state)
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


KEPT_PREFIX = "step-"


class CheckpointDir:
    """``checkpoints/`` of a run: ``last.pt`` (where ``--resume`` starts), ``best.pt`` (by
    validation loss) and the last K checkpoints taken at healthy moments, ``step-N.pt``,
    which a rollback falls back on when its in-memory snapshot is gone or older.

    ``last.pt`` is written first and a kept checkpoint is a hard link to it (a directory
    of hard links, when sharded), so no checkpoint is written twice and no kept checkpoint
    is ever newer than ``last.pt``. Every rank calls every method at the same moment:
    each checks the weights (its shard of them), writes its shards when sharded, and
    rank 0 alone writes and renames the rest.
    """

    def __init__(self, root: Path, keep: int, dist: Dist = Dist()):
        self.root, self.keep, self.dist = Path(root), keep, dist
        self.writer, self.sharded = dist.main, dist.mode == "fsdp"
        self.last, self.best = self.root / "last.pt", self.root / "best.pt"

    def kept_path(self, step: int) -> Path:
        return self.root / f"{KEPT_PREFIX}{step:08d}.pt"

    def kept(self) -> list[tuple[int, Path]]:
        """The kept checkpoints, oldest first, as (step, path)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob(f"{KEPT_PREFIX}*.pt"):
            digits = path.stem[len(KEPT_PREFIX):]
            if digits.isdigit():
                found.append((int(digits), path))
        return sorted(found)

    # -- writing ---------------------------------------------------------------------------
    def save(self, state: dict[str, Any], keep: bool) -> None:
        """``last.pt`` := ``state``; with ``keep``, also a kept checkpoint of its step."""
        state["kept"] = keep
        self._write(self.last, state)
        if keep:
            self.relink()

    def keep_state(self, state: dict[str, Any], step: int) -> None:
        """Write ``state`` (a snapshot) as the kept checkpoint of ``step``."""
        self._write(self.kept_path(step), {**state, "kept": True})
        self.rotate()

    def _write(self, path: Path, state: dict[str, Any]) -> None:
        bad = nonfinite_tensors(state["trainer"]["model"], self.dist)
        if bad:
            raise CorruptStateError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:5])}")
        if not self.sharded:
            if self.writer:
                atomic_write(path, serialize(state))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        plain, leaves = _split(state)
        tmp = path.with_name(f".{path.name}{TMP_MARK}shards")  # the same name on every rank
        if self.writer:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.dist)
        try:
            dcp.save(leaves, checkpoint_id=str(tmp))  # every rank its shards, rank 0 the metadata
        except CheckpointException as e:  # a rank's write failed (a full disk): every rank gets it
            raise OSError(f"writing the shards of {path} failed: {e}") from e
        if self.writer:
            atomic_write(tmp / SHARDED_STATE, serialize(plain))
        barrier(self.dist)
        if self.writer:
            replace_dir(tmp, path)
        barrier(self.dist)

    def relink(self) -> None:
        """The kept checkpoint ``last.pt`` says it is (again, after a crash between the two)."""
        if not self.writer:
            return
        plain = self.last / SHARDED_STATE if self.sharded else self.last
        link_checkpoint(self.last, self.kept_path(int(_load_plain(plain, mmap=True)["trainer"]["step"])))
        self.rotate()

    def rotate(self) -> None:
        if not self.writer:
            return
        for _, path in self.kept()[: -self.keep]:
            remove_path(path)

    def drop_after(self, step: int) -> None:
        """A rollback to ``step`` abandons the kept checkpoints taken after it."""
        if not self.writer:
            return
        for s, path in self.kept():
            if s > step:
                remove_path(path)

    def mark_best(self) -> None:
        if self.writer:
            link_checkpoint(self.last, self.best)

    # -- reading ---------------------------------------------------------------------------
    def load(self, path: Path, template: dict[str, Any] | None = None) -> dict[str, Any]:
        """A checkpoint of this run. Sharded, it needs a ``template`` state with sharded
        tensors where the checkpoint has them: every rank reads its own shards into it."""
        if not self.sharded:
            return load_checkpoint(path)
        plain = _load_plain(Path(path) / SHARDED_STATE)
        if template is None:
            return plain
        return self.materialize(plain, template, path)

    def materialize(self, plain: dict[str, Any], template: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
        """``plain`` (a sharded checkpoint's state.pt) with its shards read into ``template``'s."""
        if not self.sharded:
            return plain
        import torch.distributed.checkpoint as dcp

        path = Path(path or self.last)
        _, leaves = _split(template)
        wanted = _markers(plain)  # where each sharded tensor stands -> its key in the files
        missing = [where for where in wanted if where not in leaves]
        if missing:
            raise UnreadableCheckpoint(f"{path}: this run has nothing to load {missing[0]} into")
        # paired by where they stand, not by their keys: a checkpoint of an earlier layout
        # (``stability.checkpointer.upgrade``) keeps its files' keys at new places
        by_key = {key: leaves[where] for where, key in wanted.items()}
        _readable(lambda: dcp.load(by_key, checkpoint_id=str(path)), path)
        return _join(plain, by_key)


def _markers(plain: Any, prefix: str = "") -> dict[str, str]:
    """Where (``_split``'s path) each sharded tensor ``plain`` marks stands -> its key."""
    if isinstance(plain, dict):
        if set(plain) == {_LEAF}:
            return {prefix: plain[_LEAF]}
        return {k: v for key, sub in plain.items() for k, v in _markers(sub, f"{prefix}/{key}").items()}
    if isinstance(plain, (list, tuple)):
        return {k: v for i, sub in enumerate(plain) for k, v in _markers(sub, f"{prefix}/{i}").items()}
    return {}
