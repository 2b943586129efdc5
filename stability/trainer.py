"""The training step and the state it owns.

``Trainer.train_step`` reads top to bottom:

    lr -> forward/backward over micro-batches -> unscale -> clip -> guarded step
       -> scaler update -> zero_grad(set_to_none=True) -> record

Nothing in it reads a tensor on the host: the decision to skip is a device tensor handed
to the fused optimizer, the learning rate is computed on the device from the count of
good steps, and the counters are read by the run loop every --log-every steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stability.adamw import FusedAdamW
from stability.config import GuardConfig, PlasticityConfig, TrainConfig
from stability.distributed import Dist, all_reduce_, local
from stability.faults import FaultInjector
from stability.guard import OVERFLOW, StepGuard, Verdict
from stability.plasticity import PlasticityController
from stability.scaler import LossScalePolicy
from stability.schedule import get_lr

if TYPE_CHECKING:
    from stability.diagnostics import BlockProbe

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (b l), targets (b l) with -100 masked


def on_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` (inputs, targets) on ``device``."""
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


@contextlib.contextmanager
def flushed_denormals(device: torch.device) -> Iterator[None]:
    """Subnormal floats flushed to zero while a run trains on the CPU: they run ~10x slower
    on x86 (a Transformer LM at lr 1e-4 measured 208 ms a step against 17 ms flushed), and
    values below 1.2e-38 lose nothing. The setting is process-wide, so it is put back."""
    was = bool(torch.tensor([1e-39]).mul(1.0).eq(0).item())  # torch has a setter, no getter; host value
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; targets of -100 (padding) are ignored."""
    from model.loss import logits_cross_entropy

    return logits_cross_entropy(logits, targets)


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of ``model`` on (x, y): the model's own where it has one
    (``HybridLM(x, targets=y)``, with --chunked-loss no (b l v) logits), else ``lm_loss`` of
    its logits. For the passes off the training step that back-propagate (EWC's Fisher)."""
    from model import HybridLM

    if isinstance(model, HybridLM):
        return model(x, targets=y).loss
    return lm_loss(model(x), y)


def next_token_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Evaluation's sums over one batch, on the device: the summed next-token loss (fp64),
    the targets that are the argmax, and the targets counted (-100 ignored). From the
    model's own loss where it has one (``HybridLM(x, targets=y)``: with --chunked-loss no
    (b l v) logits, which at a large vocabulary would make validation the run's peak);
    else from the logits. Call without autograd."""
    from model import HybridLM
    from model.loss import argmax_hits

    if isinstance(model, HybridLM):
        out = model(x, targets=y)
        loss, hits = out.loss, out.hits
    else:
        logits = model(x)  # b l v
        loss, hits = lm_loss(logits, y), argmax_hits(logits, y)
    count = (y != -100).sum()
    # a batch of padding only has a NaN mean (0 / 0) and adds nothing
    return torch.where(count > 0, loss.double() * count, 0.0), hits, count


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One group per block and per decay/no-decay, so meta-plasticity can scale each
    block's learning rate; biases, norms and parameters marked ``_no_weight_decay``
    (Mamba's A_log and D) are not decayed."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        block = f"blocks.{parts[1]}" if parts[0] == "blocks" else "shared"
        decay = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
        groups.setdefault((block, decay), []).append(p)
    return [
        {"params": ps, "name": block, "weight_decay": weight_decay if decay else 0.0}
        for (block, decay), ps in groups.items()
    ]


def clip_(grads: list[torch.Tensor], max_norm: torch.Tensor, norm: torch.Tensor) -> None:
    """Scale ``grads`` so their total norm is at most ``max_norm`` (a device tensor).

    ``clip_grads_with_norm_`` would do, but it calls ``float(max_norm)``: a host sync per
    step once the threshold is adaptive. This is its arithmetic, kept on the device.
    """
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)


@dataclass
class StepOutput:
    """One optimizer step; every tensor stays on the device."""

    loss: torch.Tensor  # mean micro-batch loss
    grad_norm: torch.Tensor  # total norm before clipping
    verdict: Verdict | None  # None when unguarded
    tokens: int


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        guard_cfg: GuardConfig,
        device: torch.device,
        total_steps: int,
        amp_dtype: torch.dtype | None = None,
        injector: FaultInjector | None = None,
        plasticity_cfg: PlasticityConfig | None = None,
        loss_hook: Callable[[nn.Module], torch.Tensor | None] | None = None,
        dist: Dist = Dist(),
        wrapped: nn.Module | None = None,
        probe: BlockProbe | None = None,
        kernels: str = "auto",
    ):
        """``model`` is the network every part reads (parameter groups, plasticity, state);
        ``wrapped`` what the step calls: its DDP wrapper (or, under FSDP2, itself).
        ``total_steps`` is the schedule's length (of the first task; ``start_task`` sets the
        next one's). ``loss_hook(model)`` is a penalty added to every micro-batch's loss, or
        None while it adds nothing (EWC before its first consolidation). ``probe``, armed by
        the run before a sync point, reads the step's per-block gradient norms. ``kernels``:
        where the step's scalar bookkeeping (the learning rates, the guard) runs, as
        ``StepGuard`` says: ``auto`` is one fused launch each on CUDA, torch ops elsewhere."""
        self.model, self.cfg, self.guard_cfg = model, cfg, guard_cfg
        self.dist, self.wrapped = dist, wrapped if wrapped is not None else model
        self.device, self.total_steps, self.amp_dtype = device, total_steps, amp_dtype
        self.injector, self.loss_hook, self.probe = injector, loss_hook, probe
        groups = param_groups(model, cfg.weight_decay)
        # every group's rate a view of one buffer: set on the device each step, all at once
        self._lrs = torch.zeros(len(groups), device=device)
        for g, lr in zip(groups, self._lrs.unbind(0)):
            g["lr"] = lr
        # capturable: the step a CUDA graph records reads its step counts on the device (--cuda-graphs)
        # torch's fused AdamW, every group's step counts advanced in one launch (stability/adamw.py)
        self.optimizer = FusedAdamW(groups, lr=torch.zeros((), device=device), capturable=cfg.cuda_graphs)
        self.params = [p for g in groups for p in g["params"]]
        self._grad_index: dict[tuple[int, ...], torch.Tensor] = {}  # params with a gradient -> their index
        if dist.mode == "fsdp":
            self._init_adam_state()
        # per-group learning-rate multipliers (meta-plasticity) and the rollback factor
        self.group_lr_scale = torch.ones(len(groups), device=device)
        self.lr_factor = torch.ones((), device=device)
        self.policy = LossScalePolicy(guard_cfg, device, enabled=amp_dtype == torch.float16)
        self.guard = StepGuard(guard_cfg, device, cfg.gradient_clip, window=cfg.log_every, dist=dist, kernels=kernels)
        self.lr_offset = torch.zeros((), dtype=torch.int64, device=device)  # good steps before this task
        self.step = 0  # optimizer steps taken or skipped; restored by rollback and resume
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)  # the same, where a step's kernels read it
        self.attempt = 0  # optimizer-step attempts; never goes back (fault plans key on it)
        self.generation = 0  # bumped when state is replaced, not updated in place (cuda_graphs re-captures)
        self.plasticity = None
        if plasticity_cfg is not None and (plasticity_cfg.use_stdp or plasticity_cfg.use_meta_plasticity):
            self.plasticity = PlasticityController(model, plasticity_cfg, guard_cfg, self.params,
                                                   [g["name"] for g in groups], device, injector, dist,
                                                   fused=self.guard.fused)

    def _init_adam_state(self) -> None:
        """Adam's state as its first step would create it (zeros, step 0), created now: a
        sharded checkpoint needs it to load into, and torch's own initialisation for that
        (``get_optimizer_state_dict`` on an empty optimizer) takes a real step, counted."""
        for p in self.params:
            self.optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=self.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss_in_model(self) -> bool:
        """Whether the micro-batch asks the model for its loss (``HybridLM(x, targets=y)``,
        which needs no (b l v) logits with --chunked-loss) rather than for its logits: not
        for a model without that path, nor in the forward pass whose logits a fault corrupts."""
        from model import HybridLM

        corrupted = self.injector is not None and self.injector.corrupts_output()
        return isinstance(self.model, HybridLM) and not corrupted

    def _gradient_sync(self, last: bool):
        """Gradients are reduced across ranks once per window: DDP's ``no_sync`` and FSDP2's
        ``set_requires_gradient_sync`` hold back every micro-batch but the last."""
        if self.dist.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.dist.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def start_task(self, total_steps: int) -> None:
        """A new continual-learning task: its own warm-up and schedule of ``total_steps``,
        counted from the good steps so far, and fresh loss-spike statistics (its domain
        starts at another loss level)."""
        self.lr_offset = self.guard.good_steps.clone()
        self.total_steps = total_steps
        self.guard.reset_loss_stats()
        self.generation += 1

    def set_lr_factor(self, factor: float) -> None:
        """The learning rate's multiplier from rollbacks (``Recovery.lr_factor``): recovery
        owns it, and a rollback or resume that loads an older trainer state must not undo it."""
        self.lr_factor = torch.full((), factor, device=self.device)
        self.generation += 1

    def _set_learning_rates(self) -> torch.Tensor:
        """Every group's rate for this step, on the device; returns the base rate."""
        if self.guard.fused:
            from stability import step_kernels

            c = self.cfg
            return step_kernels.learning_rates(self.guard.good_steps, self.lr_offset, self.lr_factor,
                                               self.group_lr_scale, self._lrs, c.learning_rate, c.warmup_steps,
                                               self.total_steps, c.min_lr_ratio)
        lr = self.current_lr()
        torch.mul(self.group_lr_scale, lr, out=self._lrs)
        return lr

    def current_lr(self) -> torch.Tensor:
        c = self.cfg
        base = get_lr(self.guard.good_steps - self.lr_offset, c.learning_rate, c.warmup_steps, self.total_steps,
                      c.min_lr_ratio)
        return base * self.lr_factor

    def train_step(self, batches: list[Batch]) -> StepOutput:
        """One optimizer step over ``batches`` (the micro-batches of one window)."""
        self.attempt += 1
        if self.injector:
            self.injector.begin_step(self.attempt)
        out = self.step_body(batches)
        self.step += 1
        return out

    def before_replay(self) -> None:
        """What ``train_step`` does on the host before a replayed step (``stability.cuda_graphs``)."""
        self.attempt += 1
        if self.injector:  # nothing of the plan acts now (the step would run eagerly), but its hooks must know
            self.injector.begin_step(self.attempt)

    def after_replay(self) -> None:
        """... and after it."""
        self.step += 1

    def step_body(self, batches: list[Batch]) -> StepOutput:
        """The step's work on the device, which a CUDA graph can record: no host sync, and
        every piece of state the next step reads updated in place (or, for what a step
        makes and uses itself, made anew)."""
        # 1. learning rate, on the device
        lr = self._set_learning_rates()
        # 2. forward and backward over the micro-batches
        self.model.train()
        loss_ok = torch.ones((), dtype=torch.bool, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for micro, (x, y) in enumerate(batches):
            if self.injector:
                self.injector.begin_micro(micro)
            with self._gradient_sync(last=micro == len(batches) - 1):
                with self.autocast():
                    if self._loss_in_model():  # the model's loss, without the whole logits (--chunked-loss)
                        out = self.wrapped(x, return_aux=True, targets=y)
                        loss = out.loss
                    else:
                        out = self.wrapped(x, return_aux=True)
                        loss = lm_loss(out.logits, y)
                # keep the aux (plasticity's spikes), not the (b l v) logits: the loss's graph
                # holds what the backward needs, and the logits would stay alive through it
                blocks = out.blocks
                del out
                if self.injector:
                    loss = self.injector.on_loss(loss, micro)
                penalty = self.loss_hook(self.model) if self.loss_hook is not None else None  # EWC
                total = loss if penalty is None else loss + penalty
                loss_ok &= torch.isfinite(total)  # one bad micro-batch voids the window
                self.policy.scale(total / len(batches)).backward()
            loss_sum += loss.detach()  # the language-model loss, comparable to validation
            tokens += y.numel()
        mean_loss = loss_sum / len(batches)
        if self.injector:
            self.injector.on_grads()
        # 3. unscale and measure: each parameter's gradient norm, and the total from them
        self.policy.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norms, grad_norm = self._grad_norms(grads)  # norms (p,): one per parameter, 0 without a gradient
        self.guard.observe_param_norms(norms)
        if self.plasticity is not None:
            self.plasticity.observe_norms(norms)
        if self.probe is not None and self.probe.armed:
            self.probe.observe_grads()  # per-block norms before clipping, on the device
        if not self.guard_cfg.guard:
            return self._unguarded_step(grads, grad_norm, mean_loss, tokens, blocks, lr)
        # 4. judge, clip, guarded step
        verdict = self.guard.judge(loss_ok, grad_norm, mean_loss)
        mean_loss = verdict.loss  # over every rank
        if self.guard.clips:
            clip_(grads, verdict.max_norm, grad_norm)
        self.optimizer.found_inf = verdict.skip  # the fused kernel leaves everything untouched
        self.optimizer.step()
        # 5. loss scale (the step is recorded with the scale it ran at)
        scale_used = self.policy.scale_t
        self.policy.update(verdict.overflow, verdict.loss_ok, verdict.inf)
        # 6. clean slate for the next window
        self.optimizer.zero_grad(set_to_none=True)
        # fp16 overflows belong to the scale policy, every other skip to rollback
        counts = verdict.reason != OVERFLOW if self.policy.enabled else torch.ones_like(loss_ok)
        self.guard.commit(self.step, verdict, mean_loss, grad_norm, scale_used, lr, counts, step_t=self.step_t)
        self._after_step(blocks, verdict.skip, mean_loss)
        self.step_t += 1
        return StepOutput(mean_loss, grad_norm, verdict, tokens)

    def _grad_norms(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-parameter gradient norms (p,) and their total, ``get_total_norm``'s arithmetic.
        Under FSDP2 each rank holds shards: one all-reduce of the squares gives both."""
        norms = torch.stack(torch._foreach_norm([local(g) for g in grads]))  # (p,)
        if len(grads) < len(self.params):  # an unused parameter: keep one entry per parameter
            have = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
            index = self._grad_index.get(have)
            if index is None:  # once per set of unused parameters: on a GPU, a host-to-device copy
                index = self._grad_index[have] = torch.tensor(have, device=norms.device)
            norms = norms.new_zeros(len(self.params)).index_copy_(0, index, norms)
        if self.dist.mode == "fsdp":
            squares = all_reduce_(self.dist, norms.float().square())
            return squares.sqrt(), squares.sum().sqrt()
        return norms, torch.linalg.vector_norm(norms)

    def _unguarded_step(self, grads, grad_norm, loss, tokens, blocks, lr) -> StepOutput:
        """The same step with no guard: the baseline the guard's overhead is measured
        against, and what ``--no-guard`` runs. A non-finite step corrupts the weights."""
        if self.guard.clip_norm < math.inf:  # --gradient-clip; no guard, so no spike clipping
            torch.nn.utils.clip_grads_with_norm_(self.params, self.guard.clip_norm, grad_norm, foreach=True)
        self.optimizer.found_inf = None
        self.optimizer.step()
        scale_used = self.policy.scale_t
        self.policy.update(torch.isfinite(grad_norm).logical_not(), torch.isfinite(loss))
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.record_unguarded(self.step, loss, grad_norm, scale_used, lr)
        self._after_step(blocks, None, loss)
        self.step_t += 1
        return StepOutput(loss, grad_norm, None, tokens)

    def _after_step(self, blocks, skip: torch.Tensor | None, loss: torch.Tensor) -> None:
        """Out-of-optimizer plasticity (guarded inside), and the next step's per-block
        learning-rate multipliers."""
        if self.plasticity is None:
            return
        self.plasticity.after_step(blocks, skip, loss)
        if self.plasticity.cfg.use_meta_plasticity:  # in place: the next step's rates read this tensor
            self.group_lr_scale.copy_(self.plasticity.group_lr_scale())

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Validation loss, perplexity and next-token accuracy over ``batches``."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        for x, y in batches:
            if x.shape[0] == 0:  # this rank's slice of a last, short batch
                continue
            with self.autocast():
                batch_total, batch_hits, batch_count = next_token_sums(self.model, x, y)  # FSDP2: its sharded self
            total += batch_total
            correct += batch_hits
            count += batch_count
        self.model.train()
        sums = all_reduce_(self.dist, torch.stack([total, correct.double(), count.double()]))  # over every rank
        total_f, correct_i, count_i = sums.tolist()  # host sync
        if count_i == 0:
            raise ValueError("validation produced no tokens; the validation split is empty")
        loss = total_f / count_i
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp()), "val_acc": correct_i / count_i}

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._weights_and_moments(),
            "policy": self.policy.state_dict(),
            "guard": self.guard.state_dict(),
            "group_lr_scale": self.group_lr_scale.clone(),
            "lr_factor": self.lr_factor.clone(),
            "lr_offset": self.lr_offset.clone(),
            "plasticity": self.plasticity.state_dict() if self.plasticity else None,
            "step": self.step,
            "attempt": self.attempt,
            "total_steps": self.total_steps,
        }

    def _weights_and_moments(self) -> dict[str, Any]:
        if self.dist.mode == "fsdp":  # sharded: every rank its shards (Adam's state initialised if lazy)
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            return {"model": get_model_state_dict(self.model),
                    "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a copy: Optimizer.load_state_dict keeps tensors of the right dtype and
        device by reference, so training on would mutate ``state`` (a rollback snapshot
        restored twice would come back advanced). The parameter groups keep the trainer's own
        lr tensors, on its device: a state read from disk holds CPU ones, and on a GPU each
        step's ``lr.copy_`` into those would be a host sync (the step sets their value anyway,
        from the schedule, before the optimizer reads it)."""
        own_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.dist.mode == "fsdp":  # this rank's shards, keyed by parameter name
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            set_model_state_dict(self.model, state["model"])
            set_optimizer_state_dict(self.model, self.optimizer, copy.deepcopy(state["optimizer"]))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group, lr in zip(self.optimizer.param_groups, own_lrs, strict=True):
            group["lr"] = lr
        self.policy.load_state_dict(state["policy"])
        self.guard.load_state_dict(state["guard"])
        self.group_lr_scale = state["group_lr_scale"].to(self.device).clone()
        self.lr_factor = state["lr_factor"].to(self.device).clone()
        self.lr_offset = state["lr_offset"].to(self.device).clone()
        if self.plasticity is not None:
            self.plasticity.load_state_dict(state["plasticity"])
        self.step = int(state["step"])
        self.step_t.fill_(self.step)
        self.attempt = max(self.attempt, int(state["attempt"]))
        self.total_steps = int(state["total_steps"])
        self.generation += 1
