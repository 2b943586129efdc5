"""What a run prints and records.

One stream, one writer: plain lines on stdout, ``metrics.jsonl`` with one JSON object per
logged step, skipped step, epoch and task, and with ``--tensorboard`` the same records as
TensorBoard scalars under ``RUN_DIR/tensorboard/``. An epoch summary is keyed by (task,
epoch) and printed exactly once, however often it is asked for (the trainer this
replaces printed each epoch four times).

On a terminal a tqdm bar sits under the lines: steps, ETA and its step rate move every
step from Python ints (no tensor is read), loss, skips and tokens/s at each sync point.
Elsewhere (a log file, a pipe) there is no bar at all, so a log holds each line once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from stability.atomic import atomic_write


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _summary_key(rec: dict[str, Any]) -> tuple:
    if rec.get("complete", True):
        return rec.get("task", 0), rec["epoch"]
    return rec.get("task", 0), rec["epoch"], "stopped at", rec.get("step")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file, in order; a last line cut short by a crash
    mid-write is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


class Reporter:
    def __init__(self, out_dir: Path | None, stream: TextIO | None = None, progress: str = "auto"):
        self.stream = stream or sys.stdout
        self.metrics_path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = progress == "bar" or (progress == "auto" and isatty)
        self._bar_shown = False
        self._last_bar = 0.0
        self._summaries: set[tuple] = set()

    # -- console -------------------------------------------------------------------
    def line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def progress(self, step: int, total: int, text: str = "") -> None:
        """A one-line bar, redrawn at most 4 times a second, only on a terminal."""
        now = time.monotonic()
        if not self.bar or (now - self._last_bar < 0.25 and step < total):
            return
        self._last_bar = now
        width = 30
        filled = int(width * min(step / max(total, 1), 1.0))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text}")
        self.stream.flush()
        self._bar_shown = True

    # -- records -------------------------------------------------------------------
    def record(self, kind: str, **fields: Any) -> None:
        if self.metrics_path is None:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_clean({"kind": kind, **fields})) + "\n")

    def step(self, step: int, epoch: int, loss: float, grad_norm: float, lr: float, scale: float,
             tokens_per_s: float, band: str, skipped: int, skip_reason: dict[str, int], **extra: Any) -> None:
        text = (f"step {step}: loss={loss:.4f} grad_norm={grad_norm:.3f} lr={lr:.3e} "
                f"scale={scale:g} tok/s={tokens_per_s:.0f} band={band}")
        if skipped:
            text += f" skipped={skipped} ({', '.join(f'{k}={v}' for k, v in skip_reason.items() if v)})"
        self.line(text)
        self.record("step", step=step, epoch=epoch, loss=loss, grad_norm=grad_norm, lr=lr, loss_scale=scale,
                    tokens_per_s=tokens_per_s, band=band, skipped=skipped, skip_reason=skip_reason, **extra)

    def once(self, key: tuple) -> bool:
        """True the first time ``key`` is asked for: a summary is printed once, however
        often a run (or a resumed run) reaches it."""
        if key in self._summaries:
            return False
        self._summaries.add(key)
        return True

    def epoch_summary(self, task: int, epoch: int, text: str, **fields: Any) -> bool:
        """Print and record an epoch summary unless it was already reported: a complete
        epoch once per (task, epoch), a --max-steps stop once per (task, epoch, step)."""
        if not self.once(_summary_key({"task": task, "epoch": epoch, **fields})):
            return False
        self.line(text)
        self.record("epoch", task=task, epoch=epoch, **fields)
        return True

    def offset(self) -> int:
        """How much of metrics.jsonl is written: a checkpoint stores it, a resume cuts back to it."""
        if self.metrics_path is None or not self.metrics_path.exists():
            return 0
        return self.metrics_path.stat().st_size

    def truncate_to(self, offset: int) -> None:
        """On resume: drop what the interrupted run wrote after its checkpoint (a rollback
        writes records of earlier steps again, so cutting by step number would not do)."""
        if self.metrics_path is None or not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        if len(data) > offset:
            atomic_write(self.metrics_path, data[:offset])
        for rec in read_records(self.metrics_path):
            if rec.get("kind") == "epoch":
                self._summaries.add(_summary_key(rec))
            elif rec.get("kind") == "task":
                self._summaries.add(("task", rec["task"]))
