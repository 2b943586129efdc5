"""A whole training run: data, epochs and tasks, sync points, rollback, checkpoints.

The hot loop calls ``Trainer.train_step`` and nothing else that syncs. Every
--log-every steps (and at each epoch end) a *sync point* reads the guard's counters in
one transfer and acts on them: a step line, a warning per skipped step, a rollback after
K consecutive skips, a stop with a diagnosis after R rollbacks.

Exit codes: 0 done, 2 bad input (nothing written), 3 instability that could not be
recovered (diagnosis printed, last good state saved), 130 interrupted (state saved).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field, replace
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
from stability.config import GuardConfig, TrainConfig
from stability.data import Corpus, DataError, TokenBatches, encode_documents, load_corpus, unigram_loss
from stability.faults import FaultInjector, parse_faults
from stability.guard import BANDS, REASONS, band_name
from stability.recovery import Recovery, diagnose
from stability.reporting import Reporter
from stability.scaler import LossScaleError
from stability.tokenizers import Tokenizer, default_cache_dir, load_tokenizer
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


def _mode_accuracy(tokens: torch.Tensor) -> float:
    """Next-token accuracy of always guessing the most frequent token."""
    targets = tokens[1:].long()
    return float(torch.bincount(targets).max()) / max(targets.numel(), 1)


@dataclass
class RunSpec:
    """Everything a run is configured by."""

    model: ModelConfig
    train: TrainConfig
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    loss_count: int = 0
    skips: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS[1:], 0))
    bands: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BANDS, 0))
    steps: int = 0
    started: float = field(default_factory=time.monotonic)


# --- set-up, all of it before anything is written ----------------------------------------


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


def prepare_data(spec: RunSpec, num_tasks: int = 1) -> tuple[Tokenizer, Corpus, list[TaskData]]:
    t = spec.train
    corpus = load_corpus(t.data, t.dataset, t.val_fraction)
    cache_dir = default_cache_dir()
    tokenizer = load_tokenizer(t.tokenizer, corpus, t.vocab_size, cache_dir)
    parts = corpus.partition(num_tasks) if num_tasks > 1 else [corpus]
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
                      "amp_dtype", "task")


def check_resume(ckpt: dict[str, Any], spec: RunSpec, fingerprint: str) -> None:
    """Resuming continues the same run: model and data flags must be those it started with."""
    problems = []
    saved_model = ModelConfig.from_dict(ckpt["config"]["model"])
    for name, saved in saved_model.to_dict().items():
        if name != "extra" and getattr(spec.model, name) != saved:
            problems.append(f"--{name.replace('_', '-')}: checkpoint has {saved!r}, this command {getattr(spec.model, name)!r}")
    saved_train = ckpt["config"]["train"]
    for name in _RESUME_MUST_MATCH:
        if saved_train.get(name) != getattr(spec.train, name):
            problems.append(f"--{name.replace('_', '-')}: checkpoint has {saved_train.get(name)!r}, "
                            f"this command {getattr(spec.train, name)!r}")
    if not problems and ckpt["corpus"] != fingerprint:
        problems.append("the training text changed since the checkpoint (corpus fingerprint differs)")
    if problems:
        raise BadInput("--resume: this command does not continue the run in --output-dir:\n  - "
                       + "\n  - ".join(problems) + "\nresume with the flags the run started with")


def _output_dir(train: TrainConfig) -> Path:
    if train.output_dir:
        return Path(train.output_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# --- the run ---------------------------------------------------------------------------


class Run:
    def __init__(self, spec: RunSpec, stream: TextIO | None = None):
        self.spec = spec
        self.stream = stream or sys.stdout
        self.stop_requested = False

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
        self.tokenizer, corpus, self.tasks = prepare_data(spec, num_tasks=1)
        self.fingerprint = corpus.fingerprint()
        model_cfg = replace(spec.model, vocab_size=self.tokenizer.vocab_size)
        self.spec = spec = replace(spec, model=model_cfg)
        ckpt = load_checkpoint(last) if t.resume else None
        if ckpt is not None:
            check_resume(ckpt, spec, self.fingerprint)
        torch.manual_seed(t.seed)
        self.model = HybridLM(model_cfg).to(self.device)
        steps_per_epoch = sum(len(task.train) for task in self.tasks) // t.gradient_accumulation_steps
        horizon = max(steps_per_epoch * t.epochs, 1)
        if t.max_steps:
            horizon = min(horizon, t.max_steps)
        self.injector = FaultInjector(self.faults, self.model) if self.faults else None
        self.trainer = Trainer(self.model, t, spec.guard, self.device, horizon, self.amp_dtype, self.injector)
        self.recovery = Recovery(spec.guard)
        self.position = Position()
        self.best_val = math.inf
        self.report = Reporter(self.out, self.stream, t.progress)
        if ckpt is not None:
            self._restore(ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_config()

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.trainer.load_state_dict(ckpt["trainer"])
        self.position = Position(**ckpt["position"])
        self.best_val = ckpt["best_val"]
        set_rng_state(ckpt["rng"])
        self._resumed_window = ckpt["window"]
        self.report.truncate_after(ckpt["window"]["last_sync_step"])

    def _write_config(self) -> None:
        config = {
            "model": self.spec.model.to_dict(),
            "train": self.spec.train.to_dict(),
            "guard": self.spec.guard.to_dict(),
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "corpus": self.fingerprint,
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype) if self.amp_dtype else None,
            "torch": torch.__version__,
        }
        text = json.dumps(config, indent=2, default=str)
        atomic_write_bytes(self.out / "config.json", lambda f: f.write(text.encode()))

    # the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        t = self.spec.train
        self._announce()
        self._last_sync_step = self.trainer.step
        self._window_tokens, self._window_start = 0, time.monotonic()
        self._totals = _EpochTotals()
        if getattr(self, "_resumed_window", None):  # the steps not yet logged when it stopped
            w = self._resumed_window
            self._last_sync_step = w["last_sync_step"]
            self._totals = _EpochTotals(w["loss_sum"], w["loss_count"], w["skips"], w["bands"], w["steps"])
        self._step_batches: dict[int, list[Position]] = {}
        self._snapshot()
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        flushed = _denormals_flushed()
        if self.device.type == "cpu":
            # Subnormal floats run ~10x slower on x86; a Transformer LM at lr 1e-4 measured
            # 208 ms a step against 17 ms with them flushed. Values below 1.2e-38 lose nothing.
            torch.set_flush_denormal(True)
        try:
            while not self._finished():
                window, next_pos = self._next_window(self.position)
                if window:
                    self._step(window)
                if next_pos.epoch != self.position.epoch or next_pos.task != self.position.task:
                    self.position = next_pos
                    self._sync(force=True)
                    self._end_epoch(epoch_done=True)
                else:
                    self.position = next_pos
                if self.stop_requested:
                    return self._interrupted()
                if t.max_steps and self.trainer.step >= t.max_steps:
                    self._sync(force=True)
                    if self._totals.steps:  # unless the epoch that just ended was reported
                        self._end_epoch(epoch_done=False)
                    break
        except Unrecoverable as e:
            return self._unrecoverable(e)
        finally:
            signal.signal(signal.SIGINT, previous)
            torch.set_flush_denormal(flushed)  # process-wide state: leave it as it was
        self._save("last.pt")
        self.report.line(f"done: {self.trainer.step} steps; checkpoints in {self.out / 'checkpoints'}")
        return EXIT_OK

    def _finished(self) -> bool:
        return self.position.task >= len(self.tasks)

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

    def _batch(self, pos: Position) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tasks[pos.task].train.get(pos.epoch, pos.index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _step(self, window: list[Position]) -> None:
        out = self.trainer.train_step([self._batch(p) for p in window])
        self._step_batches[self.trainer.step] = window
        self._window_tokens += out.tokens
        self.report.progress(self.trainer.step, self.trainer.total_steps, f"epoch {self.position.epoch + 1}")
        t = self.spec.train
        if self.trainer.step % t.log_every == 0:
            self._sync()
        if t.checkpoint_every and self.trainer.step % t.checkpoint_every == 0:
            self._save("last.pt")

    # sync points --------------------------------------------------------------------------
    def _sync(self, force: bool = False) -> None:
        """Read the device counters (one host sync) and act on them."""
        step = self.trainer.step
        if step == self._last_sync_step:
            return
        counters = self.trainer.guard.read()  # host sync
        rows = self._new_rows(counters["history"], step)
        self._warn_and_tally(rows)
        self._log_line(rows, step, counters)
        try:
            self.trainer.policy.check()
        except LossScaleError as e:
            raise Unrecoverable(str(e), self._diagnose("overflow", step)) from e
        if self.recovery.needs_rollback(counters["consecutive_skips"]):
            self._rollback(counters, step)
        elif not any(r["reason"] != "ok" for r in rows) and self.recovery.due(counters["good_steps"]):
            self._snapshot(counters["good_steps"])

    def _new_rows(self, history: list[list[float]], step: int) -> list[dict[str, Any]]:
        """The history rows of the steps since the last sync, oldest first."""
        window = self.trainer.guard.window
        first = max(self._last_sync_step + 1, step - window + 1)
        steps = range(first, step + 1)
        ordered = history[(first - 1) % window:] + history[:(first - 1) % window]  # oldest first
        rows = [{"step": s, "loss": loss, "grad_norm": norm, "reason": REASONS[int(reason)],
                 "band": BANDS[int(band)], "scale": scale, "lr": lr}
                for s, (loss, norm, reason, band, scale, lr) in zip(steps, ordered)]
        self._last_sync_step = step
        return rows

    def _warn_and_tally(self, rows: list[dict[str, Any]]) -> None:
        totals = self._totals
        loud = []
        for r in rows:
            totals.steps += 1
            totals.bands[r["band"]] += 1
            if r["reason"] != "ok":
                totals.skips[r["reason"]] += 1
                self.report.warn(f"step {r['step']} skipped ({r['reason']}): loss={r['loss']:.4g} "
                                 f"grad_norm={r['grad_norm']:.4g} scale={r['scale']:g}")
                self.report.record("skip", step=r["step"], epoch=self.position.epoch, reason=r["reason"],
                                   loss=r["loss"], grad_norm=r["grad_norm"], loss_scale=r["scale"])
                continue
            if math.isfinite(r["loss"]):
                totals.loss_sum += r["loss"]
                totals.loss_count += 1
            if r["band"] in ("high", "critical"):
                loud.append(r)
                self.report.record("band", step=r["step"], band=r["band"], grad_norm=r["grad_norm"])
        if loud:  # one line per window: a long warm-up would otherwise bury the skip warnings
            worst = max(loud, key=lambda r: r["grad_norm"])
            counts = ", ".join(f"{b} on {n}" for b in ("high", "critical")
                               if (n := sum(r["band"] == b for r in loud)))
            self.report.warn(f"steps {loud[0]['step']}-{loud[-1]['step']}: gradient norm {counts} step(s), "
                             f"max {worst['grad_norm']:.3f} at step {worst['step']} (clipped to "
                             f"--gradient-clip {self.spec.train.gradient_clip:g})")

    def _log_line(self, rows: list[dict[str, Any]], step: int, counters: dict[str, Any]) -> None:
        ok = [r for r in rows if r["reason"] == "ok" and math.isfinite(r["loss"])]
        loss = sum(r["loss"] for r in ok) / len(ok) if ok else math.nan
        norm = sum(r["grad_norm"] for r in ok) / len(ok) if ok else math.nan
        now = time.monotonic()
        tok_s = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_tokens, self._window_start = 0, now
        reasons = {name: sum(r["reason"] == name for r in rows) for name in REASONS[1:]}
        self.report.step(step, self.position.epoch + 1, loss, norm, rows[-1]["lr"], rows[-1]["scale"], tok_s,
                         band_name(norm, self.spec.guard), sum(reasons.values()), reasons,
                         task=self.position.task + 1, skipped_total=sum(counters["skips"].values()) - counters["skips"]["ok"],
                         spikes_clipped=counters["spikes_clipped"], good_steps=counters["good_steps"])

    # epochs ------------------------------------------------------------------------------
    def _end_epoch(self, epoch_done: bool) -> None:
        """Validate and print the epoch's summary, once; checkpoint; snapshot."""
        finished = self._finished_epoch(epoch_done)
        task_i, epoch_i = finished.task, finished.epoch
        task = self.tasks[task_i]
        metrics = self.trainer.evaluate(self._val_batches(task))
        totals = self._totals
        train_loss = totals.loss_sum / totals.loss_count if totals.loss_count else math.nan
        skipped = sum(totals.skips.values())
        label = f"epoch {epoch_i + 1}/{self.spec.train.epochs}" + ("" if epoch_done else " (stopped at --max-steps)")
        if len(self.tasks) > 1:
            label = f"task {task_i + 1}/{len(self.tasks)} ({task.name}) {label}"
        text = (f"{label}: train_loss={train_loss:.4f} val_loss={metrics['val_loss']:.4f} "
                f"val_ppl={metrics['val_ppl']:.2f} val_acc={metrics['val_acc']:.4f} "
                f"unigram_loss={task.unigram:.4f} unigram_acc={task.unigram_acc:.4f} skipped={skipped} "
                f"bands[{' '.join(f'{k}={v}' for k, v in totals.bands.items() if v)}] "
                f"time={time.monotonic() - totals.started:.1f}s")
        self.report.epoch_summary(task_i + 1, epoch_i + 1, text, step=self.trainer.step, train_loss=train_loss,
                                  unigram_loss=task.unigram, unigram_acc=task.unigram_acc, skipped=skipped, skip_reason=dict(totals.skips),
                                  bands=dict(totals.bands), complete=epoch_done, **metrics)
        self._totals = _EpochTotals()
        if not self._save("last.pt"):
            return  # weights are non-finite: recovery will roll back; no snapshot of this
        if metrics["val_loss"] < self.best_val:
            self.best_val = metrics["val_loss"]
            copy_checkpoint(self.out / "checkpoints" / "last.pt", self.out / "checkpoints" / "best.pt")
        self._snapshot()

    def _finished_epoch(self, epoch_done: bool) -> Position:
        """The (task, epoch) that just ended: the one before self.position when the data
        stream rolled over, the current one when --max-steps cut it short."""
        if not epoch_done:
            return self.position
        p = self.position
        if p.epoch > 0:
            return Position(p.task, p.epoch - 1, 0)
        return Position(p.task - 1, self.spec.train.epochs - 1, 0)

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
            "window": self._window_state(),
            "config": {"model": self.spec.model.to_dict(), "train": self.spec.train.to_dict(),
                       "guard": self.spec.guard.to_dict()},
            "corpus": self.fingerprint,
        }

    def _window_state(self) -> dict[str, Any]:
        """The steps taken since the last sync point, which a resumed run logs exactly as
        the uninterrupted run would have."""
        t = getattr(self, "_totals", None) or _EpochTotals()
        return {"last_sync_step": getattr(self, "_last_sync_step", self.trainer.step), "loss_sum": t.loss_sum,
                "loss_count": t.loss_count, "skips": dict(t.skips), "bands": dict(t.bands), "steps": t.steps}

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
        failed_steps = list(range(step - counters["consecutive_skips"] + 1, step + 1))
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
        self._last_sync_step = self.trainer.step
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
        t = self.spec.train
        self.report.line(f"lsnn: {counts['total']:,} parameters ({parts})")
        self.report.line(
            f"data: {sum(len(x.train) for x in self.tasks)} batches/epoch of {t.batch_size}x{t.sequence_length} "
            f"tokens, tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size}), device {self.device}, "
            f"precision {_PRECISION[self.amp_dtype]}, output {self.out}")


def _denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormals (torch has a setter, no getter)."""
    return bool(torch.tensor([1e-39]).mul(1.0).eq(0).item())  # host value, set-up only


def run(spec: RunSpec, stream: TextIO | None = None) -> int:
    """Train; return the exit code. Bad input raises before anything is written."""
    r = Run(spec, stream)
    r.setup()
    return r.fit()


__all__ = ["BadInput", "DataError", "Position", "Run", "RunSpec", "run"]
