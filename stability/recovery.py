"""Recovery when skipping is not enough: snapshots, rollback, diagnosis.

Skipping a step protects the weights from one bad batch. When the weights themselves
have gone bad (or every batch keeps failing), K consecutive skips trigger a rollback
(PaLM's remedy for loss spikes): restore the last good in-memory snapshot, skip the
batches that failed, lower the learning rate. After R rollbacks the run stops with a
diagnosis naming the step, the reason and the first modules and parameters that went
non-finite.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stability.config import GuardConfig


@dataclass
class Snapshot:
    state: dict[str, Any]  # Trainer.state_dict(), deep-copied
    position: Any  # where the data stream stood
    extra: dict[str, Any]  # plasticity / continual-learning state
    good_steps: int


@dataclass
class Recovery:
    cfg: GuardConfig
    snapshot: Snapshot | None = None
    rollbacks: int = 0
    failed_batches: set = field(default_factory=set)

    def due(self, good_steps: int) -> bool:
        return self.snapshot is None or good_steps - self.snapshot.good_steps >= self.cfg.snapshot_every

    def take(self, trainer_state: dict[str, Any], position: Any, extra: dict[str, Any], good_steps: int) -> None:
        self.snapshot = Snapshot(copy.deepcopy(trainer_state), position, copy.deepcopy(extra), good_steps)

    def needs_rollback(self, consecutive_skips: int) -> bool:
        return consecutive_skips >= self.cfg.rollback_after

    def exhausted(self) -> bool:
        return self.rollbacks >= self.cfg.max_rollbacks

    def rollback(self, failed: list[Any]) -> Snapshot:
        """Count a rollback, remember the failed batches, return the snapshot to restore."""
        if self.snapshot is None:
            raise RuntimeError("rollback requested before any snapshot was taken")
        self.rollbacks += 1
        self.failed_batches.update(failed)
        return self.snapshot


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
