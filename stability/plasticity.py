"""STDP and meta-plasticity, applied after each optimizer step through the guard.

**STDP.** After every good step, each block's synapse weight W gets
``stdp_learning_rate * multiplier * dW``, where dW is the rule's change for the batch's
pre- and post-synaptic spike trains (``model.plasticity``). The guard runs first: a
non-finite dW is dropped, and a dW larger than ``--plasticity-max-norm`` times the
weight's norm is scaled down to that size. Either way it is counted, and a bad update
never reaches a weight. Nothing is applied on a skipped step.

**Meta-plasticity.** Every step, each block's two multipliers, m_lr (that block's
optimizer learning rate) and m_stdp (its STDP rate), move in log space by ``--meta-lr``:

- a block is *unhealthy* when its gradient norm (before clipping) is non-finite or above
  ``--band-high``; for m_stdp also when its firing rate is more than
  ``--meta-rate-tolerance`` from ``--stdp-target-rate``. An unhealthy block slows down:
  ``log m -= meta_lr``;
- a healthy block speeds up while the loss has plateaued (the fast running mean of the
  loss improves on the slow one by less than ``--meta-plateau``): ``log m += meta_lr``;
- a healthy block whose loss is still improving relaxes toward 1:
  ``log m *= 1 - meta_lr``.

The multipliers are clamped to [``--meta-min``, ``--meta-max``], and a non-finite input
never makes them non-finite. All of it runs on the device, with no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.plasticity import stdp_update
from stability.config import GuardConfig, PlasticityConfig
from stability.distributed import Dist, all_reduce_, full, is_sharded
from stability.faults import FaultInjector

_EMA_FAST, _EMA_SLOW = 0.9, 0.99
_META_WARMUP = 10  # steps of loss statistics before "plateau" means anything


class PlasticityController:
    """STDP and meta-plasticity for ``model``'s blocks. ``fused``: meta-plasticity's arithmetic
    (the loss's running means, the multipliers, each group's rate multiplier) runs as one
    Triton launch (``stability.step_kernels``) instead of about 60 torch ops on tiny tensors;
    the trainer turns it on where its guard is fused."""

    EMA_FAST, EMA_SLOW, META_WARMUP = _EMA_FAST, _EMA_SLOW, _META_WARMUP

    def __init__(self, model: nn.Module, cfg: PlasticityConfig, guard_cfg: GuardConfig, params: list[nn.Parameter],
                 group_names: list[str], device: torch.device, injector: FaultInjector | None = None,
                 dist: Dist = Dist(), fused: bool = False):
        self.cfg, self.guard_cfg, self.injector, self.dist = cfg, guard_cfg, injector, dist
        self.fused = fused and not dist.active
        self.synapses = [block.spiking.synapse.weight for block in model.blocks]
        n = len(self.synapses)
        z = lambda dtype=torch.float32: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.theta: list[torch.Tensor | None] = [  # BCM thresholds, one per post-synaptic unit
            torch.full((w.shape[0],), cfg.stdp_target_rate, device=device) if cfg.stdp_type == "bcm" else None
            for w in self.synapses]
        self.m_lr, self.m_stdp = z() + 1, z() + 1
        self.dropped, self.clipped, self.applied = z(torch.int64), z(torch.int64), z(torch.int64)
        self.block_norms = z()
        self.loss_fast = torch.zeros((), device=device)
        self.loss_slow = torch.zeros((), device=device)
        self.loss_seen = torch.zeros((), dtype=torch.int64, device=device)
        # which block each parameter and each optimizer group belongs to (n: shared)
        block_of = {id(p): _block_index(name) for name, p in model.named_parameters()}
        self._param_block = torch.tensor([n if block_of[id(p)] is None else block_of[id(p)] for p in params],
                                         device=device)
        self._group_block = torch.tensor([n if _block_index(g) is None else _block_index(g) for g in group_names],
                                         device=device)
        self._n = n

    # -- before clipping: each block's gradient norm --------------------------------------
    def observe_norms(self, norms: torch.Tensor) -> None:
        """Each block's gradient norm from the parameters' (full) gradient norms (p,)."""
        if not self.cfg.use_meta_plasticity:
            return
        squares = norms.float().square()
        per_block = torch.zeros(self._n + 1, device=squares.device).index_add_(0, self._param_block, squares)
        self.block_norms = per_block[: self._n].sqrt()

    # -- after the step --------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, blocks: Sequence[Any], skip: torch.Tensor | None, loss: torch.Tensor) -> None:
        """``blocks``: each block's aux (its spikes) from the window's last forward."""
        good = torch.ones((), device=loss.device) if skip is None else 1 - skip
        if self.cfg.use_stdp:  # sharded weights (FSDP2) take each its own rows: block by block
            sharded = any(is_sharded(w) for w in self.synapses)
            (self._stdp_blockwise if sharded else self._stdp_all)(blocks, good)
        if self.cfg.use_meta_plasticity:
            rates = all_reduce_(self.dist, torch.stack([aux.spikes.post for aux in blocks]).float().mean((1, 2, 3)),
                                "mean")  # n
            if self.fused:
                from stability import step_kernels

                self._group_scale = torch.empty(self._group_block.shape, device=rates.device)
                step_kernels.meta_plasticity(self, rates, loss, good, self._group_scale)
            else:
                self._meta(rates, loss, good > 0)

    def _stdp_blockwise(self, blocks: Sequence[Any], good: torch.Tensor) -> None:
        """Every block's STDP, one block at a time: the reference ``_stdp_all`` is tested
        against, and the path for sharded weights."""
        updates = [self._stdp_update(i, aux.spikes.pre, aux.spikes.post) for i, aux in enumerate(blocks)]
        for i, (dw, theta) in enumerate(self._mean_over_ranks(updates)):
            self._apply_stdp(i, dw, theta, good)

    def _stdp_all(self, blocks: Sequence[Any], good: torch.Tensor) -> None:
        """Every block's STDP as one batch: the blocks' spike trains stacked (n b l s), their
        changes computed, reduced over ranks, guarded and applied in a few ops, not a few a
        block (on a GPU each op is a launch). The same arithmetic as ``_apply_stdp``."""
        c = self.cfg
        pre = torch.stack([aux.spikes.pre.detach() for aux in blocks])  # n b l s
        post = torch.stack([aux.spikes.post.detach() for aux in blocks])
        bcm = c.stdp_type == "bcm"
        dw, theta = stdp_update(c.stdp_type, pre.float(), post.float(), c.stdp_tau_plus, c.stdp_tau_minus,
                                c.stdp_target_rate, torch.stack(self.theta) if bcm else None)  # (n s s), (n s)
        dw = dw * (c.stdp_learning_rate * self.m_stdp)[:, None, None]
        if self.injector is not None:  # a plasticity fault corrupts every block's change, as block by block
            dw = torch.stack([self.injector.on_plasticity(d) for d in dw.unbind(0)])
        if self.dist.active:
            parts = [dw, theta] if bcm else [dw]
            flat = all_reduce_(self.dist, torch.cat([t.reshape(-1).float() for t in parts]), "mean")
            dw, theta = flat[:dw.numel()].view_as(dw), flat[dw.numel():].view_as(theta) if bcm else None
        finite = torch.isfinite(dw).flatten(1).all(1)  # n
        safe = torch.where(finite[:, None, None], dw, torch.zeros_like(dw))  # NaN never reaches a weight
        limit = self.guard_cfg.plasticity_max_norm * torch.stack(torch._foreach_norm(
            [w.detach() for w in self.synapses]))  # n
        norm = torch.linalg.vector_norm(safe.flatten(1), dim=1)  # n
        scale = (limit / (norm + 1e-12)).clamp(max=1.0)
        delta = safe * (scale * good)[:, None, None]
        torch._foreach_add_(self.synapses, list(delta.to(self.synapses[0].dtype).unbind(0)))
        applied = (good > 0).long()
        self.dropped += (~finite).long() * applied
        self.clipped += (finite & (norm > limit)).long() * applied
        self.applied += finite.long() * applied
        if bcm:  # BCM's threshold slides only on good steps
            self.theta = list(torch.where(good > 0, theta, torch.stack(self.theta)).unbind(0))

    def _stdp_update(self, i: int, pre: torch.Tensor, post: torch.Tensor):
        """Block ``i``'s STDP change for this rank's batch (faults are injected here)."""
        c = self.cfg
        dw, theta = stdp_update(c.stdp_type, pre.detach(), post.detach(), c.stdp_tau_plus, c.stdp_tau_minus,
                                c.stdp_target_rate, self.theta[i])
        dw = dw * (c.stdp_learning_rate * self.m_stdp[i])
        if self.injector is not None:
            dw = self.injector.on_plasticity(dw)
        return dw, theta

    def _mean_over_ranks(self, updates):
        """Every rank applies the same change: the mean of the ranks' changes (and BCM
        thresholds), in one all-reduce. A NaN on one rank is a NaN on all, and is dropped."""
        if not self.dist.active:
            return updates
        parts = [t for dw, theta in updates for t in ((dw,) if theta is None else (dw, theta))]
        flat = all_reduce_(self.dist, torch.cat([t.reshape(-1).float() for t in parts]), "mean")
        out, offset = [], 0
        for dw, theta in updates:
            reduced = []
            for t in (dw, theta):
                if t is None:
                    reduced.append(None)
                    continue
                reduced.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()
            out.append(tuple(reduced))
        return out

    def _apply_stdp(self, i: int, dw: torch.Tensor, theta: torch.Tensor | None, good: torch.Tensor) -> None:
        w = self.synapses[i]
        finite = torch.isfinite(dw).all()
        safe = torch.where(finite, dw, torch.zeros_like(dw))  # NaN never reaches the weight
        limit = self.guard_cfg.plasticity_max_norm * full(w.detach().norm())
        norm = safe.norm()
        scale = (limit / (norm + 1e-12)).clamp(max=1.0)
        delta = safe * (scale * good).to(w.dtype)
        if is_sharded(w):  # every rank has the whole delta: each adds its own rows, no collective
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta, w.device_mesh, w.placements, src_data_rank=None)
        w.add_(delta)
        applied = (good > 0).long()
        self.dropped[i] += (~finite).long() * applied
        self.clipped[i] += (finite & (norm > limit)).long() * applied
        self.applied[i] += finite.long() * applied
        if theta is not None:  # BCM's threshold slides only on good steps
            self.theta[i] = torch.where(good > 0, theta, self.theta[i])

    def _meta(self, rates: torch.Tensor, loss: torch.Tensor, good: torch.Tensor) -> None:
        c, band_high = self.cfg, self.guard_cfg.band_high
        loss_ok = torch.isfinite(loss) & good
        first = self.loss_seen == 0
        value = loss.float().nan_to_num(0.0, 0.0, 0.0)
        self.loss_fast = torch.where(loss_ok, torch.where(first, value, _EMA_FAST * self.loss_fast
                                                          + (1 - _EMA_FAST) * value), self.loss_fast)
        self.loss_slow = torch.where(loss_ok, torch.where(first, value, _EMA_SLOW * self.loss_slow
                                                          + (1 - _EMA_SLOW) * value), self.loss_slow)
        self.loss_seen = self.loss_seen + loss_ok.long()
        improving = ((self.loss_slow - self.loss_fast) > c.meta_plateau * self.loss_slow.abs()) | (
            self.loss_seen < _META_WARMUP)
        grad_bad = ~torch.isfinite(self.block_norms) | (self.block_norms > band_high)
        rate_bad = ~torch.isfinite(rates) | ((rates - c.stdp_target_rate).abs() > c.meta_rate_tolerance)
        self.m_lr = self._move(self.m_lr, grad_bad, improving)
        self.m_stdp = self._move(self.m_stdp, grad_bad | rate_bad, improving)

    def _move(self, m: torch.Tensor, bad: torch.Tensor, improving: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        log_m = m.log()
        moved = torch.where(bad, log_m - c.meta_lr, torch.where(improving, log_m * (1 - c.meta_lr), log_m + c.meta_lr))
        return moved.clamp(math.log(c.meta_min), math.log(c.meta_max)).exp()

    def group_lr_scale(self) -> torch.Tensor:
        """The learning-rate multiplier of each optimizer group (shared groups: 1)."""
        if self.fused:  # the kernel made it with the multipliers
            return self._group_scale
        return torch.cat([self.m_lr, torch.ones(1, device=self.m_lr.device)])[self._group_block]

    # -- state -----------------------------------------------------------------------------
    def read(self) -> dict[str, list]:
        """Counters and multipliers as Python values (one host sync, at sync points)."""
        flat = torch.cat([self.dropped.double(), self.clipped.double(), self.applied.double(),
                          self.m_lr.double(), self.m_stdp.double()]).tolist()  # host sync
        n = self._n
        return {"dropped": flat[:n], "clipped": flat[n:2 * n], "applied": flat[2 * n:3 * n],
                "lr_multiplier": flat[3 * n:4 * n], "stdp_multiplier": flat[4 * n:]}

    _STATE = ("m_lr", "m_stdp", "dropped", "clipped", "applied", "loss_fast", "loss_slow", "loss_seen")

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k).clone() for k in self._STATE}
        state["theta"] = [None if t is None else t.clone() for t in self.theta]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.m_lr.device
        for k in self._STATE:
            setattr(self, k, state[k].to(device).clone())
        self.theta = [None if t is None else t.to(device).clone() for t in state["theta"]]


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None
