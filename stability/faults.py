"""Fault injection, for the verification suite, for ``lsnn drill`` and for users.

A plan is a comma list of faults (``--inject-fault``):

    loss:nan@120                  the loss of step 120 becomes NaN
    loss:inf@120:1                ... only micro-batch 1 of the accumulation window
    grad:inf@50                   every gradient gets an inf after step 50's backward pass
    grad[blocks.1.mamba]:nan@30   only the gradients of parameters under that module
    activation[blocks.0]:inf@10   a forward hook corrupts that module's output at step 10
    activation:nan@10             ... the model's output, its logits
    param:nan@60                  a weight becomes NaN before step 60 (persists until rollback)
    plasticity:nan@40             the out-of-optimizer (STDP) update of step 40
    overflow@5-20                 an fp16 overflow storm: inf gradients on steps 5..20
    grad:spike@200                kinds: nan, inf, -inf, spike (multiply by 1e6), jump (by 10)
    loss:jump@80                  a finite loss spike: the loss (and its gradients) x10
    sigterm@90                    the process is sent SIGTERM before step 90 (a preemption)
    sigint@90                     ... SIGINT (Ctrl-C)
    crash@90                      the process is killed (SIGKILL) before step 90: no clean-up
    loss:nan@12#1                 under torchrun, only on rank 1 (any fault takes #RANK)

Steps count optimizer-step attempts from 1 and never go back, so a fault fires once
even when a rollback replays the steps around it. ``FaultInjector.fired`` records every
fault that fired, for tests and the drill.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from stability.distributed import local

SITES = ("loss", "grad", "activation", "param", "plasticity", "overflow", "sigterm", "sigint", "crash")
KINDS = ("nan", "inf", "-inf", "spike", "jump")
SPIKE_FACTOR = 1e6
JUMP_FACTOR = 10.0
_PROCESS_SITES = ("overflow", "sigterm", "sigint", "crash")  # no target; printed without a kind
_TARGETED = ("grad", "activation", "param")
_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

_ITEM = re.compile(
    r"^(?P<site>[a-z]+)(\[(?P<target>[\w.]+)\])?(:(?P<kind>-?[a-z]+))?"
    r"@(?P<first>\d+)(-(?P<last>\d+))?(:(?P<micro>\d+))?(#(?P<rank>\d+))?$"
)


class FaultSpecError(ValueError):
    """A malformed --inject-fault plan."""


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    first: int
    last: int
    target: str | None = None
    micro: int | None = None
    rank: int | None = None  # only on this rank (None: every rank)

    def active(self, attempt: int, micro: int | None = None) -> bool:
        in_range = self.first <= attempt <= self.last
        return in_range and (self.micro is None or micro is None or self.micro == micro)

    def __str__(self) -> str:
        where = f"[{self.target}]" if self.target else ""
        steps = f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"
        micro = f":{self.micro}" if self.micro is not None else ""
        rank = f"#{self.rank}" if self.rank is not None else ""
        if self.site in _PROCESS_SITES:
            return f"{self.site}@{steps}{rank}"
        return f"{self.site}{where}:{self.kind}@{steps}{micro}{rank}"


def parse_faults(spec: str | None, rank: int | None = None) -> list[Fault]:
    """Parse a plan; raise FaultSpecError naming --inject-fault and the bad item. With
    ``rank``, only the faults that fire on that rank."""
    if not spec:
        return []
    faults = []
    for item in (s.strip() for s in spec.split(",")):
        m = _ITEM.match(item)
        if not m:
            raise FaultSpecError(
                f"--inject-fault: cannot parse {item!r}; expected SITE[TARGET]:KIND@STEP[-STEP][:MICRO][#RANK], "
                "e.g. loss:nan@120, grad[blocks.1.mamba]:inf@30, overflow@5-20"
            )
        site, kind = m["site"], m["kind"]
        if site not in SITES:
            raise FaultSpecError(f"--inject-fault: unknown site {site!r} in {item!r}; valid: {', '.join(SITES)}")
        if site in _PROCESS_SITES:
            if kind is not None and site != "overflow":
                raise FaultSpecError(f"--inject-fault: {site} takes no kind in {item!r}; e.g. {site}@12")
            kind = kind or "inf"
        if kind not in KINDS:
            raise FaultSpecError(f"--inject-fault: unknown kind {kind!r} in {item!r}; valid: {', '.join(KINDS)}")
        if m["target"] and site not in _TARGETED:
            raise FaultSpecError(f"--inject-fault: {site} takes no [target] in {item!r}; only {', '.join(_TARGETED)}")
        first = int(m["first"])
        last = int(m["last"]) if m["last"] else first
        if first < 1 or last < first:
            raise FaultSpecError(f"--inject-fault: steps count from 1 and ranges go up, got {item!r}")
        micro = int(m["micro"]) if m["micro"] is not None else None
        on = int(m["rank"]) if m["rank"] is not None else None
        faults.append(Fault(site, kind, first, last, m["target"], micro, on))
    return [f for f in faults if rank is None or f.rank is None or f.rank == rank]


def corrupt(t: torch.Tensor, kind: str, whole: bool = False) -> torch.Tensor:
    """A corrupted copy: one element set to NaN/inf/-inf, or everything times 1e6.

    ``whole`` multiplies everything by the value instead, so the backward pass carries
    the fault too (a NaN loss that only *reads* NaN would back-propagate zeros).
    """
    if kind in ("spike", "jump"):
        return t * (SPIKE_FACTOR if kind == "spike" else JUMP_FACTOR)
    if whole:
        return t * _VALUES[kind]
    out = t.clone()
    out.view(-1)[0] = _VALUES[kind]
    return out


def corrupt_(t: torch.Tensor, kind: str) -> None:
    """Corrupt ``t`` in place (gradients and weights; of a sharded one, this rank's shard)."""
    t = local(t)
    if kind in ("spike", "jump"):
        t.mul_(SPIKE_FACTOR if kind == "spike" else JUMP_FACTOR)
    else:
        t.view(-1)[0] = _VALUES[kind]


def kill_self() -> None:
    """SIGKILL this process: what a crash or an out-of-memory kill does (tests replace it
    with an exception, to crash a run in-process)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _under(name: str, prefix: str | None) -> bool:
    return prefix is None or name == prefix or name.startswith(prefix + ".")


@dataclass
class FaultInjector:
    """Fires a plan's faults into a model's training step."""

    faults: list[Fault]
    model: nn.Module
    fired: list[tuple[int, Fault]] = field(default_factory=list)
    attempt: int = 0
    micro: int = 0

    def __post_init__(self) -> None:
        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        self._hooks = []
        for f in self.faults:
            if f.target is None:
                if f.site == "activation":  # the model's output
                    self._hooks.append(self.model.register_forward_hook(self._activation_hook(f)))
                continue
            known = modules if f.site == "activation" else {**modules, **params}
            if f.target not in known:
                examples = ", ".join(n for n in list(modules)[1:8] if n)
                raise FaultSpecError(f"--inject-fault: {f} names no module of this model; e.g. {examples}")
            if f.site == "activation":
                parent, _, child = f.target.rpartition(".")
                if child in getattr(modules.get(parent), "weights_only_children", ()):
                    raise FaultSpecError(
                        f"--inject-fault: {f}: the forward of {f.target} never runs ({parent} uses its weights "
                        f"directly), so nothing would be injected; target {parent} or another of its layers")
                self._hooks.append(modules[f.target].register_forward_hook(self._activation_hook(f)))

    def acts_at(self, attempt: int) -> bool:
        """Whether any fault of the plan acts at optimizer-step attempt ``attempt``: that step
        must run eagerly under --cuda-graphs, where a replayed graph runs no Python."""
        return any(f.active(attempt) for f in self.faults)

    def corrupts_output(self) -> bool:
        """Whether an untargeted activation fault corrupts the model's output, its logits, in
        the coming forward pass (this attempt and micro-batch): the trainer then asks the
        model for its logits, not only for its loss."""
        return any(f.site == "activation" and f.target is None and f.active(self.attempt, self.micro)
                   for f in self.faults)

    def _fire(self, fault: Fault, micro: int | None = None) -> bool:
        if fault.active(self.attempt, micro if fault.micro is not None else None):
            self.fired.append((self.attempt, fault))
            return True
        return False

    def _activation_hook(self, fault: Fault):
        def hook(module, args, output):
            if not module.training or not self._fire(fault, self.micro):
                return None
            if isinstance(output, torch.Tensor):
                return corrupt(output, fault.kind)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (corrupt(output[0], fault.kind), *output[1:])
            if dataclasses.is_dataclass(output) and isinstance(getattr(output, "logits", None), torch.Tensor):
                # a model's output with its internals (HybridOutput): the logits
                return dataclasses.replace(output, logits=corrupt(output.logits, fault.kind))
            raise FaultSpecError(f"--inject-fault: {fault}: module output is not a tensor")
        return hook

    def begin_step(self, attempt: int) -> None:
        """Called before the forward pass of optimizer-step attempt ``attempt``."""
        self.attempt, self.micro = attempt, 0
        for f in self.faults:
            if f.site in ("sigterm", "sigint") and self._fire(f):
                os.kill(os.getpid(), signal.SIGTERM if f.site == "sigterm" else signal.SIGINT)  # handled after the step
            if f.site == "crash" and self._fire(f):
                kill_self()
        for f in self.faults:
            if f.site == "param" and self._fire(f):
                with torch.no_grad():
                    name, p = next((n, p) for n, p in self.model.named_parameters() if _under(n, f.target))
                    corrupt_(p, f.kind)

    def begin_micro(self, micro: int) -> None:
        """Called before the forward pass of micro-batch ``micro`` of the window: the
        activation hooks fire in the micro-batch a fault names."""
        self.micro = micro

    def on_loss(self, loss: torch.Tensor, micro: int) -> torch.Tensor:
        self.micro = micro
        for f in self.faults:
            if f.site == "loss" and self._fire(f, micro):
                loss = corrupt(loss, f.kind, whole=True)
        return loss

    def on_grads(self) -> None:
        """Called after the backward passes, before unscaling."""
        for f in self.faults:
            if f.site in ("grad", "overflow") and self._fire(f):
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        if p.grad is not None and _under(name, f.target):
                            corrupt_(p.grad, f.kind)

    def on_plasticity(self, update: torch.Tensor) -> torch.Tensor:
        for f in self.faults:
            if f.site == "plasticity" and self._fire(f):
                update = corrupt(update, f.kind)
        return update

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
