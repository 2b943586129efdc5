"""torch's fused AdamW, with every parameter group's step counts advanced at once.

torch's fused step, for each parameter group, adds 1 to the group's step counts, runs the
fused kernel and, when the step is skipped (``found_inf``, the guard's verdict), subtracts
the 1 again: three launches a group. lsnn makes two groups a block (meta-plasticity scales
each block's rate), so at phase 3 that was 30 launches of a GPU step. ``FusedAdamW`` adds 1
to every group's counts and subtracts ``found_inf`` from them, in one launch each, before the
groups' kernels: a skipped step's kernel changes nothing whatever count it reads, and after
the step every count, moment and weight is what torch's step leaves. One launch a group, two
a step. ``tests/stability/test_adamw.py`` checks it against torch's step, bit for bit.

It is torch's ``AdamW`` in everything else (state, state dicts, lazy initialisation by
torch's own ``_init_group``), so checkpoints written by either load into the other.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(..., fused=True)`` with two launches for every group's step counts."""

    def __init__(self, params, **kwargs) -> None:
        if kwargs.pop("fused", True) is not True:
            raise ValueError("FusedAdamW is the fused AdamW; use torch.optim.AdamW for another")
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("FusedAdamW.step takes no closure")
        self._accelerator_graph_capture_health_check()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        work = []
        for group in self.param_groups:
            lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
            self._init_group(group, *lists)  # torch's: the lazy state, the gradients
            if lists[0]:
                work.append((group, lists))
        steps = [s for _, lists in work for s in lists[5]]
        if not steps:
            return None
        torch._foreach_add_(steps, 1)
        if found_inf is not None:  # a skipped step's counts stay as they were (a list: no host sync)
            torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
        for group, lists in work:
            beta1, beta2 = group["betas"]
            grouped = Optimizer._group_tensors_by_device_and_dtype(list(lists))  # type: ignore[arg-type]
            for (device, _), (tensors, _) in grouped.items():
                torch._fused_adamw_(
                    *tensors, amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    grad_scale=None if grad_scale is None else grad_scale.to(device),
                    found_inf=None if found_inf is None else found_inf.to(device))
        return None
