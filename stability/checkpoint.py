"""Checkpoints written atomically: a temp file in the same directory, fsync, rename.

A reader never sees a half-written file, and a crash mid-write leaves the previous
checkpoint intact. A state with non-finite weights is never written. Files hold only
tensors and plain Python values, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


class CorruptStateError(RuntimeError):
    """Refused to checkpoint weights that are not finite."""


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (one host sync)."""
    named = [(n, t) for n, t in tensors.items() if t.is_floating_point()]
    if not named:
        return []
    flags = torch.stack([t.detach().isfinite().all() for _, t in named]).tolist()  # host sync
    return [n for (n, _), ok in zip(named, flags) if not ok]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Write ``state`` atomically, unless ``weights`` (its model state dict) are not finite."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise CorruptStateError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:5])}")
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def copy_checkpoint(src: Path, dst: Path) -> None:
    atomic_write_bytes(Path(dst), lambda f: shutil.copyfileobj(open(src, "rb"), f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
