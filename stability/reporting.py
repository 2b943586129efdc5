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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from stability.atomic import atomic_write
from stability.config import ConfigError


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _unclean(value: Any) -> Any:
    """A record as read back from metrics.jsonl, with "nan"/"inf" strings numbers again."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unclean(v) for v in value]
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


class _Bar(tqdm):
    # tqdm's monitor thread only rescues bars that stop being updated; this one is
    # updated every step, and a run should not start threads it does not need
    monitor_interval = 0


def summary_writer() -> type:
    """torch's TensorBoard ``SummaryWriter`` class; a ConfigError naming the flag and the
    install when the tensorboard package is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install 'lsnn[tensorboard]', or drop --tensorboard") from e
    return SummaryWriter


def scalars(kind: str, rec: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The TensorBoard scalars of one record: each number as ``kind/field``, a list's
    (per-block values) as ``kind/field/i``, a dict's (counts by reason) as ``kind/field/key``.
    Strings, booleans, None and lists of descriptions (a skip's batches) have no scalar."""
    def walk(tag: str, value: Any) -> Iterator[tuple[str, float]]:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            yield tag, float(value)
        elif isinstance(value, dict):
            for key, v in value.items():
                yield from walk(f"{tag}/{key}", v)
        elif isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, str)) for v in value):
            for i, v in enumerate(value):
                yield from walk(f"{tag}/{i}", v)

    for name, value in rec.items():
        if name not in ("kind", "step"):
            yield from walk(f"{kind}/{name}", value)


class Reporter:
    def __init__(self, out_dir: Path | None, stream: TextIO | None = None, progress: str = "auto",
                 tensorboard: bool = False):
        """``out_dir`` None (every rank but 0) writes no file; ``tensorboard`` raises a
        ConfigError here, before anything is written, when the package is absent."""
        self.stream = stream or sys.stdout
        self.metrics_path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = progress == "bar" or (progress == "auto" and isatty)
        self._bar: tqdm | None = None
        self._desc = ""
        self._summaries: set[tuple] = set()
        self._dropping = False  # appends to metrics.jsonl are failing (a full disk)
        self.tensorboard_dir = Path(out_dir) / "tensorboard" if out_dir and tensorboard else None
        self._writer_cls = summary_writer() if self.tensorboard_dir else None
        self._writer: Any = None
        self._tb_step = 0  # for a record without a step of its own

    # -- console -------------------------------------------------------------------
    def line(self, text: str) -> None:
        """Print a line; on a terminal above the bar, which is cleared and redrawn below it."""
        if self._bar is not None:
            self._bar.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        if self._bar is not None:
            self._bar.refresh()

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def progress(self, step: int, total: int, text: str = "") -> None:
        """Move the bar to ``step`` of ``total`` (only on a terminal or with --progress bar).

        Called every step: it reads no tensor, and tqdm redraws at most 4 times a second. A
        rollback moves the bar back; a new total (the next task) restarts its clock; the bar
        closes, left on screen, when ``step`` reaches ``total``."""
        if not self.bar:
            return
        bar = self._bar
        if bar is None:
            bar = self._bar = _Bar(total=total, initial=0, desc=text, file=self.stream, unit="step",
                                   mininterval=0.25, dynamic_ncols=True, leave=True, disable=False)
            self._desc = text
        elif total != bar.total:
            bar.reset(total=total)
        if text != self._desc:
            self._desc = text
            bar.set_description_str(text, refresh=False)
        bar.update(step - bar.n)
        if step >= total:
            self.close_bar()

    def close_bar(self) -> None:
        """Draw the bar a last time and leave it on screen (the next progress call starts a new one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar, self._desc = None, ""

    def close(self) -> None:
        """End of the run: close the bar and the TensorBoard files."""
        self.close_bar()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- records -------------------------------------------------------------------
    def record(self, kind: str, **fields: Any) -> None:
        """One record: a line of metrics.jsonl and, with --tensorboard, its scalars."""
        if self.metrics_path is None:
            return
        line = (json.dumps(_clean({"kind": kind, **fields})) + "\n").encode()
        with open(self.metrics_path, "ab", buffering=0) as f:  # unbuffered: no retry at close
            start = f.tell()
            try:
                rest = memoryview(line)
                while rest:  # a nearly full disk may take part of a write
                    rest = rest[f.write(rest):]
            except OSError as e:  # a full disk: put the file back as it was, say so once, go on
                f.truncate(start)
                if not self._dropping:
                    self.warn(f"could not append to {self.metrics_path} ({e.strerror or e}); records are dropped "
                              "until the disk has room again")
                self._dropping = True
                return
        self._dropping = False
        if self.tensorboard_dir is not None:
            self._scalars(kind, fields)
            self._writer.flush()  # a few records per sync point: TensorBoard shows them at once

    def _scalars(self, kind: str, rec: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._writer_cls(str(self.tensorboard_dir))
        if isinstance(rec.get("step"), int):
            self._tb_step = rec["step"]
        for tag, value in scalars(kind, rec):
            self._writer.add_scalar(tag, value, self._tb_step)

    def step(self, step: int, epoch: int, loss: float, grad_norm: float, lr: float, scale: float,
             tokens_per_s: float, band: str, skipped: int, skip_reason: dict[str, int], **extra: Any) -> None:
        text = (f"step {step}: loss={loss:.4f} grad_norm={grad_norm:.3f} lr={lr:.3e} "
                f"scale={scale:g} tok/s={tokens_per_s:.0f} band={band}")
        if skipped:
            text += f" skipped={skipped} ({', '.join(f'{k}={v}' for k, v in skip_reason.items() if v)})"
        if self._bar is not None:
            total = extra.get("skipped_total", skipped)
            self._bar.set_postfix_str(f"loss={loss:.4f} skips={total} tok/s={tokens_per_s:.0f}", refresh=False)
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
        kept = read_records(self.metrics_path)
        for rec in kept:
            if rec.get("kind") == "epoch":
                self._summaries.add(_summary_key(rec))
            elif rec.get("kind") == "task":
                self._summaries.add(("task", rec["task"]))
        if self.tensorboard_dir is not None:
            self._rewrite_tensorboard(kept)

    def _rewrite_tensorboard(self, kept: list[dict[str, Any]]) -> None:
        """Make the event files hold exactly the records metrics.jsonl kept: the old files
        go, and a new one starts with a purge of every step (so a TensorBoard that already
        read them drops them too) and writes the kept records again."""
        for old in self.tensorboard_dir.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = self._writer_cls(str(self.tensorboard_dir), purge_step=0)
        for rec in kept:
            self._scalars(rec.get("kind", ""), _unclean(rec))
        self._writer.flush()
