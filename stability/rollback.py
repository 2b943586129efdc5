"""Rollback and the stop, carried out on the run's parts.

``Recovery`` (recovery.py) decides; ``Rollbacks`` acts. It takes the snapshots; it rolls
back: quarantines the failed batches, rewinds every part through the checkpointer, lowers
the learning rate, drops the kept checkpoints taken after the target and writes the
rolled-back state; and when the run cannot go on it diagnoses the failing batch, saves the
last good state and writes report.json. Each method returns what happened to the run
loop, which decides what comes next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stability.atomic import atomic_write
from stability.checkpointer import Checkpointer
from stability.distributed import Dist, barrier, gather
from stability.recovery import (
    Recovery,
    RollbackPlan,
    StepLedger,
    Unrecoverable,
    culprit_line,
    culprit_modules,
    diagnose,
    stop_report,
)
from stability.reporting import Reporter
from stability.stream import DataStream
from stability.trainer import Trainer, lm_loss, on_device


class Rollbacks:
    def __init__(self, recovery: Recovery, ledger: StepLedger, checkpointer: Checkpointer, stream: DataStream,
                 trainer: Trainer, report: Reporter, dist: Dist = Dist()):
        self.recovery, self.ledger, self.checkpointer = recovery, ledger, checkpointer
        self.stream, self.trainer, self.report, self.dist = stream, trainer, report, dist
        name_of = {id(p): n for n, p in trainer.model.named_parameters()}
        self.param_names = [name_of[id(p)] for p in trainer.params]

    def snapshot(self, good_steps: int | None = None) -> None:
        """The run as it stands becomes the in-memory snapshot (a copy)."""
        if good_steps is None:
            good_steps = int(self.trainer.guard.good_steps)  # host sync (epoch ends, start)
        self.recovery.take(self.checkpointer.state_dict(), self.trainer.step, good_steps)

    def roll_back(self, consecutive: int, step: int) -> RollbackPlan:
        """After ``consecutive`` skipped steps up to ``step``: back to the newest good state,
        quarantining the failed batches. A plan without a target is not carried out: the run
        must stop (``plan.stop`` says why)."""
        good = None if self.recovery.exhausted() else self.checkpointer.last_good()
        plan = self.recovery.rollback(consecutive, step, self.ledger, self.trainer.policy.enabled, good)
        if plan.target is None:
            return plan
        self.stream.quarantine(plan.failed, step, plan.reason)
        self.checkpointer.rewind(plan.target.state)
        self.trainer.set_lr_factor(self.recovery.lr_factor)
        self.checkpointer.directory.drop_after(self.trainer.step)
        good_steps = int(self.trainer.guard.good_steps)  # host sync, rare
        self.recovery.take(plan.target.state, self.trainer.step, good_steps, persisted=plan.target.on_disk)
        culprits = culprit_line(culprit_modules(self.param_names, self.ledger.nonfinite))
        self.report.warn(plan.warning(self.trainer.step, self.recovery.rollbacks, self.recovery.cfg, culprits))
        # the record leaves out where the state came from (memory, or a kept checkpoint after a
        # restart): the same state either way, and a resumed run must write the same records
        self.report.record("rollback", step=step, to_step=self.trainer.step, reason=plan.reason,
                           rollbacks=self.recovery.rollbacks, failed_batches=len(plan.failed),
                           batches=[self.stream.describe(p) for p in plan.failed])
        self.checkpointer.save(keep=False)  # the rolled-back state is what a restart must continue from
        return plan

    def diagnose(self, reason: str, step: int) -> dict[str, Any]:
        """report.json's content for a stop at ``step``: the failing batch run again, watched."""
        last = self.ledger.read(step) or [self.ledger.last]
        batch = on_device(self.stream.raw(last[-1]), self.trainer.device)
        diag = diagnose(self.trainer.model, batch, lm_loss, self.trainer.autocast)
        ranks = None
        if self.dist.active:  # every rank diagnosed its own rows of the batch; rank 0 names the bad ones
            ranks = gather(self.dist, {"loss": diag.loss, "activations": diag.nonfinite_activations,
                                       "peer_skips": int(self.trainer.guard.peer_skips)})  # host sync
        return stop_report(step, reason, diag, culprit_modules(self.param_names, self.ledger.nonfinite),
                           [self.stream.describe(p) for p in last], ranks)

    def stop(self, e: Unrecoverable) -> None:
        """The run cannot go on: back to the last good state, with what recovery learnt and
        the log as it is, saved as last.pt; report.json written and the diagnosis printed."""
        report, good = e.report, self.checkpointer.last_good()
        self.report.record("stop", step=report["step"], reason=report["reason"], error=str(e))
        saved = None
        if good is not None:
            self.checkpointer.rewind(good.state)
            saved = self.checkpointer.save_last_good()
        barrier(self.dist)
        last_good_step = good.state["trainer"]["step"] if good else None
        report.update(error=str(e), last_good_checkpoint=str(saved) if saved else None, last_good_step=last_good_step)
        out: Path = self.checkpointer.directory.root.parent
        if self.dist.main:
            atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
        self.report.line(f"error: training stopped at step {report['step']}: {e}")
        for line in report["lines"]:
            self.report.line(f"  {line}")
        if saved:
            self.report.line(f"  last good state (step {last_good_step}) saved to {saved}")
        self.report.line(f"  report: {out / 'report.json'}")
