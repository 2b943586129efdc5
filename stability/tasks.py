"""The run's tasks and their epochs: what happens where one ends, and each task's schedule.

An epoch's end validates and prints its summary, once. With --continual-learning a task's
end consolidates EWC, scores the replay buffer and evaluates every task for the task
matrix; the next task starts with its own warm-up and cosine schedule (its horizon: its
epochs, capped by --max-steps, which is then a budget per task). ``Tasks`` keeps the task
matrix, EWC, the step the current task started at and the best validation loss, and saves
them as one part of the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

from stability.config import RunSpec
from stability.continual import EWC, format_matrix, per_sequence_loss, transfer, windows_per_pass
from stability.distributed import Dist
from stability.monitor import Monitor
from stability.reporting import Reporter
from stability.stream import DataStream, Position, TaskData, Window
from stability.trainer import Batch, Trainer, model_loss, on_device


def horizon(spec: RunSpec, tasks: list[TaskData], task: int) -> int:
    """The schedule's length for ``task``: its epochs (all tasks' without
    --continual-learning), capped by --max-steps."""
    t = spec.train
    per_task = spec.continual.continual_learning
    batches = len(tasks[task].train) if per_task else sum(len(x.train) for x in tasks)
    steps = max(batches // t.gradient_accumulation_steps * t.epochs, 1)
    return min(steps, t.max_steps) if t.max_steps else steps


class Tasks:
    def __init__(self, spec: RunSpec, trainer: Trainer, stream: DataStream, monitor: Monitor, report: Reporter,
                 ewc: EWC | None, dist: Dist = Dist()):
        self.spec, self.trainer, self.stream, self.monitor, self.report = spec, trainer, stream, monitor, report
        self.ewc, self.dist = ewc, dist
        self.matrix: list[list[float]] = []  # validation loss on task j after task i
        self.start_step = 0  # the step the current task started at
        self.best_val = math.inf

    @property
    def data(self) -> list[TaskData]:
        return self.stream.tasks

    def budget_spent(self, step: int) -> bool:
        """Whether --max-steps (per task with --continual-learning) is used up at ``step``."""
        t = self.spec.train
        used = step - (self.start_step if self.spec.continual.continual_learning else 0)
        return bool(t.max_steps) and used >= t.max_steps

    def boundary(self, window: Window, budget: bool, last: Position) -> tuple[float, bool]:
        """An epoch or a task ended (as ``window`` says), or the --max-steps ``budget``:
        summaries, the task's end, the next task's start. Returns the validation loss
        (inf without a summary) and whether the run is done (the budget ended it: the
        position stays where it was, so --resume with more steps continues)."""
        continual = self.spec.continual.continual_learning
        val = math.inf
        if window.epoch_end is not None:
            val = self._end_epoch(*window.epoch_end, complete=True)
        elif self.monitor.totals.steps:  # the budget cut the epoch short
            val = self._end_epoch(last.task, last.epoch, complete=False)
        ended = window.task_end if window.task_end is not None else (last.task if budget else None)
        if ended is not None and continual:
            self._end_task(ended)
        done = False
        if budget and continual and ended + 1 < len(self.data):
            self.stream.start_task(ended + 1)
        elif budget:
            done = True
        if (window.task_end is not None or budget) and not (done or self.stream.finished):
            self._start_task()
        return val, done

    def improved(self, val: float) -> bool:
        """Whether ``val`` is the best validation loss so far (it becomes the best)."""
        if val >= self.best_val:
            return False
        self.best_val = val
        return True

    def _end_epoch(self, task_i: int, epoch_i: int, complete: bool) -> float:
        """Validate and print the epoch's summary, once; returns the validation loss."""
        task = self.data[task_i]
        metrics = self.trainer.evaluate(self._val_batches(task))
        totals = self.monitor.totals
        skipped = sum(totals.skips.values())
        label = f"epoch {epoch_i + 1}/{self.spec.train.epochs}" + ("" if complete else " (stopped at --max-steps)")
        if len(self.data) > 1:
            label = f"task {task_i + 1}/{len(self.data)} {label}"
        text = (f"{label}: train_loss={totals.train_loss:.4f} val_loss={metrics['val_loss']:.4f} "
                f"val_ppl={metrics['val_ppl']:.2f} val_acc={metrics['val_acc']:.4f} "
                f"unigram_loss={task.unigram:.4f} unigram_acc={task.unigram_acc:.4f} skipped={skipped} "
                f"bands[{' '.join(f'{k}={v}' for k, v in totals.bands.items() if v)}] "
                f"time={time.monotonic() - totals.started:.1f}s")
        self.report.epoch_summary(task_i + 1, epoch_i + 1, text, step=self.trainer.step, task_name=task.name,
                                  val_batches=self._val_limit(task),
                                  train_loss=totals.train_loss, unigram_loss=task.unigram,
                                  unigram_acc=task.unigram_acc, skipped=skipped, skip_reason=dict(totals.skips),
                                  bands=dict(totals.bands), complete=complete, **metrics)
        self.monitor.end_epoch()
        return metrics["val_loss"]

    def _end_task(self, task_i: int) -> None:
        """Consolidate (EWC), score replay, evaluate every task, print the matrix once."""
        task, model = self.data[task_i], self.trainer.model
        if self.ewc is not None and self.ewc.strength > 0 and task_i + 1 < len(self.data):
            n = min(self.spec.continual.fisher_batches, len(task.train))
            self.report.line(f"task {task_i + 1}: estimating the EWC Fisher information on {n} batches")
            batches = [on_device(self.stream.raw(Position(task_i, 0, i)), self.trainer.device) for i in range(n)]
            used = self.ewc.consolidate(model, batches, model_loss, self.trainer.autocast)
            if used < len(batches):
                self.report.warn(f"task {task_i + 1}: {len(batches) - used} Fisher batches had non-finite "
                                 "gradients and were left out")
        replay = self.stream.replay
        if replay is not None and self.spec.continual.replay_strategy == "importance":
            per_pass = windows_per_pass(self.spec.train.sequence_length, model.cfg.vocab_size)
            replay.score(model, task_i, per_sequence_loss, self.trainer.device, per_pass)
        row = [self.trainer.evaluate(self._val_batches(t))["val_loss"] for t in self.data]
        self.matrix = [*self.matrix, row]
        stats = transfer(self.matrix)
        if not self.report.once(("task", task_i + 1)):
            return
        self.report.line(f"task {task_i + 1}/{len(self.data)} done: validation loss on every task")
        for line in format_matrix(self.matrix, [t.name for t in self.data]):
            self.report.line(line)
        self.report.line(f"  average loss over tasks 1-{task_i + 1}: {stats['average_loss']:.4f}; forgetting "
                         f"{stats['forgetting']:+.4f} (backward transfer {stats['backward_transfer']:+.4f})")
        self.report.record("task", step=self.trainer.step, task=task_i + 1, name=task.name, losses=row, **stats)

    def _start_task(self) -> None:
        """The task the stream stands in starts now, with its own schedule."""
        self.start_step = self.trainer.step
        self.trainer.start_task(horizon(self.spec, self.data, self.stream.position.task))

    def _val_limit(self, task: TaskData) -> int:
        n = len(task.val)
        return min(self.spec.train.eval_batches or n, n)

    def _val_batches(self, task: TaskData) -> Iterator[Batch]:
        """--eval-batches batches spread evenly across the validation split (the first N
        would be a handful of files, unlike the split the baselines describe), or all of it;
        each rank evaluates its rows of each. A long validation says how far it got."""
        n, limit, d = len(task.val), self._val_limit(task), self.dist
        started = shown = time.monotonic()
        if limit >= 100:
            self.report.line(f"validating {task.name} on {limit} batches")
        for i in range(limit):
            x, y = task.val.get(0, i * n // limit)
            yield on_device((x[d.rank::d.world], y[d.rank::d.world]) if d.active else (x, y), self.trainer.device)
            now = time.monotonic()
            if now - shown > 10:
                self.report.line(f"validating {task.name}: {i + 1}/{limit} batches, {now - started:.0f}s")
                shown = now

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "task_start_step": self.start_step, "best_val": self.best_val,
                "ewc": self.ewc.state_dict() if self.ewc is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind(state)
        self.best_val = state["best_val"]

    def rewind(self, state: dict[str, Any]) -> None:
        """A rollback to ``state``: the matrix, the task and EWC go back; the best validation
        loss stays (best.pt keeps the weights it was measured on)."""
        self.matrix, self.start_step = [list(r) for r in state["matrix"]], state["task_start_step"]
        if self.ewc is not None:
            self.ewc.load_state_dict(state["ewc"])

