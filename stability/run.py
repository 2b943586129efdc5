"""A whole training run: the loop, its sync points, its signals, and the parts it drives.

Every optimizer step of the loop reads top to bottom:

    window = stream.next_window()      the micro-batches of the step (the stream owns the position)
    due = self._due(window)            whether the step ends at a sync point: decided once, before it
    trainer.train_step(batches)        no host sync
    stream.advance(window)             the position moves past them
    sync point, when one is due        one host read of the guard's counters; may roll back
    checkpoint, when one is due        it always records "the next batch to read"
    epoch and task ends                reported by the window, so a rollback voids them

A *sync point* (every --log-every steps, at every checkpoint and every epoch end) reads the
guard's device counters in one transfer and acts on them: a step line, a warning per
skipped step, a rollback after K consecutive skips, a stop with a diagnosis after R.

Each part keeps its own state, and the run writes none of it: the trainer (trainer.py),
the data stream (stream.py), the monitor (monitor.py), the step ledger and recovery
(recovery.py) and the tasks with their epochs (tasks.py). The checkpointer
(checkpointer.py) saves and restores each part's state, so a run killed at any moment and
resumed with --resume continues exactly as if it had never stopped. What can be checked
before anything is built is checked in preflight.py.

Exit codes: 0 done, 2 bad input (nothing written), 3 instability that could not be
recovered (diagnosis printed, last good state saved), 4 finished but the last checkpoint
could not be written (the one before is intact), 130 interrupted by SIGINT (Ctrl-C) and
143 by SIGTERM (preemption): the state is saved, --resume continues it.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
from dataclasses import replace
from typing import Any, NamedTuple, TextIO

import torch

from model import HybridLM
from stability.artifacts import write_run_config
from stability.checkpointer import Checkpointer, load_for_resume
from stability.config import RunSpec
from stability.continual import EWC, ReplayBuffer
from stability.cuda_graphs import GraphedSteps
from stability.data import DataError
from stability.diagnostics import BlockProbe
from stability.distributed import Dist, agreed_signal, barrier, main_first, wrap
from stability.faults import FaultInjector
from stability.healthreport import draw_report
from stability.monitor import Monitor
from stability.preflight import BadInput, check_resume, check_run, clear_run
from stability.recovery import Recovery, StepLedger, Unrecoverable
from stability.reporting import Reporter
from stability.rollback import Rollbacks
from stability.scaler import LossScaleError
from stability.stream import DataStream, TaskData, Window, prepare_data
from stability.tasks import Tasks, horizon
from stability.tokenizers import save_tokenizer
from stability.trainer import Trainer, flushed_denormals, on_device

EXIT_OK, EXIT_BAD_INPUT, EXIT_UNRECOVERABLE, EXIT_UNSAVED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 4, 130, 143
_EXIT_ON = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}
_PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}


class Due(NamedTuple):
    """What the step that reads a window ends at."""

    log: bool  # a --log-every step
    periodic: bool  # a --checkpoint-every step
    boundary: bool  # an epoch (and maybe a task) ends
    budget: bool  # --max-steps is spent (per task with --continual-learning)

    @property
    def sync(self) -> bool:
        return any(self)


class Run:
    def __init__(self, spec: RunSpec, stream: TextIO | None = None, dist: Dist = Dist()):
        self.spec, self.dist = spec, dist
        self.stream_out = (stream or sys.stdout) if dist.main else io.StringIO()  # rank 0 speaks
        self.stop_signal: int | None = None
        self._done = False
        self._healthy = True  # the last sync point saw no skipped step

    # set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        spec, t, d = self.spec, self.spec.train, self.dist
        checked = check_run(spec, d)  # exit 2 for what is wrong, before anything is built or written
        self.device, self.amp_dtype, self.checkpoints = checked.device, checked.amp_dtype, checked.checkpoints
        self.out = self.checkpoints.root.parent
        # rank 0 prepares the corpus into the cache (tokenizer, shards); the others then map them
        self.tokenizer, corpus, tasks = main_first(d, lambda: prepare_data(spec, self._say), (DataError, BadInput))
        self.fingerprint, self.data_summary = corpus.fingerprint(), corpus.summary()
        self.spec = spec = replace(spec, model=replace(spec.model, vocab_size=self.tokenizer.vocab_size))
        resumed = load_for_resume(self.checkpoints, self._say) if t.resume else None
        if resumed is not None:
            check_resume(resumed[0], spec, self.fingerprint, d.world)
        self._build(tasks, checked.faults)
        if d.main:
            if t.overwrite:
                clear_run(self.out, checked.used)
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(d)
        if resumed is not None:
            self.checkpointer.resume(*resumed)
            self.trainer.set_lr_factor(self.recovery.lr_factor)
        if d.main:  # lsnn sample / eval / export read them
            tok = {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size}
            write_run_config(self.out, spec, tokenizer=tok, tasks=[x.name for x in tasks], corpus=self.fingerprint,
                             data=self.data_summary,  # the prepared corpus: where, from what, the tokenizer's sample
                             device=str(self.device), precision=_PRECISION[self.amp_dtype],
                             distributed={"mode": d.mode, "world": d.world})
            save_tokenizer(self.tokenizer, self.out)
        barrier(d)

    def _build(self, tasks: list[TaskData], faults: list) -> None:
        """The model and the parts of the run, each with the state it owns."""
        spec, t, c, d = self.spec, self.spec.train, self.spec.continual, self.dist
        torch.manual_seed(t.seed)  # every rank builds the same model
        self.model = HybridLM(spec.model).to(self.device)
        injector = FaultInjector(faults, self.model) if faults else None
        wrapped = wrap(d, self.model, self.device, self.amp_dtype)
        if d.active:
            torch.manual_seed(t.seed + 1_000_003 * d.rank)  # and draws its own dropout masks
        ewc = EWC(self.model, c.consolidation_strength, d) if c.continual_learning else None
        self.probe = BlockProbe(self.model, d)
        self.trainer = Trainer(self.model, t, spec.guard, self.device, horizon(spec, tasks, 0), self.amp_dtype,
                               injector, spec.plasticity, dist=d, wrapped=wrapped, probe=self.probe,
                               loss_hook=ewc.penalty if ewc is not None and ewc.strength > 0 else None)
        self.stepper = GraphedSteps(self.trainer) if t.cuda_graphs else self.trainer
        replay = ReplayBuffer(c.replay_buffer_size, c.replay_strategy, t.seed + d.rank) if c.use_replay else None
        self.stream = DataStream(tasks, t.epochs, t.gradient_accumulation_steps, replay, c.replay_fraction,
                                 d.rank, d.world)
        self.report = Reporter(self.out if d.main else None, self.stream_out, t.progress if d.main else "lines",
                               tensorboard=t.tensorboard)
        self.monitor = Monitor(self.report, spec.guard, t.gradient_clip, t.log_every, 0)
        self.ledger = StepLedger(spec.guard.rollback_after + 2 * t.log_every)
        self.recovery = Recovery(spec.guard)
        self.tasks = Tasks(spec, self.trainer, self.stream, self.monitor, self.report, ewc, d)
        self.checkpointer = Checkpointer(self.checkpoints, self.report, d, trainer=self.trainer, stream=self.stream,
                                         monitor=self.monitor, ledger=self.ledger, recovery=self.recovery,
                                         tasks=self.tasks, run=self)
        self.rollbacks = Rollbacks(self.recovery, self.ledger, self.checkpointer, self.stream, self.trainer,
                                   self.report, d)

    def _say(self, text: str) -> None:
        """A line before the reporter exists (set-up), from rank 0."""
        self.stream_out.write(text + "\n")
        self.stream_out.flush()

    # the run's own state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the run was started with (``check_resume`` compares it), whether the last
        sync point was healthy, and how much of metrics.jsonl is written."""
        return {"config": self.spec.to_dict(), "corpus": self.fingerprint, "healthy": self._healthy,
                "metrics_offset": self.report.offset()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._healthy = state["healthy"]
        self.report.truncate_to(state["metrics_offset"])

    # the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        try:
            return self._fit()
        finally:
            self.report.close()  # the bar, and the TensorBoard files

    def _fit(self) -> int:
        self._announce()
        if not self.spec.train.resume:
            self.rollbacks.snapshot()  # step 0; a resumed run restores the snapshot schedule instead
        main = threading.current_thread() is threading.main_thread()  # only it may install handlers
        previous = {s: signal.signal(s, self._on_signal) for s in _EXIT_ON} if main else {}
        try:
            with flushed_denormals(self.device):
                code = self._loop()
        except Unrecoverable as e:
            self.rollbacks.stop(e)
            self._draw_report()
            return EXIT_UNRECOVERABLE
        except KeyboardInterrupt:  # a second Ctrl-C during a step: stop now, keep the last checkpoint
            self.report.line(f"interrupted twice at step {self.trainer.step}: stopped without saving; "
                             f"{self.checkpoints.last} is intact")
            return EXIT_INTERRUPTED
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code if code is not None else self._finish()

    def _finish(self) -> int:
        """The end: never "done" with weights that are not finite or a last state unsaved."""
        saver = self.checkpointer
        if not saver.weights_finite:
            self.report.record("stop", step=self.trainer.step, reason="nonfinite_weights",
                               error="the weights are not finite at the end of the run")
            self.report.line(f"error: the weights are not finite at the end of the run (step {self.trainer.step}); "
                             f"the last checkpoint with finite weights is step {saver.saved_step} in "
                             f"{self.checkpoints.root}. With --no-guard nothing stops a bad step: drop it")
            return EXIT_UNRECOVERABLE
        if saver.unsaved is not None and not saver.save(keep=self._healthy):  # one more try
            self.report.line(f"error: training finished but its last checkpoint could not be written "
                             f"({saver.unsaved}); {self.checkpoints.root} holds step {saver.saved_step}. Free some "
                             "space and run the same command with --resume to redo the steps since")
            return EXIT_UNSAVED
        self._draw_report()
        self.report.line(f"done: {self.trainer.step} steps; checkpoints in {self.checkpoints.root}")
        return EXIT_OK

    def _draw_report(self) -> None:
        """report.png and report.html from metrics.jsonl (rank 0; --no-report skips it)."""
        if self.spec.train.report and self.dist.main:
            draw_report(self.out, self.report)

    def _loop(self) -> int | None:
        """Train until the data or the budget ends; an exit code if a signal stopped it."""
        while not (self._done or self.stream.finished):
            window = self.stream.next_window()
            due = self._due(window)
            if window.positions:  # every batch left may be quarantined
                if due.sync:
                    self.probe.arm()  # the blocks record of the sync point: hooks for this step only
                self._train(window)
            self.stream.advance(window)
            if due.sync and self._sync():  # rolled back: the window's epoch and task ends never happened
                if self._stop_agreed(True):
                    return self._interrupted()
                continue
            if due.boundary or due.budget:
                self._boundary(window, due.budget)
            elif due.periodic:
                self.checkpointer.save(keep=self._healthy)
            if self._stop_agreed(due.sync):
                return self._interrupted()
        return None

    def _due(self, window: Window) -> Due:
        """The one sync-point test, made before the step that reads ``window``."""
        t = self.spec.train
        stepped = bool(window.positions)
        step = self.trainer.step + stepped
        finishes = window.after.task >= len(self.stream.tasks)  # then the window's task end is the boundary
        return Due(log=stepped and step % t.log_every == 0,
                   periodic=stepped and t.checkpoint_every > 0 and step % t.checkpoint_every == 0,
                   boundary=window.epoch_end is not None, budget=not finishes and self.tasks.budget_spent(step))

    def _stop_agreed(self, sync_point: bool) -> bool:
        """Whether to stop for a signal now: at once with one process; under torchrun at
        the next sync point, when every rank learns whether any rank got one, so all stop
        at the same step and none is left waiting in a collective."""
        if self.dist.active and not sync_point:
            return False
        self.stop_signal = agreed_signal(self.dist, self.stop_signal)
        return self.stop_signal is not None

    def _train(self, window: Window) -> None:
        out = self.stepper.train_step([on_device(b, self.device) for b in self.stream.batches(window)])
        self.ledger.record(self.trainer.step, window.positions)
        self.monitor.add_tokens(out.tokens)
        last = self.ledger.last
        self.report.progress(self.trainer.step - self.tasks.start_step, self.trainer.total_steps,
                             f"task {last.task + 1} epoch {last.epoch + 1}")

    # sync points --------------------------------------------------------------------------
    def _sync(self) -> bool:
        """Read the device counters (one host sync) and act on them; True if it rolled back."""
        step = self.trainer.step
        blocks = self.probe.take()  # disarms: no hook outlives the armed step
        if step == self.monitor.last_sync_step:
            return False
        counters = self.trainer.guard.read(extra=blocks)  # host sync, the probe's values included
        rows = self.monitor.rows(counters["history"], step)
        self.ledger.settle(rows)
        plasticity = self.trainer.plasticity.read() if self.trainer.plasticity is not None else None  # host sync
        self.monitor.sync(rows, step, self.ledger.last, counters,
                          lambda s: [self.stream.describe(p) for p in self.ledger.read(s)], plasticity)
        if blocks is not None:
            self.report.record("blocks", step=step, **self.probe.fields(counters["extra"]))
        try:
            self.trainer.policy.check()
        except LossScaleError as e:
            raise Unrecoverable(str(e), self.rollbacks.diagnose("overflow", step)) from e
        self._healthy = counters["consecutive_skips"] == 0 and all(r["reason"] == "ok" for r in rows)
        self.ledger.observe(self._healthy, counters["bad_params"])
        if self.recovery.needs_rollback(counters["consecutive_skips"]):
            plan = self.rollbacks.roll_back(counters["consecutive_skips"], step)
            if plan.target is None:
                raise Unrecoverable(plan.stop, self.rollbacks.diagnose(plan.reason, step))
            return True
        if self._healthy and self.recovery.due(counters["good_steps"]):
            self.rollbacks.snapshot(counters["good_steps"])
        return False

    def _boundary(self, window: Window, budget: bool) -> None:
        """An epoch or a task ended, or the --max-steps budget: the tasks' summaries and
        starts, then a checkpoint (and, if healthy, a snapshot) of it all."""
        val, self._done = self.tasks.boundary(window, budget, self.ledger.last)
        if not self.checkpointer.save(keep=self._healthy):
            return  # weights are non-finite: recovery will roll back; no snapshot of this
        if self.tasks.improved(val):
            self.checkpoints.mark_best()
        if self._healthy:
            self.rollbacks.snapshot()

    # interrupts ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            return
        if self.checkpointer.saving:  # never abandon a checkpoint half-way
            self.report.line("still saving the checkpoint; it finishes in a moment")
            return
        raise KeyboardInterrupt  # a second signal during a step stops at once

    def _interrupted(self) -> int:
        self.checkpointer.save(keep=False)  # with the unlogged window, so the resumed run logs it as if never stopped
        name = signal.Signals(self.stop_signal).name
        self.report.line(f"{name} at step {self.trainer.step}: saved {self.checkpoints.last}; "
                         "continue with the same command and --resume")
        return _EXIT_ON[self.stop_signal]

    def _announce(self) -> None:
        counts = self.model.parameter_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
        t, p, c, data = self.spec.train, self.spec.plasticity, self.spec.continual, self.stream.tasks
        self.report.line(f"lsnn: {counts['total']:,} parameters ({parts})")
        self.report.line(
            f"data: {sum(len(x.train) for x in data)} batches/epoch of {t.batch_size}x{t.sequence_length} "
            f"tokens, tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size}), device {self.device}, "
            f"precision {_PRECISION[self.amp_dtype]}, output {self.out}")
        if c.continual_learning:
            names = "; ".join(task.name for task in data)
            ewc = f"EWC {c.consolidation_strength:g}" if c.consolidation_strength > 0 else "no EWC"
            replay = f"replay {c.replay_strategy} ({c.replay_buffer_size})" if c.use_replay else "no replay"
            self.report.line(f"tasks: {names}; {ewc}, {replay}")
        if p.use_stdp or p.use_meta_plasticity:
            self.report.line(f"plasticity: {'STDP ' + p.stdp_type if p.use_stdp else 'no STDP'}, "
                             f"{'meta-plasticity' if p.use_meta_plasticity else 'no meta-plasticity'}")
        if t.resume:
            pos = self.stream.position
            self.report.line(f"resumed from {self.checkpoints.last} at step {self.trainer.step} (task {pos.task + 1}, "
                             f"epoch {pos.epoch + 1}, batch {pos.index}); {self.recovery.rollbacks} rollbacks so far, "
                             f"{len(self.stream.quarantined)} batches quarantined")


__all__ = ["BadInput", "Run", "Unrecoverable"]
