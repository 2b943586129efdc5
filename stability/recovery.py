"""Recovery when skipping is not enough: snapshots, rollback, diagnosis.

Skipping a step protects the weights from one bad batch. When the weights themselves
have gone bad (or every batch keeps failing), K consecutive skips trigger a rollback
(PaLM's remedy for loss spikes): restore the last good state, quarantine the batches
that failed, lower the learning rate. After R rollbacks the run stops with a diagnosis
naming the step, the reason and the first modules and parameters that went non-finite.

The last good state is the newest of the in-memory snapshot and the checkpoints kept on
disk at healthy moments, so a rollback after a restart goes back to the same state as it
would have without the restart. What recovery has learnt (rollbacks so far, hence the
learning-rate factor, and when the next snapshot is due) is saved in every checkpoint and
is not undone by a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stability.config import GuardConfig


@dataclass
class Snapshot:
    state: dict[str, Any]  # the run's checkpoint state at a healthy moment, deep-copied
    step: int
    good_steps: int
    persisted: bool = False  # also on disk as a kept checkpoint


@dataclass
class Recovery:
    cfg: GuardConfig
    snapshot: Snapshot | None = None
    rollbacks: int = 0
    snapshot_good_steps: int | None = None  # of the last snapshot: survives a restart

    def due(self, good_steps: int) -> bool:
        return self.snapshot_good_steps is None or good_steps - self.snapshot_good_steps >= self.cfg.snapshot_every

    def take(self, state: dict[str, Any], step: int, good_steps: int) -> None:
        """Keep ``state`` (already a copy: the caller builds it fresh) as the snapshot."""
        self.snapshot = Snapshot(state, step, good_steps)
        self.snapshot_good_steps = good_steps

    def needs_rollback(self, consecutive_skips: int) -> bool:
        return consecutive_skips >= self.cfg.rollback_after

    def exhausted(self) -> bool:
        return self.rollbacks >= self.cfg.max_rollbacks

    @property
    def lr_factor(self) -> float:
        """Each rollback multiplies the learning rate by --rollback-lr-factor, for good."""
        return self.cfg.rollback_lr_factor**self.rollbacks

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "snapshot_good_steps": self.snapshot_good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.snapshot_good_steps = state["snapshot_good_steps"]


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
