"""Health monitoring at sync points: the guard's counters become lines and records.

Every --log-every steps the run reads the guard's device counters once and hands them
here. This module turns the new history rows into a warning line and a ``skip`` record
per skipped step, ``band`` records and one warning line per window for high or critical
gradient norms, and the step line. It also keeps the window's and the epoch's totals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stability.config import GuardConfig
from stability.guard import BANDS, REASONS, band_name
from stability.reporting import Reporter

if TYPE_CHECKING:
    from stability.stream import Position


@dataclass
class Totals:
    """What an epoch summary reports, accumulated over sync points."""

    loss_sum: float = 0.0
    loss_count: int = 0
    skips: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS[1:], 0))
    bands: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BANDS, 0))
    steps: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "skips": dict(self.skips),
                "bands": dict(self.bands), "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Totals:
        return cls(state["loss_sum"], state["loss_count"], {**dict.fromkeys(REASONS[1:], 0), **state["skips"]},
                   dict(state["bands"]), state["steps"])


class Monitor:
    def __init__(self, report: Reporter, guard_cfg: GuardConfig, gradient_clip: float, window: int,
                 last_sync_step: int):
        self.report, self.guard_cfg, self.gradient_clip, self.window = report, guard_cfg, gradient_clip, window
        self.last_sync_step = last_sync_step
        self.totals = Totals()
        self.tokens, self.started = 0, time.monotonic()
        self._plasticity_seen: dict[str, list] | None = None  # the counters the last sync point read

    def add_tokens(self, n: int) -> None:
        """A step trained ``n`` tokens (the step line's tokens/s)."""
        self.tokens += n

    def end_epoch(self) -> None:
        """The epoch's summary is out: the next one's totals start from nothing."""
        self.totals = Totals()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_sync_step": self.last_sync_step, "totals": self.totals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind(state)
        self.totals = Totals.from_state(state["totals"])

    def rewind(self, state: dict[str, Any]) -> None:
        """A rollback to ``state``: the rows read since are history, but the epoch's totals
        keep them (the summary counts the skips that caused the rollback)."""
        self.last_sync_step = state["last_sync_step"]

    # -- sync points -----------------------------------------------------------------------
    def sync(self, rows: list[dict[str, Any]], step: int, last: Position, counters: dict[str, Any],
             describe: Callable[[int], list[dict[str, Any]]], plasticity: dict[str, list] | None = None) -> None:
        """A sync point's lines and records, of ``rows`` (``rows()``) up to ``step``, whose
        last micro-batch was ``last``: the skips and loud norms (``tally``), new STDP drops
        and clips (with ``plasticity``, the counters read now), and the step line."""
        self.tally(rows, last.epoch + 1, describe)
        extra: dict[str, Any] = {"task": last.task + 1}
        if plasticity is not None:
            self.plasticity(self._plasticity_seen, plasticity, step)
            self._plasticity_seen = extra["plasticity"] = plasticity
        self.step_line(rows, step, last.epoch + 1, counters, **extra)

    def rows(self, history: list[list[float]], step: int) -> list[dict[str, Any]]:
        """The history rows of the steps since the last sync, oldest first."""
        first = max(self.last_sync_step + 1, step - self.window + 1)
        start = (first - 1) % self.window
        ordered = history[start:] + history[:start]
        self.last_sync_step = step
        return [{"step": s, "loss": loss, "grad_norm": norm, "reason": REASONS[int(reason)],
                 "band": BANDS[int(band)], "scale": scale, "lr": lr}
                for s, (loss, norm, reason, band, scale, lr) in zip(range(first, step + 1), ordered)]

    def tally(self, rows: list[dict[str, Any]], epoch: int,
              describe: Callable[[int], list[dict[str, Any]]] = lambda step: []) -> None:
        """Warn about and record every skipped step (with ``describe(step)``, the batches it
        read) and loud gradient norm; add to totals."""
        totals, loud = self.totals, []
        for r in rows:
            totals.steps += 1
            totals.bands[r["band"]] += 1
            if r["reason"] != "ok":
                totals.skips[r["reason"]] += 1
                self.report.warn(f"step {r['step']} skipped ({r['reason']}): loss={r['loss']:.4g} "
                                 f"grad_norm={r['grad_norm']:.4g} scale={r['scale']:g}")
                self.report.record("skip", step=r["step"], epoch=epoch, reason=r["reason"], loss=r["loss"],
                                   grad_norm=r["grad_norm"], loss_scale=r["scale"], batches=describe(r["step"]))
                continue
            if math.isfinite(r["loss"]):
                totals.loss_sum += r["loss"]
                totals.loss_count += 1
            if r["band"] in ("high", "critical"):
                loud.append(r)
                self.report.record("band", step=r["step"], band=r["band"], grad_norm=r["grad_norm"])
        if loud:  # one line per window: a long warm-up would otherwise bury the skip warnings
            worst = max(loud, key=lambda r: r["grad_norm"])
            counts = ", ".join(f"{b} on {n}" for b in ("high", "critical")
                               if (n := sum(r["band"] == b for r in loud)))
            self.report.warn(f"steps {loud[0]['step']}-{loud[-1]['step']}: gradient norm {counts} step(s), "
                             f"max {worst['grad_norm']:.3f} at step {worst['step']} (clipped to "
                             f"--gradient-clip {self.gradient_clip:g})")

    def step_line(self, rows: list[dict[str, Any]], step: int, epoch: int, counters: dict[str, Any],
                  **extra: Any) -> None:
        ok = [r for r in rows if r["reason"] == "ok" and math.isfinite(r["loss"])]
        loss = sum(r["loss"] for r in ok) / len(ok) if ok else math.nan
        norm = sum(r["grad_norm"] for r in ok) / len(ok) if ok else math.nan
        now = time.monotonic()
        tok_s = self.tokens / max(now - self.started, 1e-9)
        self.tokens, self.started = 0, now
        reasons = {name: sum(r["reason"] == name for r in rows) for name in REASONS[1:]}
        skipped_total = sum(v for k, v in counters["skips"].items() if k != "ok")
        self.report.step(step, epoch, loss, norm, rows[-1]["lr"], rows[-1]["scale"], tok_s,
                         band_name(norm, self.guard_cfg), sum(reasons.values()), reasons,
                         skipped_total=skipped_total, spikes_clipped=counters["spikes_clipped"],
                         good_steps=counters["good_steps"], **extra)

    def plasticity(self, before: dict[str, list] | None, now: dict[str, list], step: int) -> None:
        """Warn when STDP updates were dropped (non-finite) or clipped since the last sync."""
        for kind in ("dropped", "clipped"):
            new = [n - (before[kind][i] if before else 0) for i, n in enumerate(now[kind])]
            if any(new):
                blocks = ", ".join(f"block {i} x{int(n)}" for i, n in enumerate(new) if n)
                self.report.warn(f"step {step}: STDP updates {kind} by the guard ({blocks})")
