"""A whole training run: data, tasks and epochs, sync points, rollback, checkpoints.

The hot loop calls ``Trainer.train_step`` and nothing else that syncs. Every
--log-every steps (and at each epoch end) a *sync point* reads the guard's counters in
one transfer and acts on them: a step line, a warning per skipped step, a rollback after
K consecutive skips, a stop with a diagnosis after R rollbacks.

With --continual-learning the corpus is split into tasks, trained in order, each with its
own warm-up and cosine schedule (and its own --max-steps budget). After each task come EWC
consolidation, replay scoring and the task matrix.

Exit codes: 0 done, 2 bad input (nothing written), 3 instability that could not be
recovered (diagnosis printed, last good state saved), 130 interrupted (state saved).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from model import HybridLM, ModelConfig
from stability.checkpoint import (
    CorruptStateError,
    atomic_write_bytes,
    copy_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from stability.config import RunSpec, TrainConfig
from stability.continual import EWC, ReplayBuffer, format_matrix, per_sequence_loss, transfer
from stability.data import Corpus, TokenBatches, load_corpus, unigram_loss
from stability.faults import FaultInjector, parse_faults
from stability.guard import REASONS
from stability.monitor import Monitor, Totals
from stability.recovery import Recovery, diagnose
from stability.reporting import Reporter
from stability.scaler import LossScaleError
from stability.tokenizers import Tokenizer, default_cache_dir, encode_documents, load_tokenizer, save_tokenizer
from stability.trainer import Trainer, lm_loss, resolve_amp_dtype, resolve_device

EXIT_OK, EXIT_BAD_INPUT, EXIT_UNRECOVERABLE, EXIT_INTERRUPTED = 0, 2, 3, 130
_PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}


class BadInput(ValueError):
    """A problem with the command line or its files, found before anything is written."""


class Unrecoverable(RuntimeError):
    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: the next micro-batch to read."""

    task: int = 0
    epoch: int = 0
    index: int = 0


@dataclass
class TaskData:
    name: str
    train: TokenBatches
    val: TokenBatches
    unigram: float  # loss of predicting the validation split's own token frequencies
    unigram_acc: float  # accuracy of always predicting its most frequent token


# --- set-up, all of it before anything is written ----------------------------------------


def _mode_accuracy(tokens: torch.Tensor) -> float:
    """Next-token accuracy of always guessing the most frequent token."""
    targets = tokens[1:].long()
    return float(torch.bincount(targets).max()) / max(targets.numel(), 1)


def _encode_cached(tokenizer: Tokenizer, corpus: Corpus, split: str, cache_dir: Path) -> torch.Tensor:
    docs = corpus.train if split == "train" else corpus.val
    key = f"{tokenizer.name}-{tokenizer.vocab_size}-{corpus.fingerprint()[:32]}-{split}"
    path = cache_dir / "tokens" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tokens = encode_documents(tokenizer, docs)
    dtype = torch.int32 if tokenizer.vocab_size < 2**31 else torch.int64
    atomic_write_bytes(path, lambda f: torch.save(tokens.to(dtype), f))
    return tokens


def prepare_data(spec: RunSpec) -> tuple[Tokenizer, Corpus, list[TaskData]]:
    t = spec.train
    corpus = load_corpus(t.data, t.dataset, t.val_fraction)
    cache_dir = default_cache_dir()
    tokenizer = load_tokenizer(t.tokenizer, corpus, t.vocab_size, cache_dir)
    parts = corpus.partition(spec.num_tasks) if spec.num_tasks > 1 else [corpus]
    tasks = []
    for i, part in enumerate(parts):
        train_tokens = _encode_cached(tokenizer, part, "train", cache_dir)
        val_tokens = _encode_cached(tokenizer, part, "val", cache_dir)
        train = TokenBatches(train_tokens, t.batch_size, t.sequence_length, seed=t.seed + i)
        val = TokenBatches(val_tokens, t.batch_size, t.sequence_length, shuffle=False, pad_id=tokenizer.pad_id)
        tasks.append(TaskData(part.name, train, val, unigram_loss(val_tokens, tokenizer.vocab_size),
                              _mode_accuracy(val_tokens)))
    return tokenizer, corpus, tasks


_RESUME_MUST_MATCH = ("batch_size", "sequence_length", "gradient_accumulation_steps", "tokenizer",
                      "vocab_size", "data", "dataset", "val_fraction", "seed", "mixed_precision",
                      "amp_dtype", "task", "log_every")


def check_resume(ckpt: dict[str, Any], spec: RunSpec, fingerprint: str) -> None:
    """Resuming continues the same run: model, data, plasticity and task flags must be
    those it started with."""
    saved = ckpt["config"]
    problems = []
    pairs = [(n, v, getattr(spec.model, n)) for n, v in ModelConfig.from_dict(saved["model"]).to_dict().items()
             if n != "extra"]
    pairs += [(n, saved["train"].get(n), getattr(spec.train, n)) for n in _RESUME_MUST_MATCH]
    for section in ("plasticity", "continual"):
        pairs += [(n, v, getattr(getattr(spec, section), n)) for n, v in saved[section].items()]
    for name, was, now in pairs:
        if was != now:
            problems.append(f"--{name.replace('_', '-')}: checkpoint has {was!r}, this command {now!r}")
    if not problems and ckpt["corpus"] != fingerprint:
        problems.append("the training text changed since the checkpoint (corpus fingerprint differs)")
    if problems:
        raise BadInput("--resume: this command does not continue the run in --output-dir:\n  - "
                       + "\n  - ".join(problems) + "\nresume with the flags the run started with")


def _output_dir(train: TrainConfig) -> Path:
    if train.output_dir:
        return Path(train.output_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormals (torch has a setter, no getter)."""
    return bool(torch.tensor([1e-39]).mul(1.0).eq(0).item())  # host value, set-up only


# --- the run ---------------------------------------------------------------------------


class Run:
    def __init__(self, spec: RunSpec, stream: TextIO | None = None):
        self.spec = spec
        self.stream = stream or sys.stdout
        self.stop_requested = False
        self._done = False

    # set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        spec, t = self.spec, self.spec.train
        self.device = resolve_device(t.device)
        self.amp_dtype = resolve_amp_dtype(t, self.device)
        self.faults = parse_faults(spec.guard.inject_fault)
        self.out = _output_dir(t)
        last = self.out / "checkpoints" / "last.pt"
        if t.resume and not last.exists():
            raise BadInput(f"--resume: no checkpoint at {last}; start without --resume or fix --output-dir")
        if not t.resume and last.exists():
            raise BadInput(f"--output-dir {self.out} already holds a run ({last}); pass --resume to "
                           "continue it or choose another --output-dir")
        self.tokenizer, corpus, self.tasks = prepare_data(spec)
        self.fingerprint = corpus.fingerprint()
        self.spec = spec = replace(spec, model=replace(spec.model, vocab_size=self.tokenizer.vocab_size))
        ckpt = load_checkpoint(last) if t.resume else None
        if ckpt is not None:
            check_resume(ckpt, spec, self.fingerprint)
        torch.manual_seed(t.seed)
        self.model = HybridLM(spec.model).to(self.device)
        self.injector = FaultInjector(self.faults, self.model) if self.faults else None
        self.trainer = Trainer(self.model, t, spec.guard, self.device, self._horizon(0), self.amp_dtype,
                               self.injector, spec.plasticity)
        c = spec.continual
        self.ewc = EWC(self.model, c.consolidation_strength) if c.continual_learning else None
        self.replay = ReplayBuffer(c.replay_buffer_size, c.replay_strategy, t.seed) if c.use_replay else None
        self.recovery = Recovery(spec.guard)
        self.position = Position()
        self.best_val = math.inf
        self.matrix: list[list[float]] = []
        self.task_start_step = 0
        self.report = Reporter(self.out, self.stream, t.progress)
        self.monitor = Monitor(self.report, spec.guard, t.gradient_clip, t.log_every, 0)
        if ckpt is not None:
            self._restore(ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_config()
        save_tokenizer(self.tokenizer, self.out)  # lsnn sample / eval / export read it

    def _horizon(self, task: int) -> int:
        """The schedule's length for ``task``: its epochs, capped by --max-steps (which
        with --continual-learning is a budget per task)."""
        t = self.spec.train
        per_task = self.spec.continual.continual_learning
        batches = len(self.tasks[task].train) if per_task else sum(len(x.train) for x in self.tasks)
        horizon = max(batches // t.gradient_accumulation_steps * t.epochs, 1)
        return min(horizon, t.max_steps) if t.max_steps else horizon

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.trainer.load_state_dict(ckpt["trainer"])
        self.position = Position(**ckpt["position"])
        self.best_val = ckpt["best_val"]
        set_rng_state(ckpt["rng"])
        cont = ckpt["continual"]
        self.matrix, self.task_start_step = cont["matrix"], cont["task_start_step"]
        if self.ewc is not None:
            self.ewc.load_state_dict(cont["ewc"])
            if self.ewc.active:
                self.trainer.loss_hook = self.ewc.penalty
        if self.replay is not None:
            self.replay.load_state_dict(cont["replay"])
        window = ckpt["window"]
        self.monitor.last_sync_step = window["last_sync_step"]
        self.monitor.totals = Totals.from_state(window["totals"])
        self.report.truncate_after(window["last_sync_step"])

    def _write_config(self) -> None:
        config = {
            **self._configs(),
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "tasks": [task.name for task in self.tasks],
            "corpus": self.fingerprint,
            "device": str(self.device),
            "precision": _PRECISION[self.amp_dtype],
            "torch": torch.__version__,
        }
        text = json.dumps(config, indent=2, default=str)
        atomic_write_bytes(self.out / "config.json", lambda f: f.write(text.encode()))

    def _configs(self) -> dict[str, Any]:
        s = self.spec
        return {"model": s.model.to_dict(), "train": s.train.to_dict(), "guard": s.guard.to_dict(),
                "plasticity": s.plasticity.to_dict(), "continual": s.continual.to_dict()}

    # the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        self._announce()
        self._step_batches: dict[int, list[Position]] = {}
        self._plasticity_seen: dict[str, list] | None = None
        self._snapshot()
        # Ctrl-C finishes the step and saves; only the main thread may install a handler
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main else None
        flushed = _denormals_flushed()
        if self.device.type == "cpu":
            # Subnormal floats run ~10x slower on x86; a Transformer LM at lr 1e-4 measured
            # 208 ms a step against 17 ms with them flushed. Values below 1.2e-38 lose nothing.
            torch.set_flush_denormal(True)
        try:
            while not self._finished():
                if self._advance():
                    return self._interrupted()
        except Unrecoverable as e:
            return self._unrecoverable(e)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            torch.set_flush_denormal(flushed)  # process-wide state: leave it as it was
        self._save("last.pt")
        self.report.line(f"done: {self.trainer.step} steps; checkpoints in {self.out / 'checkpoints'}")
        return EXIT_OK

    def _advance(self) -> bool:
        """One optimizer step and whatever ends with it; True if interrupted."""
        window, next_pos = self._next_window(self.position)
        if window:
            self._step(window)
        rolled_over = next_pos.epoch != self.position.epoch or next_pos.task != self.position.task
        finished_task = self.position.task
        self.position = next_pos
        if rolled_over:
            self._sync()
            self._end_epoch(epoch_done=True)
            if next_pos.task != finished_task:
                self._end_task(finished_task)
                if not self._finished():
                    self._start_task()
        if self.stop_requested:
            return True
        if self._budget_spent():
            self._sync()
            if self.monitor.totals.steps:  # unless the epoch that just ended was reported
                self._end_epoch(epoch_done=False)
            if self.spec.continual.continual_learning:
                self._end_task(self.position.task)
            if self.spec.continual.continual_learning and self.position.task + 1 < len(self.tasks):
                self.position = Position(self.position.task + 1, 0, 0)
                self._start_task()
            else:
                self._done = True  # the position stays true, so --resume with more steps continues
        return False

    def _budget_spent(self) -> bool:
        t = self.spec.train
        if not t.max_steps or self._finished():
            return False
        used = self.trainer.step - (self.task_start_step if self.spec.continual.continual_learning else 0)
        return used >= t.max_steps

    def _finished(self) -> bool:
        return self._done or self.position.task >= len(self.tasks)

    def _next_window(self, pos: Position) -> tuple[list[Position], Position]:
        """The micro-batches of the next optimizer step, minus batches that failed before
        a rollback, and the position after them."""
        task = self.tasks[pos.task]
        window, index = [], pos.index
        n = len(task.train)
        while len(window) < self.spec.train.gradient_accumulation_steps and index < n:
            here = Position(pos.task, pos.epoch, index)
            if here not in self.recovery.failed_batches:
                window.append(here)
            index += 1
        if index < n:
            return window, Position(pos.task, pos.epoch, index)
        if pos.epoch + 1 < self.spec.train.epochs:
            return window, Position(pos.task, pos.epoch + 1, 0)
        return window, Position(pos.task + 1, 0, 0)

    def _task_batch(self, pos: Position) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tasks[pos.task].train.get(pos.epoch, pos.index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _mix_replay(self, x: torch.Tensor, y: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With replay, the batch's last sequences swapped for earlier tasks'."""
        if self.replay is None:
            return x, y
        k = max(1, round(self.spec.continual.replay_fraction * x.shape[0]))
        old = self.replay.sample(k, task)
        if old is None:
            return x, y
        x, y = x.clone(), y.clone()
        x[-k:], y[-k:] = old[:, :-1], old[:, 1:]
        return x, y

    def _batch(self, pos: Position) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch at ``pos`` as a step sees it, on the device."""
        x, y = self._mix_replay(*self.tasks[pos.task].train.get(pos.epoch, pos.index), pos.task)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _step(self, window: list[Position]) -> None:
        raw = [self.tasks[p.task].train.get(p.epoch, p.index) for p in window]
        batches = [self._mix_replay(x, y, p.task) for (x, y), p in zip(raw, window)]
        out = self.trainer.train_step([(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                                       for x, y in batches])
        if self.replay is not None:  # offer the task's own sequences, not the replayed ones
            for (x, y), p in zip(raw, window):
                self.replay.offer(torch.cat([x, y[:, -1:]], dim=1), p.task)
        self._step_batches[self.trainer.step] = window
        self.monitor.tokens += out.tokens
        self.report.progress(self.trainer.step, self.trainer.total_steps,
                             f"task {self.position.task + 1} epoch {self.position.epoch + 1}")
        t = self.spec.train
        if self.trainer.step % t.log_every == 0:
            self._sync()
        if t.checkpoint_every and self.trainer.step % t.checkpoint_every == 0:
            self._save("last.pt")

    # sync points --------------------------------------------------------------------------
    def _sync(self) -> None:
        """Read the device counters (one host sync) and act on them."""
        step = self.trainer.step
        if step == self.monitor.last_sync_step:
            return
        counters = self.trainer.guard.read()  # host sync
        rows = self.monitor.rows(counters["history"], step)
        self.monitor.tally(rows, self.position.epoch + 1)
        extra: dict[str, Any] = {"task": min(self.position.task, len(self.tasks) - 1) + 1}
        if self.trainer.plasticity is not None:
            plast = self.trainer.plasticity.read()  # host sync
            self.monitor.plasticity(self._plasticity_seen, plast, step)
            self._plasticity_seen = extra["plasticity"] = plast
        self.monitor.step_line(rows, step, self.position.epoch + 1, counters, **extra)
        try:
            self.trainer.policy.check()
        except LossScaleError as e:
            raise Unrecoverable(str(e), self._diagnose("overflow", step)) from e
        if self.recovery.needs_rollback(counters["consecutive_skips"]):
            self._rollback(counters, step)
        elif not any(r["reason"] != "ok" for r in rows) and self.recovery.due(counters["good_steps"]):
            self._snapshot(counters["good_steps"])

    # epochs and tasks -----------------------------------------------------------------------
    def _end_epoch(self, epoch_done: bool) -> None:
        """Validate and print the epoch's summary, once; checkpoint; snapshot."""
        task_i, epoch_i = self._finished_epoch(epoch_done)
        task = self.tasks[task_i]
        metrics = self.trainer.evaluate(self._val_batches(task))
        totals = self.monitor.totals
        skipped = sum(totals.skips.values())
        label = f"epoch {epoch_i + 1}/{self.spec.train.epochs}" + ("" if epoch_done else " (stopped at --max-steps)")
        if len(self.tasks) > 1:
            label = f"task {task_i + 1}/{len(self.tasks)} {label}"
        text = (f"{label}: train_loss={totals.train_loss:.4f} val_loss={metrics['val_loss']:.4f} "
                f"val_ppl={metrics['val_ppl']:.2f} val_acc={metrics['val_acc']:.4f} "
                f"unigram_loss={task.unigram:.4f} unigram_acc={task.unigram_acc:.4f} skipped={skipped} "
                f"bands[{' '.join(f'{k}={v}' for k, v in totals.bands.items() if v)}] "
                f"time={time.monotonic() - totals.started:.1f}s")
        self.report.epoch_summary(task_i + 1, epoch_i + 1, text, step=self.trainer.step, task_name=task.name,
                                  train_loss=totals.train_loss, unigram_loss=task.unigram,
                                  unigram_acc=task.unigram_acc, skipped=skipped, skip_reason=dict(totals.skips),
                                  bands=dict(totals.bands), complete=epoch_done, **metrics)
        self.monitor.totals = Totals()
        if not self._save("last.pt"):
            return  # weights are non-finite: recovery will roll back; no snapshot of this
        if metrics["val_loss"] < self.best_val:
            self.best_val = metrics["val_loss"]
            copy_checkpoint(self.out / "checkpoints" / "last.pt", self.out / "checkpoints" / "best.pt")
        self._snapshot()

    def _finished_epoch(self, epoch_done: bool) -> tuple[int, int]:
        """The (task, epoch) that just ended: the one before self.position when the data
        stream rolled over, the current one when --max-steps cut it short."""
        p = self.position
        if not epoch_done:
            return p.task, p.epoch
        if p.epoch > 0:
            return p.task, p.epoch - 1
        return p.task - 1, self.spec.train.epochs - 1

    def _end_task(self, task_i: int) -> None:
        """Consolidate (EWC), score replay, evaluate every task, print the matrix once."""
        if not self.spec.continual.continual_learning:
            return
        task = self.tasks[task_i]
        if self.ewc is not None and self.ewc.strength > 0 and task_i + 1 < len(self.tasks):
            n = self.spec.continual.fisher_batches
            batches = [self._task_batch(Position(task_i, 0, i)) for i in range(min(n, len(task.train)))]
            used = self.ewc.consolidate(self.model, batches, lm_loss, self.trainer.autocast)
            if used < len(batches):
                self.report.warn(f"task {task_i + 1}: {len(batches) - used} Fisher batches had non-finite "
                                 "gradients and were left out")
            if self.ewc.active:
                self.trainer.loss_hook = self.ewc.penalty
        if self.replay is not None and self.spec.continual.replay_strategy == "importance":
            self.replay.score(self.model, task_i, per_sequence_loss, self.device)
        row = [self.trainer.evaluate(self._val_batches(t))["val_loss"] for t in self.tasks]
        self.matrix.append(row)
        stats = transfer(self.matrix)
        lines = format_matrix(self.matrix, [t.name for t in self.tasks])
        self.report.line(f"task {task_i + 1}/{len(self.tasks)} done: validation loss on every task")
        for line in lines:
            self.report.line(line)
        self.report.line(f"  average loss over tasks 1-{task_i + 1}: {stats['average_loss']:.4f}; forgetting "
                         f"{stats['forgetting']:+.4f} (backward transfer {stats['backward_transfer']:+.4f})")
        self.report.record("task", step=self.trainer.step, task=task_i + 1, name=task.name, losses=row, **stats)

    def _start_task(self) -> None:
        """A new task gets its own warm-up and cosine schedule, and its own --max-steps."""
        self.task_start_step = self.trainer.step
        self.trainer.lr_offset = self.trainer.guard.good_steps.clone()
        self.trainer.total_steps = self._horizon(self.position.task)

    def _val_batches(self, task: TaskData):
        """The validation split, or --eval-batches batches spread evenly across it (the
        first N would be a handful of files, unlike the split the baselines describe)."""
        n = len(task.val)
        limit = min(self.spec.train.eval_batches or n, n)
        for i in range(limit):
            x, y = task.val.get(0, i * n // limit)
            yield x.to(self.device), y.to(self.device)

    # recovery ------------------------------------------------------------------------------
    def _state(self, trainer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "trainer": trainer_state or self.trainer.state_dict(),
            "position": self.position.__dict__,
            "rng": rng_state(),
            "best_val": self.best_val,
            "window": {"last_sync_step": self.monitor.last_sync_step, "totals": self.monitor.totals.state_dict()},
            "continual": {"matrix": self.matrix, "task_start_step": self.task_start_step,
                          "ewc": self.ewc.state_dict() if self.ewc else None,
                          "replay": self.replay.state_dict() if self.replay else None},
            "config": self._configs(),
            "corpus": self.fingerprint,
        }

    def _save(self, name: str, state: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint; with non-finite weights write nothing, warn, return False."""
        state = state or self._state()
        try:
            save_checkpoint(self.out / "checkpoints" / name, state, state["trainer"]["model"])
        except CorruptStateError as e:
            self.report.warn(f"{e}; keeping the previous checkpoint")
            return False
        return True

    def _snapshot(self, good_steps: int | None = None) -> None:
        if good_steps is None:
            good_steps = int(self.trainer.guard.good_steps)  # host sync (epoch ends, start)
        self.recovery.take(self.trainer.state_dict(), self.position, {"rng": rng_state()}, good_steps)
        self._step_batches = {}

    def _rollback(self, counters: dict[str, Any], step: int) -> None:
        failed_steps = range(step - counters["consecutive_skips"] + 1, step + 1)
        failed = [p for s in failed_steps for p in self._step_batches.get(s, [])]
        reason = self._last_reason(counters, step)
        if self.recovery.exhausted():
            raise Unrecoverable(
                f"{counters['consecutive_skips']} consecutive skipped steps (last: {reason}) after "
                f"{self.recovery.rollbacks} rollbacks", self._diagnose(reason, step))
        snap = self.recovery.rollback(failed)
        self.trainer.load_state_dict(snap.state)
        self.trainer.lr_factor *= self.spec.guard.rollback_lr_factor
        set_rng_state(snap.extra["rng"])
        self.position = snap.position
        self.monitor.last_sync_step = self.trainer.step
        self._step_batches = {}
        self.report.warn(
            f"step {step}: {counters['consecutive_skips']} consecutive skipped steps ({reason}); rolled back "
            f"to step {self.trainer.step} (rollback {self.recovery.rollbacks}/{self.spec.guard.max_rollbacks}), "
            f"skipping {len(failed)} failed batches, learning rate x{float(self.trainer.lr_factor):g}")
        self.report.record("rollback", step=step, to_step=self.trainer.step, reason=reason,
                           rollbacks=self.recovery.rollbacks, failed_batches=len(failed))

    def _last_reason(self, counters: dict[str, Any], step: int) -> str:
        return REASONS[int(counters["history"][(step - 1) % self.trainer.guard.window][2])]

    def _diagnose(self, reason: str, step: int) -> dict[str, Any]:
        last = self._step_batches.get(step) or [self.position]
        diag = diagnose(self.model, self._batch(last[-1]), lm_loss, self.trainer.autocast)
        return {"step": step, "reason": reason, "nonfinite_weights": diag.nonfinite_weights,
                "nonfinite_activations": diag.nonfinite_activations, "nonfinite_grads": diag.nonfinite_grads,
                "loss": diag.loss, "lines": diag.lines()}

    def _unrecoverable(self, e: Unrecoverable) -> int:
        report = e.report
        snap = self.recovery.snapshot
        saved = None
        if snap is not None:
            state = self._state(snap.state)
            state["position"] = snap.position.__dict__
            if self._save("last.pt", state):
                saved = self.out / "checkpoints" / "last.pt"
        report.update(error=str(e), last_good_checkpoint=str(saved) if saved else None,
                      last_good_step=snap.state["step"] if snap else None)
        atomic_write_bytes(self.out / "report.json",
                           lambda f: f.write(json.dumps(report, indent=2, default=str).encode()))
        self.report.record("stop", step=report["step"], reason=report["reason"], error=str(e))
        self.report.line(f"error: training stopped at step {report['step']}: {e}")
        for line in report["lines"]:
            self.report.line(f"  {line}")
        if saved:
            self.report.line(f"  last good state (step {report['last_good_step']}) saved to {saved}")
        self.report.line(f"  report: {self.out / 'report.json'}")
        return EXIT_UNRECOVERABLE

    # interrupts ------------------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = True

    def _interrupted(self) -> int:
        self._save("last.pt")  # with the unlogged window, so the resumed run logs it as if never stopped
        self.report.line(f"interrupted at step {self.trainer.step}; saved {self.out / 'checkpoints' / 'last.pt'}; "
                         "continue with the same command and --resume")
        return EXIT_INTERRUPTED

    def _announce(self) -> None:
        counts = self.model.parameter_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
        t, p, c = self.spec.train, self.spec.plasticity, self.spec.continual
        self.report.line(f"lsnn: {counts['total']:,} parameters ({parts})")
        self.report.line(
            f"data: {sum(len(x.train) for x in self.tasks)} batches/epoch of {t.batch_size}x{t.sequence_length} "
            f"tokens, tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size}), device {self.device}, "
            f"precision {_PRECISION[self.amp_dtype]}, output {self.out}")
        if c.continual_learning:
            names = "; ".join(task.name for task in self.tasks)
            ewc = f"EWC {c.consolidation_strength:g}" if c.consolidation_strength > 0 else "no EWC"
            replay = f"replay {c.replay_strategy} ({c.replay_buffer_size})" if c.use_replay else "no replay"
            self.report.line(f"tasks: {names}; {ewc}, {replay}")
        if p.use_stdp or p.use_meta_plasticity:
            self.report.line(f"plasticity: {'STDP ' + p.stdp_type if p.use_stdp else 'no STDP'}, "
                             f"{'meta-plasticity' if p.use_meta_plasticity else 'no meta-plasticity'}")


def run(spec: RunSpec, stream: TextIO | None = None) -> int:
    """Train; return the exit code. Bad input raises before anything is written."""
    r = Run(spec, stream)
    r.setup()
    return r.fit()


__all__ = ["BadInput", "Position", "Run", "RunSpec", "run"]
