"""``lsnn drill``: rehearse failure before a two-day job.

Trains the given configuration for a few dozen steps, once clean (the control) and once
per fault of a standard battery, and prints a table: the fault, whether the guard
detected it, the steps it skipped, rollbacks, whether the run recovered, how many steps
that took, and the final validation loss against the control's. Exits 1 if any fault
was not survived.
"""

from __future__ import annotations

import io
import math
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from stability.config import RunSpec
from stability.distributed import Dist, barrier, broadcast
from stability.faults import Fault, parse_faults
from stability.reporting import read_records
from stability.run import EXIT_OK, EXIT_TERMINATED, Run

# Tiny sizes for `--tiny`: the phase's layout and features, at a fraction of the cost.
TINY = dict(hidden_dim=32, num_layers=2, liquid_units=16, spiking_units=8, liquid_backbone_units=16,
            mamba_d_state=4, mlp_ratio=2, num_gate_heads=2, cross_attn_heads=2)
TINY_TRAIN = dict(batch_size=4, sequence_length=32, tokenizer="byte", eval_batches=8)


def battery(at: int, plasticity: bool, preemption: bool = False) -> list[str]:
    """The standard battery, every fault starting at step ``at``; ``preemption`` adds a
    SIGTERM and a resume (only where this thread can handle the signal)."""
    faults = [
        f"loss:nan@{at}", f"loss:inf@{at}", f"loss:-inf@{at}", f"loss:spike@{at}", f"loss:jump@{at}",
        f"grad:nan@{at}", f"grad:inf@{at}", f"grad[blocks.0]:-inf@{at}", f"grad:spike@{at}",
        f"activation[blocks.0]:nan@{at}", f"activation[blocks.0]:inf@{at}",
        f"param:nan@{at}", f"overflow@{at}-{at + 4}",
    ]
    if plasticity:
        faults += [f"plasticity:nan@{at}", f"plasticity:spike@{at}"]
    if preemption:
        faults.append(f"sigterm@{at}")
    return faults


@dataclass
class Outcome:
    fault: str
    code: int
    detected: bool
    skipped: int
    rollbacks: int
    steps_to_recover: int | None
    final_loss: float
    recovered: bool = False


def _fit(spec: RunSpec, stream: io.StringIO, d: Dist) -> int:
    job = Run(spec, stream, d)
    job.setup()
    return job.fit()


def _run(spec: RunSpec, out: Path, fault: str | None, d: Dist) -> tuple[int, list[dict[str, Any]], str]:
    """Train under ``fault``; a preemption (SIGTERM, exit 143) is resumed as a user would.
    Under torchrun every rank trains and rank 0's records are read (after a barrier)."""
    spec = replace(spec, guard=replace(spec.guard, inject_fault=fault),
                   train=replace(spec.train, output_dir=str(out), resume=False, progress="lines", report=False))
    stream = io.StringIO()
    code = _fit(spec, stream, d)
    preempted = code == EXIT_TERMINATED and fault is not None and fault.startswith("sigterm@")
    if preempted:
        stream.write("--- resumed ---\n")
        code = _fit(replace(spec, guard=replace(spec.guard, inject_fault=None),
                            train=replace(spec.train, resume=True)), stream, d)
    barrier(d)
    recs = broadcast(d, read_records(out / "metrics.jsonl") if d.main else None)
    return code, [{"kind": "preempted"}] * preempted + recs, stream.getvalue()


def _outcome(fault: str, code: int, recs: list[dict[str, Any]]) -> Outcome:
    first = min(f.first for f in parse_faults(fault))
    skips = [r for r in recs if r["kind"] == "skip"]
    rollbacks = [r for r in recs if r["kind"] == "rollback"]
    steps = [r for r in recs if r["kind"] == "step"]
    clipped = steps[-1].get("spikes_clipped", 0) if steps else 0
    plasticity = steps[-1].get("plasticity") if steps else None
    if plasticity:  # STDP updates the guard dropped (non-finite) or scaled down (oversized)
        clipped += sum(plasticity["dropped"]) + sum(plasticity["clipped"])
    epochs = [r for r in recs if r["kind"] == "epoch"]
    final = epochs[-1]["val_loss"] if epochs else math.nan
    preempted = any(r["kind"] == "preempted" for r in recs)  # stopped, saved, resumed
    detected = bool(skips or rollbacks or clipped or preempted)
    to_recover = None
    if skips:
        # steps lost to the fault: the skipped ones and those replayed after a rollback
        later_skips = sorted(s["step"] for s in skips if s["step"] >= first)
        run_end = first
        for s in later_skips:
            if s == run_end:
                run_end += 1
        to_recover = run_end - first + sum(r["step"] - r["to_step"] for r in rollbacks)  # skipped + replayed
    elif clipped or preempted:
        to_recover = 0
    return Outcome(fault, code, detected, len(skips), len(rollbacks), to_recover, float(final))


def drill(spec: RunSpec, stream: TextIO, tolerance: float = 0.25, keep: Path | None = None, dist: Dist = Dist()) -> int:
    """Run the battery; print the table to ``stream`` (rank 0's); return 0 if every fault
    was survived. Under torchrun every rank runs it, in the same directories."""
    if not dist.main:
        stream = io.StringIO()
    steps = spec.train.max_steps or 40
    at = max(steps // 4, 2)
    # detect fast in a short run: sync every 2 steps, roll back after 3 skips, and arm the
    # spike statistics before the faults start
    spec = replace(spec, train=replace(spec.train, max_steps=steps, log_every=min(spec.train.log_every, 2)),
                   guard=replace(spec.guard, rollback_after=min(spec.guard.rollback_after, 3),
                                 snapshot_every=min(spec.guard.snapshot_every, 4),
                                 spike_warmup=max(1, min(spec.guard.spike_warmup, at - 2)),
                                 loss_spike_warmup=max(1, min(spec.guard.loss_spike_warmup, at - 2))))
    plasticity = spec.plasticity.use_stdp
    with tempfile.TemporaryDirectory(prefix="lsnn-drill-") as tmp:
        root = keep or Path(broadcast(dist, tmp))  # rank 0's directory for every rank
        faults = battery(at, plasticity, threading.current_thread() is threading.main_thread())  # signals: main
        _say(stream, f"drill: {len(faults) + 1} runs of {steps} steps: a clean control, then one per fault")
        code, recs, text = _run(spec, root / "control", None, dist)
        if code != EXIT_OK:
            stream.write(text)
            stream.write("drill: the clean control run failed; fix the configuration first\n")
            return 1
        control = [r for r in recs if r["kind"] == "epoch"][-1]["val_loss"]
        _say(stream, f"drill: 1/{len(faults) + 1} control: final loss {control:.4f}")
        outcomes = []
        for i, fault in enumerate(faults):
            code, recs, text = _run(spec, root / f"fault{i}", fault, dist)
            o = _outcome(fault, code, recs)
            o.recovered = (code == EXIT_OK and o.detected and math.isfinite(o.final_loss)
                           and o.final_loss - control <= tolerance * max(1.0, abs(control)))
            if not o.recovered:
                stream.write(f"--- output of the run with {fault} ---\n{text[-3000:]}\n")
            _say(stream, f"drill: {i + 2}/{len(faults) + 1} {fault}: {'survived' if o.recovered else 'NOT survived'}")
            outcomes.append(o)
    _table(stream, control, outcomes, steps)
    failed = [o.fault for o in outcomes if not o.recovered]
    if failed:
        stream.write(f"drill: {len(failed)} fault(s) not survived: {', '.join(failed)}\n")
        return 1
    stream.write(f"drill: all {len(outcomes)} faults survived\n")
    return 0


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def _table(stream: TextIO, control: float, outcomes: list[Outcome], steps: int) -> None:
    head = f"{'fault':<30} {'detected':>8} {'skipped':>7} {'rollbacks':>9} {'recovered':>9} " \
           f"{'steps to recover':>16} {'final loss':>10} {'vs control':>10}"
    stream.write(f"drill: {steps} steps per run\n{head}\n{'-' * len(head)}\n")
    stream.write(f"{'none (control)':<30} {'-':>8} {0:>7} {0:>9} {'yes':>9} {'-':>16} {control:>10.4f} "
                 f"{0.0:>+10.4f}\n")
    for o in outcomes:
        rec = "-" if o.steps_to_recover is None else str(o.steps_to_recover)
        stream.write(f"{o.fault:<30} {'yes' if o.detected else 'NO':>8} {o.skipped:>7} {o.rollbacks:>9} "
                     f"{'yes' if o.recovered else 'NO':>9} {rec:>16} {o.final_loss:>10.4f} "
                     f"{o.final_loss - control:>+10.4f}\n")


__all__ = ["Fault", "battery", "drill"]
