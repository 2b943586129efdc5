"""Checkpoints written atomically (``stability.atomic``): a reader never sees a half-written
file, and a crash mid-write leaves the previous checkpoint intact. A state with non-finite
weights is never written. Files hold only tensors and plain Python values, so they load
with ``weights_only=True``; a file that does not load is reported by name.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from stability.atomic import atomic_link, atomic_write
from stability.distributed import Dist, all_reduce_, local


class CorruptStateError(RuntimeError):
    """Refused to checkpoint weights that are not finite."""


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint file that is truncated, empty or not a checkpoint at all."""


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


def save_checkpoint(path: Path, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Write ``state`` atomically, unless ``weights`` (its model state dict) are not finite."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise CorruptStateError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:5])}")
    atomic_write(Path(path), lambda f: torch.save(state, f))


def link_checkpoint(src: Path, dst: Path) -> None:
    """``dst`` becomes the checkpoint ``src`` is now, without writing it again."""
    atomic_link(Path(src), Path(dst))


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU; ``UnreadableCheckpoint`` names a file that is not one.
    ``mmap`` maps the tensors instead of reading them (cheap, to read a field or two)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # torch.load reports a truncated, empty or foreign file with any of these
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint (truncated, empty or corrupt: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or "trainer" not in state:
        raise UnreadableCheckpoint(f"{path} is not an lsnn checkpoint (no trainer state)")
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

    ``last.pt`` is written first and a kept checkpoint is a hard link to it, so no
    checkpoint is written twice and no kept checkpoint is ever newer than ``last.pt``.
    """

    def __init__(self, root: Path, keep: int, dist: Dist = Dist()):
        """Under distributed training every rank checks the weights and rank 0 alone
        touches the files."""
        self.root, self.keep, self.dist = Path(root), keep, dist
        self.writer = dist.main
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

    def save(self, state: dict[str, Any], keep: bool) -> None:
        """``last.pt`` := ``state``; with ``keep``, also a kept checkpoint of its step."""
        self._check(state)
        if not self.writer:
            return
        state["kept"] = keep
        atomic_write(self.last, lambda f: torch.save(state, f))
        if keep:
            self.relink()

    def _check(self, state: dict[str, Any]) -> None:
        bad = nonfinite_tensors(state["trainer"]["model"], self.dist)
        if bad:
            raise CorruptStateError(f"refusing to write {self.last}: non-finite weights in {', '.join(bad[:5])}")

    def relink(self) -> None:
        """The kept checkpoint ``last.pt`` says it is (again, after a crash between the two)."""
        if not self.writer:
            return
        link_checkpoint(self.last, self.kept_path(int(load_checkpoint(self.last, mmap=True)["trainer"]["step"])))
        self.rotate()

    def keep_state(self, state: dict[str, Any], step: int) -> None:
        """Write ``state`` (a snapshot) as the kept checkpoint of ``step``."""
        self._check(state)
        if not self.writer:
            return
        atomic_write(self.kept_path(step), lambda f: torch.save({**state, "kept": True}, f))
        self.rotate()

    def rotate(self) -> None:
        if not self.writer:
            return
        for _, path in self.kept()[: -self.keep]:
            path.unlink(missing_ok=True)

    def drop_after(self, step: int) -> None:
        """A rollback to ``step`` abandons the kept checkpoints taken after it."""
        if not self.writer:
            return
        for s, path in self.kept():
            if s > step:
                path.unlink(missing_ok=True)

    def mark_best(self) -> None:
        if not self.writer:
            return
        link_checkpoint(self.last, self.best)
