"""The learning-rate schedule: linear warm-up, then cosine decay to a floor.

A pure function of the number of *successful* optimizer steps, so a skipped step does
not advance it. It takes and returns tensors, so the trainer evaluates it on the device
without a host sync; ``float(get_lr(torch.tensor(s), ...))`` gives a number for tests.
"""

from __future__ import annotations

import math

import torch


def get_lr(step: torch.Tensor, peak: float, warmup: int, total: int, min_ratio: float) -> torch.Tensor:
    """Learning rate for 0-based optimizer step ``step``.

    Warm-up is ``peak * (step + 1) / (warmup + 1)``: above zero from the very first step
    (the trainer this replaces sat at exactly 0 for its first epoch). After warm-up the
    rate follows a cosine from ``peak`` down to ``peak * min_ratio`` at ``total`` and
    stays there.
    """
    step = step.to(torch.float32)
    warm = peak * (step + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    progress = ((step - warmup) / span).clamp(0.0, 1.0)
    floor = peak * min_ratio
    cosine = floor + (peak - floor) * 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(step < warmup, warm, cosine)
