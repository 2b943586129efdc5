"""Recovery when skipping is not enough: the step ledger, snapshots, rollback, diagnosis.

Skipping a step protects the weights from one bad batch. When the weights themselves
have gone bad (or every batch keeps failing), K consecutive skips trigger a rollback
(PaLM's remedy for loss spikes): restore the last good state, quarantine the batches
that failed, lower the learning rate. After R rollbacks the run stops with a diagnosis
naming the step, the reason and the first modules and parameters that went non-finite.

``StepLedger`` keeps what each recent step read and how it ended, so a rollback knows
which batches to quarantine. ``Recovery.rollback`` decides a rollback and returns it as a
``RollbackPlan`` (the state to go back to, the batches to quarantine), or the reason to
stop; ``stability.rollback`` carries it out. The last good state is the newest of the in-memory
snapshot and the checkpoints kept on disk at healthy moments, so a rollback after a
restart goes back to the same state as it would have without the restart. What recovery
has learnt (rollbacks so far, hence the learning-rate factor, and when the next snapshot is
due) is saved in every checkpoint and is not undone by a rollback.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stability.config import GuardConfig
from stability.guard import OVERFLOW, REASONS
from stability.stream import Position


class Unrecoverable(RuntimeError):
    """Skipping and rolling back could not save the run; ``report`` is its report.json."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


class StepLedger:
    """Step -> the batches it read (positions) and, once a sync point has read it, how it
    ended (a reason of ``guard.REASONS``); the steps a rollback can look back on, no more."""

    def __init__(self, horizon: int):
        self.horizon = horizon  # --rollback-after + 2 x --log-every: what a rollback looks back on
        self.entries: dict[int, tuple[list[Position], str | None]] = {}
        self.step = 0  # the last step recorded
        self.last = Position()  # the last micro-batch trained
        self.nonfinite: set[int] = set()  # parameters with non-finite gradients since the run was healthy

    def record(self, step: int, positions: tuple[Position, ...]) -> None:
        self.entries[step] = (list(positions), None)
        for old in [s for s in self.entries if s <= step - self.horizon]:
            del self.entries[old]
        self.step, self.last = step, positions[-1]

    def settle(self, rows: list[dict[str, Any]]) -> None:
        """A sync point's rows say how each step ended."""
        for r in rows:
            if r["step"] in self.entries:
                self.entries[r["step"]] = (self.entries[r["step"]][0], r["reason"])

    def observe(self, healthy: bool, bad_params: list[int]) -> None:
        """The sync point's verdict, and the parameters whose gradients went non-finite since
        the last one: remembered until the run is healthy again."""
        self.nonfinite = set() if healthy else self.nonfinite | set(bad_params)

    def read(self, step: int) -> list[Position]:
        return self.entries[step][0] if step in self.entries else []

    def reason(self, step: int) -> str:
        return (self.entries[step][1] if step in self.entries else None) or "unknown"

    def failed_steps(self, consecutive: int, step: int, scaled: bool) -> list[int]:
        """The steps of the skip streak ending at ``step`` that triggered a rollback (with
        loss ``scaled``, fp16 overflows belong to the loss scale and do not count)."""
        failed, s = [], step
        while len(failed) < consecutive and s in self.entries:
            reason = self.entries[s][1]
            if reason in (None, "ok"):
                break
            if not (scaled and reason == REASONS[OVERFLOW]):
                failed.append(s)
            s -= 1
        return failed[::-1]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "last": self.last.as_dict(),
                "steps": [[s, [p.as_dict() for p in ps], r] for s, (ps, r) in sorted(self.entries.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.last = state["step"], Position(**state["last"])
        self.entries = {s: ([Position(**p) for p in ps], r) for s, ps, r in state["steps"]}

    def rewind(self, state: dict[str, Any]) -> None:
        """A rollback to ``state``: the steps after it never happened (the ones before keep
        what the sync points since learnt of them)."""
        self.step, self.last = state["step"], Position(**state["last"])
        self.entries = {s: e for s, e in self.entries.items() if s <= self.step}


@dataclass
class Snapshot:
    state: dict[str, Any]  # the run's checkpoint state at a healthy moment, deep-copied
    step: int
    good_steps: int
    persisted: bool = False  # also on disk as a kept checkpoint


@dataclass
class GoodState:
    """A state a rollback can go back to, and where it came from."""

    state: dict[str, Any]  # the run's checkpoint state, the caller's own copy
    source: str  # "the in-memory snapshot of step N" or a kept checkpoint's path
    on_disk: bool


@dataclass
class RollbackPlan:
    """A rollback, decided: back to ``target`` (None: the run must stop, for ``stop``),
    quarantining ``failed``."""

    step: int  # the sync point that found the skip streak
    consecutive: int
    reason: str  # of the last skipped step
    failed: list[Position]
    target: GoodState | None
    stop: str = ""

    def warning(self, to_step: int, rollbacks: int, cfg: GuardConfig, culprits: str) -> str:
        return (f"step {self.step}: {self.consecutive} consecutive skipped steps ({self.reason}"
                f"{'; ' + culprits if culprits else ''}); rolled back to step {to_step} from {self.target.source} "
                f"(rollback {rollbacks}/{cfg.max_rollbacks}), quarantined {len(self.failed)} batches "
                f"(see quarantine.jsonl), learning rate x{cfg.rollback_lr_factor ** rollbacks:g}")


@dataclass
class Recovery:
    cfg: GuardConfig
    snapshot: Snapshot | None = None
    rollbacks: int = 0
    snapshot_good_steps: int | None = None  # of the last snapshot: survives a restart

    def due(self, good_steps: int) -> bool:
        return self.snapshot_good_steps is None or good_steps - self.snapshot_good_steps >= self.cfg.snapshot_every

    def take(self, state: dict[str, Any], step: int, good_steps: int, persisted: bool = False) -> None:
        """Keep a copy of ``state`` as the snapshot: the live weights and optimizer state
        the caller's state refers to go on changing, the snapshot must not."""
        self.snapshot = Snapshot(copy.deepcopy(state), step, good_steps, persisted)
        self.snapshot_good_steps = good_steps

    def persisted(self) -> None:
        """The snapshot is on disk now, as a kept checkpoint."""
        if self.snapshot is not None:
            self.snapshot.persisted = True

    def needs_rollback(self, consecutive_skips: int) -> bool:
        return consecutive_skips >= self.cfg.rollback_after

    def exhausted(self) -> bool:
        return self.rollbacks >= self.cfg.max_rollbacks

    def rollback(self, consecutive: int, step: int, ledger: StepLedger, scaled: bool,
                 target: GoodState | None) -> RollbackPlan:
        """Decide the rollback a streak of ``consecutive`` skips ending at ``step`` calls for:
        back to ``target`` (the newest good state, None if there is none or the budget is
        spent), counted, or a stop."""
        failed = [p for s in ledger.failed_steps(consecutive, step, scaled) for p in ledger.read(s)]
        reason = ledger.reason(step)
        plan = RollbackPlan(step, consecutive, reason, failed, None if self.exhausted() else target)
        if plan.target is None:
            why = f"after {self.rollbacks} rollbacks" if self.exhausted() else "and no good state"
            plan.stop = f"{consecutive} consecutive skipped steps (last: {reason}) {why}"
            return plan
        self.rollbacks += 1
        return plan

    @property
    def lr_factor(self) -> float:
        """Each rollback multiplies the learning rate by --rollback-lr-factor, for good."""
        return self.cfg.rollback_lr_factor**self.rollbacks

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "snapshot_good_steps": self.snapshot_good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.snapshot_good_steps = state["snapshot_good_steps"]


def culprit_modules(param_names: list[str], nonfinite: set[int]) -> list[str]:
    """The modules whose parameters (indices into ``param_names``) had non-finite gradients."""
    names = [param_names[i] for i in sorted(nonfinite)]
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


def culprit_line(modules: list[str]) -> str:
    if not modules:
        return ""
    more = f" (+{len(modules) - 5} more)" if len(modules) > 5 else ""
    return f"gradients went non-finite in: {', '.join(modules[:5])}{more}"


@dataclass
class Diagnosis:
    nonfinite_weights: list[str]
    nonfinite_activations: list[str]  # modules in execution order
    nonfinite_grads: list[str]
    loss: float

    def lines(self, limit: int = 5) -> list[str]:
        def show(names: list[str]) -> str:
            more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
            return (", ".join(names[:limit]) + more) if names else "none"
        return [
            f"non-finite weights: {show(self.nonfinite_weights)}",
            f"first modules with non-finite outputs: {show(self.nonfinite_activations)}",
            f"parameters with non-finite gradients: {show(self.nonfinite_grads)}",
            f"loss on the failing batch: {self.loss}",
        ]


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if hasattr(output, "__dataclass_fields__"):
        return [t for name in output.__dataclass_fields__ for t in _tensors(getattr(output, name))]
    return []


def diagnose(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn, autocast) -> Diagnosis:
    """Run one forward/backward on ``batch`` watching every module: off the hot path,
    so it may sync as much as it likes."""
    weights = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    seen: list[str] = []

    def watch(name: str):
        def hook(module, args, output):
            if any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(output)):
                seen.append(name)
        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in model.named_modules() if n]
    model.zero_grad(set_to_none=True)
    try:
        with autocast():
            loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    model.zero_grad(set_to_none=True)
    return Diagnosis(weights, seen, grads, float(loss.detach()))


def stop_report(step: int, reason: str, diag: Diagnosis, culprits: list[str], batches: list[dict[str, Any]],
                ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """report.json of a run that could not recover: the diagnosis of the failing batch, the
    modules seen going non-finite on the failing steps, and under torchrun (``ranks``: each
    rank's diagnosis) the ranks whose own batch went bad."""
    report = {"step": step, "reason": reason, "nonfinite_weights": diag.nonfinite_weights,
              "nonfinite_activations": diag.nonfinite_activations, "nonfinite_grads": diag.nonfinite_grads,
              "nonfinite_grads_seen": culprits, "loss": diag.loss,
              "lines": [*diag.lines(), *([culprit_line(culprits)] if culprits else [])], "batches": batches}
    if ranks is not None:
        bad = [r for r, f in enumerate(ranks) if not math.isfinite(f["loss"]) or f["activations"]]
        report.update(ranks=ranks, bad_ranks=bad)
        report["lines"].append(f"ranks whose own batch went bad: {', '.join(map(str, bad)) or 'none'} "
                               f"(of {len(ranks)}; the others skipped for them)")
    return report
