"""The fp16 loss-scale policy: an explicit state machine on the device.

``torch.amp.GradScaler`` does the mechanics through its public API (``scale``,
``unscale_``, ``update(new_scale=...)``); the decisions are ours, because the trainer
this replaces needed more than GradScaler offers and reached into ``scaler._scale`` to
get it (turning the scale into a Python float and crashing ``scale()``):

- back off by ``backoff_factor`` on an overflowing step (non-finite gradients with a
  finite loss);
- an extra cut by ``overflow_cut`` every ``overflow_patience`` consecutive overflows;
- grow by ``growth_factor`` after ``growth_interval`` clean steps, never above
  ``max_scale`` and never below ``min_scale``;
- a non-finite *loss* is a forward problem: it changes nothing here;
- NaN gradients (not inf) back the scale off too, as GradScaler does, but they are not
  counted as overflow at the minimum scale: a NaN comes from the model or the data, and a
  smaller scale cannot fix it (the run rolls back instead);
- overflow that persists ``overflow_limit`` steps at ``min_scale`` is an error naming the
  cause (``LossScaleError``), raised by ``check()`` when the trainer reads its counters.

Every update is a handful of tensor ops: no host sync. ``enabled=False`` (fp32, bf16)
makes every method a no-op so call sites never branch.
"""

from __future__ import annotations

from typing import Any

import torch

from stability.config import GuardConfig


class LossScaleError(RuntimeError):
    """Overflow persists at the minimum loss scale: fp16 cannot represent this run."""


class LossScalePolicy:
    def __init__(self, cfg: GuardConfig, device: torch.device | str, enabled: bool):
        self.cfg = cfg
        self.enabled = enabled
        device = torch.device(device)
        self.scaler = torch.amp.GradScaler(
            device.type,
            init_scale=cfg.init_scale,
            growth_factor=cfg.growth_factor,
            backoff_factor=cfg.backoff_factor,
            growth_interval=cfg.growth_interval,
            enabled=enabled,
        )
        self.scale_t = torch.full((), cfg.init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.consecutive_overflows = torch.zeros((), dtype=torch.int32, device=device)
        self.overflows_at_min = torch.zeros((), dtype=torch.int32, device=device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def update(self, overflow: torch.Tensor, loss_ok: torch.Tensor, inf: torch.Tensor | None = None) -> None:
        """Advance the state machine for one optimizer step (bool tensors, on the device)
        and hand the new scale to GradScaler, completing its per-step state. ``overflow``:
        the gradients are not finite; ``inf``: they overflowed (inf, not NaN; default: as
        ``overflow``)."""
        if not self.enabled:
            return
        c = self.cfg
        clean = loss_ok & ~overflow
        at_min = self.scale_t <= c.min_scale
        tracker = torch.where(clean, self.growth_tracker + 1, torch.where(overflow, 0, self.growth_tracker))
        grow = tracker >= c.growth_interval
        self.growth_tracker = torch.where(grow, 0, tracker).to(torch.int32)
        consecutive = torch.where(overflow, self.consecutive_overflows + 1,
                                  torch.where(clean, 0, self.consecutive_overflows))
        self.consecutive_overflows = consecutive.to(torch.int32)
        cut = overflow & (consecutive % c.overflow_patience == 0)
        factor = torch.where(grow, c.growth_factor, 1.0)
        factor = torch.where(overflow, c.backoff_factor, factor)
        factor = torch.where(cut, c.backoff_factor * c.overflow_cut, factor)
        self.scale_t = (self.scale_t * factor).clamp(c.min_scale, c.max_scale)
        inf = overflow if inf is None else inf
        stuck = torch.where(inf & at_min, self.overflows_at_min + 1,
                            torch.where(clean, 0, self.overflows_at_min))
        self.overflows_at_min = stuck.to(torch.int32)
        self.scaler.update(new_scale=self.scale_t)

    def check(self) -> None:
        """Raise LossScaleError if overflow has persisted at the minimum scale.
        Reads one device counter: a host sync, made only where the trainer logs."""
        if self.enabled and int(self.overflows_at_min) >= self.cfg.overflow_limit:  # host sync
            raise LossScaleError(
                f"fp16 gradients overflowed on {int(self.overflows_at_min)} consecutive steps at the "
                f"minimum loss scale {self.cfg.min_scale:g}: the gradients themselves exceed fp16's "
                "range, not the scaling. Use --amp-dtype bf16 (or no --mixed-precision), or lower "
                "--learning-rate / --gradient-clip."
            )

    def get_scale(self) -> float:
        """The current scale as a number (a host sync; 1.0 when disabled)."""
        return float(self.scale_t) if self.enabled else 1.0  # host sync

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "scale": self.scale_t.clone(),
            "growth_tracker": self.growth_tracker.clone(),
            "consecutive_overflows": self.consecutive_overflows.clone(),
            "overflows_at_min": self.overflows_at_min.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["enabled"]) != self.enabled:
            raise ValueError(
                f"loss-scale state was saved with scaling {'on' if state['enabled'] else 'off'} but this "
                f"run has it {'on' if self.enabled else 'off'}; resume with the same --mixed-precision "
                "and --amp-dtype"
            )
        device = self.scale_t.device
        self.scale_t = state["scale"].to(device=device, dtype=torch.float32).clone()
        self.growth_tracker = state["growth_tracker"].to(device).clone()
        self.consecutive_overflows = state["consecutive_overflows"].to(device).clone()
        self.overflows_at_min = state["overflows_at_min"].to(device).clone()
        if self.enabled:
            # GradScaler creates its scale lazily on the first scale(); seed it from ours.
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(self.scale_t)})
