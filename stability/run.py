"""A whole training run: tasks and epochs, sync points, rollback, checkpoints, resume.

Every optimizer step of the loop reads top to bottom:

    window = stream.next_window()      the micro-batches of the step (the stream owns the position)
    trainer.train_step(batches)        no host sync
    stream.advance(window)             the position moves past them
    sync point, when one is due        one host read of the guard's counters; may roll back
    checkpoint, when one is due        it always records "the next batch to read"
    epoch and task ends                reported by the window, so a rollback voids them

A *sync point* (every --log-every steps, at every checkpoint and every epoch end) reads the
guard's device counters in one transfer and acts on them: a step line, a warning per
skipped step, a rollback after K consecutive skips, a stop with a diagnosis after R.

A rollback restores the newest good state, in memory or kept on disk (checkpoints/step-N.pt)
and quarantines the failed batches. Everything a run knows is in its checkpoint, recovery
included, so a run killed at any moment and resumed with --resume continues exactly as if
it had never stopped.

With --continual-learning the corpus is split into tasks, trained in order, each with its
own warm-up and cosine schedule (and its own --max-steps budget). After each task come EWC
consolidation, replay scoring and the task matrix.

Exit codes: 0 done, 2 bad input (nothing written), 3 instability that could not be
recovered (diagnosis printed, last good state saved), 4 finished but the last checkpoint
could not be written (the one before is intact), 130 interrupted by SIGINT (Ctrl-C) and
143 by SIGTERM (preemption): the state is saved, --resume continues it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from model import HybridLM, ModelConfig
from stability.atomic import atomic_write, remove_stale_temporaries
from stability.checkpoint import (
    CheckpointDir,
    CorruptStateError,
    UnreadableCheckpoint,
    recover_dirs,
    rng_state,
    set_rng_state,
)
from stability.config import RunSpec
from stability.continual import EWC, ReplayBuffer, format_matrix, per_sequence_loss, transfer, windows_per_pass
from stability.data import DataError
from stability.diagnostics import BlockProbe
from stability.distributed import Dist, any_rank, barrier, broadcast, device_of, gather, main_first, wrap
from stability.faults import FaultInjector, parse_faults
from stability.guard import OVERFLOW, REASONS
from stability.monitor import Monitor, Totals
from stability.recovery import Recovery, diagnose
from stability.reporting import Reporter
from stability.scaler import LossScaleError
from stability.shards import corpus_mismatch
from stability.stream import DataStream, Position, TaskData, Window, prepare_data
from stability.tokenizers import save_tokenizer
from stability.trainer import (
    Trainer,
    available_memory,
    checkpoint_bytes,
    estimate_training_bytes,
    estimate_vocab,
    lm_loss,
    model_loss,
    resolve_amp_dtype,
    resolve_device,
)

EXIT_OK, EXIT_BAD_INPUT, EXIT_UNRECOVERABLE, EXIT_UNSAVED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 4, 130, 143
# what a run writes in --output-dir: --overwrite deletes these, and nothing else
RUN_FILES = ("metrics.jsonl", "config.json", "tokenizer.json", "quarantine.jsonl", "report.json", "report.png",
             "report.html", "checkpoints", "tensorboard")
_EXIT_ON = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}
_PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}


class BadInput(ValueError):
    """A problem with the command line or its files, found before anything is written."""


class Unrecoverable(RuntimeError):
    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


_RESUME_MUST_MATCH = ("batch_size", "sequence_length", "gradient_accumulation_steps", "tokenizer",
                      "vocab_size", "data", "dataset", "val_fraction", "seed", "mixed_precision",
                      "amp_dtype", "task", "log_every")


def check_resume(ckpt: dict[str, Any], spec: RunSpec, fingerprint: str, world: int = 1) -> None:
    """Resuming continues the same run: model, data, plasticity and task flags must be
    those it started with, and so must the number of processes."""
    saved = ckpt["config"]
    problems = []
    if len(ckpt["ranks"]) != world:
        problems.append(f"torchrun --nproc_per_node: checkpoint was written by {len(ckpt['ranks'])} process(es), "
                        f"this run has {world}")
    pairs = [(n, v, getattr(spec.model, n)) for n, v in ModelConfig.from_dict(saved["model"]).to_dict().items()
             if n != "extra"]
    pairs += [(n, saved["train"].get(n), getattr(spec.train, n)) for n in _RESUME_MUST_MATCH]
    for section in ("plasticity", "continual"):
        pairs += [(n, v, getattr(getattr(spec, section), n)) for n, v in saved[section].items()]
    for name, was, now in pairs:
        if was != now:
            problems.append(f"--{name.replace('_', '-')}: checkpoint has {was!r}, this command {now!r}")
    if not problems and ckpt["corpus"] != fingerprint:
        problems.append(corpus_mismatch(ckpt["corpus"]))
    if problems:
        raise BadInput("--resume: this command does not continue the run in --output-dir:\n  - "
                       + "\n  - ".join(problems) + "\nresume with the flags the run started with")


def _output_dir(train) -> Path:
    if train.output_dir:
        return Path(train.output_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def check_memory(spec: RunSpec, device: torch.device) -> None:
    """Refuse, naming the flag, a run that cannot fit in memory, before the tokenizer or the
    model allocate anything (a 10^9 --vocab-size once asked the BPE trainer for 70 GB)."""
    parts = estimate_training_bytes(spec.model, spec.train)
    free = available_memory(device)
    need = sum(parts.values())
    if free is None or need <= free:
        return
    t, m, gb = spec.train, spec.model, 1e9
    vocab = estimate_vocab(t)
    if max(parts, key=parts.get).startswith("the logits"):
        flags = f"--batch-size {t.batch_size} x --sequence-length {t.sequence_length} x vocabulary {vocab}"
        fix = "lower --batch-size, --sequence-length or --vocab-size"
        if not m.chunked_loss:
            fix += ", or drop --no-chunked-loss (the loss then never holds the whole logits)"
    else:
        flags = f"--vocab-size {vocab} / --hidden-dim {m.hidden_dim} / --num-layers {m.num_layers}"
        fix = "lower --vocab-size, --hidden-dim or --num-layers"
    detail = "; ".join(f"{name}: {size / gb:.1f} GB" for name, size in parts.items())
    raise BadInput(f"{flags}: training would need about {need / gb:.1f} GB ({detail}) but {free / gb:.1f} GB of "
                   f"{device} memory is free; {fix}")


def check_output_dir(out: Path, need: int) -> None:
    """Refuse, before training, an --output-dir that cannot hold the run: a file in the way,
    a read-only directory, or a disk with less free space than ``need`` bytes."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"--output-dir {out}: {existing} is a file, not a directory; choose another --output-dir")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the one sure test of writability
            pass
    except OSError as e:
        raise BadInput(f"--output-dir {out}: {existing} is not writable ({e.strerror or e}); "
                       "choose a writable --output-dir") from e
    free = shutil.disk_usage(existing).free
    if free < need:
        raise BadInput(f"--output-dir {out}: {free / 1e6:.1f} MB free on its disk, but a checkpoint and the one "
                       f"it replaces need about {need / 1e6:.1f} MB; free some space or choose another --output-dir")


def _denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormals (torch has a setter, no getter)."""
    return bool(torch.tensor([1e-39]).mul(1.0).eq(0).item())  # host value, set-up only


# --- the run ---------------------------------------------------------------------------


class Run:
    def __init__(self, spec: RunSpec, stream: TextIO | None = None, dist: Dist = Dist()):
        self.spec, self.dist = spec, dist
        self.stream_out = (stream or sys.stdout) if dist.main else io.StringIO()  # rank 0 speaks
        self.stop_signal: int | None = None
        self._saving = False
        self._done = False
        self._healthy = True  # the last sync point saw no skipped step
        self._weights_finite = True  # the last save found the weights finite
        self._unsaved: OSError | None = None  # why the last save could not be written, if it could not
        self._saved_step: int | None = None  # the step of the checkpoint on disk
        self._bad_params: set[int] = set()  # parameters with non-finite gradients since the run was healthy
        self._steps: dict[int, list] = {}  # step -> [positions read, reason once synced]
        self._last_pos = Position()  # the last micro-batch trained
        self._plasticity_seen: dict[str, list] | None = None

    # set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        spec, t, d = self.spec, self.spec.train, self.dist
        self.device = device_of(d, resolve_device(t.device))
        self.amp_dtype = resolve_amp_dtype(t, self.device)
        ranks = {f.rank for f in parse_faults(spec.guard.inject_fault)} - {None}
        if any(r >= d.world for r in ranks):
            raise BadInput(f"--inject-fault: rank {max(ranks)} named, but this run has {d.world} process(es) "
                           f"(ranks 0-{d.world - 1})")
        self.faults = parse_faults(spec.guard.inject_fault, rank=d.rank)
        self.out = Path(broadcast(d, _output_dir(t) if d.main else None))  # rank 0's runs/<timestamp>
        self.checkpoints = CheckpointDir(self.out / "checkpoints", t.keep_checkpoints, d)
        if t.batch_size % d.world:
            raise BadInput(f"--batch-size {t.batch_size} is the global batch, split over {d.world} processes; "
                           f"make it a multiple of {d.world}")
        per_rank = replace(spec, train=replace(t, batch_size=t.batch_size // d.world))
        main_first(d, lambda: check_memory(per_rank, self.device), (BadInput,), others=False)  # one verdict
        self._check_output_dir()
        # rank 0 prepares the corpus into the cache (tokenizer, shards); the others then map them
        self.tokenizer, corpus, tasks = main_first(d, lambda: prepare_data(spec, self._say), (DataError, BadInput))
        self.fingerprint, self.data_summary = corpus.fingerprint(), corpus.summary()
        self.spec = spec = replace(spec, model=replace(spec.model, vocab_size=self.tokenizer.vocab_size))
        ckpt = self._load_resume_checkpoint() if t.resume else None
        if ckpt is not None:
            check_resume(ckpt, spec, self.fingerprint, d.world)
        torch.manual_seed(t.seed)  # every rank builds the same model
        self.model = HybridLM(spec.model).to(self.device)
        self.injector = FaultInjector(self.faults, self.model) if self.faults else None
        wrapped = wrap(d, self.model, self.device, self.amp_dtype)
        if d.active:
            torch.manual_seed(t.seed + 1_000_003 * d.rank)  # and draws its own dropout masks
        self.trainer = Trainer(self.model, t, spec.guard, self.device, 1, self.amp_dtype, self.injector,
                               spec.plasticity, dist=d, wrapped=wrapped)
        c = spec.continual
        self.ewc = EWC(self.model, c.consolidation_strength, d) if c.continual_learning else None
        replay = ReplayBuffer(c.replay_buffer_size, c.replay_strategy, t.seed + d.rank) if c.use_replay else None
        self.stream = DataStream(tasks, t.epochs, t.gradient_accumulation_steps, replay, c.replay_fraction,
                                 d.rank, d.world)
        self.trainer.total_steps = self._horizon(0)
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        self._param_names = [name_of[id(p)] for p in self.trainer.params]
        self.recovery = Recovery(spec.guard)
        self.best_val = math.inf
        self.matrix: list[list[float]] = []
        self.task_start_step = 0
        self.report = Reporter(self.out if d.main else None, self.stream_out, t.progress if d.main else "lines",
                               tensorboard=t.tensorboard)
        self.probe = self.trainer.probe = BlockProbe(self.model, d)
        self.monitor = Monitor(self.report, spec.guard, t.gradient_clip, t.log_every, 0)
        if d.main:
            if t.overwrite:
                for name in self._used:
                    shutil.rmtree(self.out / name) if (self.out / name).is_dir() else (self.out / name).unlink()
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(d)
        if ckpt is not None:
            self._restore(ckpt)
            from_last = self._resumed_from == self.checkpoints.last
            if from_last and ckpt.get("kept") and not self.checkpoints.kept_path(self.trainer.step).exists():
                self.checkpoints.relink()  # the run died between writing last.pt and linking it
            self._write_quarantine()
        if d.main:
            self._write_config()
            save_tokenizer(self.tokenizer, self.out)  # lsnn sample / eval / export read it
        barrier(d)

    @property
    def tasks(self) -> list[TaskData]:
        return self.stream.tasks

    def _check_output_dir(self) -> None:
        """Everything wrong with --output-dir, found before anything is written (a resume
        first puts back what a writer killed mid-write left behind)."""
        t, d = self.spec.train, self.dist
        need = 2 * checkpoint_bytes(self.spec.model, t) + 2**20
        main_first(d, lambda: check_output_dir(self.out, need), (BadInput,), others=False)
        if t.resume and d.main:
            recover_dirs(self.checkpoints.root)
            remove_stale_temporaries(self.out, self.checkpoints.root)
        barrier(d)
        self._used = [name for name in RUN_FILES if (self.out / name).exists()]
        if t.resume and not self.checkpoints.last.exists():
            raise BadInput(f"--resume: no checkpoint at {self.checkpoints.last}; start without --resume or fix "
                           "--output-dir")
        if not t.resume and self._used and not t.overwrite:
            raise BadInput(f"--output-dir {self.out} already holds a run ({', '.join(self._used)}); pass --resume to "
                           "continue it, --overwrite to start over (deleting those files only), or choose another "
                           "--output-dir")

    def _say(self, text: str) -> None:
        """A line before the reporter exists (set-up), from rank 0."""
        self.stream_out.write(text + "\n")
        self.stream_out.flush()

    def _load_resume_checkpoint(self) -> dict[str, Any]:
        """last.pt; if it is corrupt, the newest intact checkpoint, saying which."""
        self._resumed_from = self.checkpoints.last
        try:
            return self.checkpoints.load(self.checkpoints.last)  # sharded: its shards come in _restore
        except UnreadableCheckpoint as e:
            first = e
        self._say(f"warning: {first}")
        found = []
        for path in [p for _, p in reversed(self.checkpoints.kept())] + [self.checkpoints.best]:
            if path.exists():
                try:
                    found.append((self.checkpoints.load(path), path))
                except UnreadableCheckpoint as e:
                    self._say(f"warning: {e}")
        if not found:
            raise BadInput(f"--resume: {first}; no intact checkpoint to fall back on in {self.checkpoints.root}; "
                           "start without --resume (and --overwrite)")
        state, self._resumed_from = max(found, key=lambda f: f[0]["trainer"]["attempt"])  # the newest
        self._say(f"resuming from {self._resumed_from.relative_to(self.out)} (step {state['trainer']['step']}) "
                  "instead")
        return state

    def _template(self) -> dict[str, Any]:
        """A fresh state with this rank's shards where a sharded checkpoint has them."""
        return copy.deepcopy(self._state())

    def _horizon(self, task: int) -> int:
        """The schedule's length for ``task``: its epochs, capped by --max-steps (which
        with --continual-learning is a budget per task)."""
        t = self.spec.train
        per_task = self.spec.continual.continual_learning
        batches = len(self.tasks[task].train) if per_task else sum(len(x.train) for x in self.tasks)
        horizon = max(batches // t.gradient_accumulation_steps * t.epochs, 1)
        return min(horizon, t.max_steps) if t.max_steps else horizon

    def _write_config(self) -> None:
        config = {
            **self._configs(),
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "tasks": [task.name for task in self.tasks],
            "corpus": self.fingerprint,
            "data": self.data_summary,  # the prepared corpus: where, from what, the tokenizer's sample
            "device": str(self.device),
            "precision": _PRECISION[self.amp_dtype],
            "distributed": {"mode": self.dist.mode, "world": self.dist.world},
            "torch": torch.__version__,
        }
        atomic_write(self.out / "config.json", json.dumps(config, indent=2, default=str))

    def _configs(self) -> dict[str, Any]:
        s = self.spec
        return {"model": s.model.to_dict(), "train": s.train.to_dict(), "guard": s.guard.to_dict(),
                "plasticity": s.plasticity.to_dict(), "continual": s.continual.to_dict()}

    # the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        try:
            return self._fit()
        finally:
            self.report.close()  # the bar, and the TensorBoard files

    def _fit(self) -> int:
        self._announce()
        if not self.spec.train.resume:
            self._snapshot()  # step 0; a resumed run restores the snapshot schedule instead
        main = threading.current_thread() is threading.main_thread()  # only it may install handlers
        previous = {s: signal.signal(s, self._on_signal) for s in _EXIT_ON} if main else {}
        flushed = _denormals_flushed()
        if self.device.type == "cpu":
            # Subnormal floats run ~10x slower on x86; a Transformer LM at lr 1e-4 measured
            # 208 ms a step against 17 ms with them flushed. Values below 1.2e-38 lose nothing.
            torch.set_flush_denormal(True)
        try:
            code = self._loop()
        except Unrecoverable as e:
            return self._unrecoverable(e)
        except KeyboardInterrupt:  # a second Ctrl-C during a step: stop now, keep the last checkpoint
            self.report.line(f"interrupted twice at step {self.trainer.step}: stopped without saving; "
                             f"{self.checkpoints.last} is intact")
            return EXIT_INTERRUPTED
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            torch.set_flush_denormal(flushed)  # process-wide state: leave it as it was
        if code is not None:
            return code
        return self._finish()

    def _finish(self) -> int:
        """The end: never "done" with weights that are not finite or a last state unsaved."""
        if not self._weights_finite:
            self.report.record("stop", step=self.trainer.step, reason="nonfinite_weights",
                               error="the weights are not finite at the end of the run")
            self.report.line(f"error: the weights are not finite at the end of the run (step {self.trainer.step}); "
                             f"the last checkpoint with finite weights is step {self._saved_step} in "
                             f"{self.checkpoints.root}. With --no-guard nothing stops a bad step: drop it")
            return EXIT_UNRECOVERABLE
        if self._unsaved is not None and not self._save(keep=self._healthy):  # one more try
            self.report.line(f"error: training finished but its last checkpoint could not be written "
                             f"({self._unsaved}); {self.checkpoints.root} holds step {self._saved_step}. Free some "
                             "space and run the same command with --resume to redo the steps since")
            return EXIT_UNSAVED
        self._draw_report()
        self.report.line(f"done: {self.trainer.step} steps; checkpoints in {self.checkpoints.root}")
        return EXIT_OK

    def _draw_report(self) -> None:
        """report.png and report.html from metrics.jsonl (rank 0; --no-report skips it)."""
        if not (self.spec.train.report and self.dist.main):
            return
        from stability.healthreport import ReportError, write_report

        try:
            png, _ = write_report(self.out)
        except (ReportError, OSError) as e:  # a full disk: the run itself is saved; say so, go on
            self.report.warn(f"could not write the health report: {e}")
            return
        self.report.line(f"health report: {png} and {png.with_suffix('.html').name}")

    def _loop(self) -> int | None:
        """Train until the data or the budget ends; an exit code if a signal stopped it."""
        t = self.spec.train
        while not (self._done or self.stream.finished):
            window = self.stream.next_window()
            stepped = bool(window.positions)  # every batch left may be quarantined
            if stepped:
                if self._sync_after(window):
                    self.probe.arm()  # the blocks record of the coming sync point: hooks for this step only
                self._train(window)
            self.stream.advance(window)
            step = self.trainer.step
            boundary = window.epoch_end is not None
            budget = self._budget_spent()
            periodic = stepped and t.checkpoint_every > 0 and step % t.checkpoint_every == 0
            due = (stepped and step % t.log_every == 0) or boundary or budget or periodic
            if not due:
                self.probe.take()  # armed for a sync point that did not come: its hooks go now
            if due and self._sync():  # rolled back: the window's epoch and task ends never happened
                if self._stop_agreed(due):
                    return self._interrupted()
                continue
            if boundary or budget:
                self._boundary(window, budget)
            elif periodic:
                self._save(keep=self._healthy)
            if self._stop_agreed(due):
                return self._interrupted()
        return None

    def _sync_after(self, window: Window) -> bool:
        """Whether the step about to train ``window`` ends at a sync point, as _loop decides
        after it (arming one step too many only costs that step its hooks)."""
        t, step = self.spec.train, self.trainer.step + 1
        used = step - (self.task_start_step if self.spec.continual.continual_learning else 0)
        return (step % t.log_every == 0 or window.epoch_end is not None or bool(t.max_steps and used >= t.max_steps)
                or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0))

    def _stop_agreed(self, sync_point: bool) -> bool:
        """Whether to stop for a signal now: at once with one process; under torchrun at
        the next sync point, when every rank learns whether any rank got one, so all stop
        at the same step and none is left waiting in a collective."""
        if not self.dist.active:
            return self.stop_signal is not None
        if not sync_point:
            return False
        signals = gather(self.dist, self.stop_signal) if any_rank(self.dist, self.stop_signal is not None) else []
        self.stop_signal = next((sig for sig in signals if sig is not None), None)
        return self.stop_signal is not None

    def _train(self, window: Window) -> None:
        batches = [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                   for x, y in self.stream.batches(window)]
        out = self.trainer.train_step(batches)
        self._steps[self.trainer.step] = [list(window.positions), None]
        horizon = self.spec.guard.rollback_after + 2 * self.spec.train.log_every  # what a rollback looks back on
        for old in [s for s in self._steps if s <= self.trainer.step - horizon]:
            del self._steps[old]
        self._last_pos = window.positions[-1]
        self.monitor.tokens += out.tokens
        self.report.progress(self.trainer.step - self.task_start_step, self.trainer.total_steps,
                             f"task {self._last_pos.task + 1} epoch {self._last_pos.epoch + 1}")

    def _budget_spent(self) -> bool:
        t = self.spec.train
        if not t.max_steps or self.stream.finished:
            return False
        used = self.trainer.step - (self.task_start_step if self.spec.continual.continual_learning else 0)
        return used >= t.max_steps

    # sync points --------------------------------------------------------------------------
    def _sync(self) -> bool:
        """Read the device counters (one host sync) and act on them; True if it rolled back."""
        step = self.trainer.step
        blocks = self.probe.take()  # disarms: no hook outlives the armed step
        if step == self.monitor.last_sync_step:
            return False
        counters = self.trainer.guard.read(extra=blocks)  # host sync, the probe's values included
        rows = self.monitor.rows(counters["history"], step)
        for r in rows:
            if r["step"] in self._steps:
                self._steps[r["step"]][1] = r["reason"]
        self.monitor.tally(rows, self._last_pos.epoch + 1, self._describe_step)
        extra: dict[str, Any] = {"task": self._last_pos.task + 1}
        if self.trainer.plasticity is not None:
            plast = self.trainer.plasticity.read()  # host sync
            self.monitor.plasticity(self._plasticity_seen, plast, step)
            self._plasticity_seen = extra["plasticity"] = plast
        self.monitor.step_line(rows, step, self._last_pos.epoch + 1, counters, **extra)
        if blocks is not None:
            self.report.record("blocks", step=step, **self.probe.fields(counters["extra"]))
        try:
            self.trainer.policy.check()
        except LossScaleError as e:
            raise Unrecoverable(str(e), self._diagnose("overflow", step)) from e
        self._healthy = counters["consecutive_skips"] == 0 and all(r["reason"] == "ok" for r in rows)
        self._bad_params = set() if self._healthy else self._bad_params | set(counters["bad_params"])
        if self.recovery.needs_rollback(counters["consecutive_skips"]):
            self._rollback(counters["consecutive_skips"], step)
            return True
        if self._healthy and self.recovery.due(counters["good_steps"]):
            self._snapshot(counters["good_steps"])
        return False

    def _describe_step(self, step: int) -> list[dict[str, Any]]:
        """The batches step ``step`` read: positions and source documents."""
        return [self.stream.describe(p) for p in self._steps.get(step, [[]])[0]]

    # epochs and tasks -----------------------------------------------------------------------
    def _boundary(self, window: Window, budget: bool) -> None:
        """An epoch or a task ended, or the --max-steps budget: summaries, the task's end,
        the next task's start, then a checkpoint (and, if healthy, a snapshot) of it all."""
        continual = self.spec.continual.continual_learning
        val = math.inf
        if window.epoch_end is not None:
            val = self._end_epoch(*window.epoch_end, complete=True)
        elif self.monitor.totals.steps:  # the budget cut the epoch short
            val = self._end_epoch(self._last_pos.task, self._last_pos.epoch, complete=False)
        ended = window.task_end if window.task_end is not None else (self._last_pos.task if budget else None)
        if ended is not None and continual:
            self._end_task(ended)
        if budget and continual and ended + 1 < len(self.tasks):
            self.stream.start_task(ended + 1)
        elif budget:
            self._done = True  # the position stays true, so --resume with more steps continues
        if (window.task_end is not None or budget) and not (self._done or self.stream.finished):
            self._start_task()
        if not self._save(keep=self._healthy):
            return  # weights are non-finite: recovery will roll back; no snapshot of this
        if val < self.best_val:
            self.best_val = val
            self.checkpoints.mark_best()
        if self._healthy:
            self._snapshot()

    def _end_epoch(self, task_i: int, epoch_i: int, complete: bool) -> float:
        """Validate and print the epoch's summary, once; returns the validation loss."""
        task = self.tasks[task_i]
        metrics = self.trainer.evaluate(self._val_batches(task))
        totals = self.monitor.totals
        skipped = sum(totals.skips.values())
        label = f"epoch {epoch_i + 1}/{self.spec.train.epochs}" + ("" if complete else " (stopped at --max-steps)")
        if len(self.tasks) > 1:
            label = f"task {task_i + 1}/{len(self.tasks)} {label}"
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
        self.monitor.totals = Totals()
        return metrics["val_loss"]

    def _end_task(self, task_i: int) -> None:
        """Consolidate (EWC), score replay, evaluate every task, print the matrix once."""
        task = self.tasks[task_i]
        if self.ewc is not None and self.ewc.strength > 0 and task_i + 1 < len(self.tasks):
            n = min(self.spec.continual.fisher_batches, len(task.train))
            self.report.line(f"task {task_i + 1}: estimating the EWC Fisher information on {n} batches")
            batches = [self._device(self.stream.raw(Position(task_i, 0, i))) for i in range(n)]
            used = self.ewc.consolidate(self.model, batches, model_loss, self.trainer.autocast)
            if used < len(batches):
                self.report.warn(f"task {task_i + 1}: {len(batches) - used} Fisher batches had non-finite "
                                 "gradients and were left out")
            self._set_loss_hook()
        replay = self.stream.replay
        if replay is not None and self.spec.continual.replay_strategy == "importance":
            per_pass = windows_per_pass(self.spec.train.sequence_length, self.model.cfg.vocab_size)
            replay.score(self.model, task_i, per_sequence_loss, self.device, per_pass)
        row = [self.trainer.evaluate(self._val_batches(t))["val_loss"] for t in self.tasks]
        self.matrix = [*self.matrix, row]
        stats = transfer(self.matrix)
        if not self.report.once(("task", task_i + 1)):
            return
        self.report.line(f"task {task_i + 1}/{len(self.tasks)} done: validation loss on every task")
        for line in format_matrix(self.matrix, [t.name for t in self.tasks]):
            self.report.line(line)
        self.report.line(f"  average loss over tasks 1-{task_i + 1}: {stats['average_loss']:.4f}; forgetting "
                         f"{stats['forgetting']:+.4f} (backward transfer {stats['backward_transfer']:+.4f})")
        self.report.record("task", step=self.trainer.step, task=task_i + 1, name=task.name, losses=row, **stats)

    def _start_task(self) -> None:
        """A new task gets its own warm-up and cosine schedule, its own --max-steps, and
        fresh loss-spike statistics (its domain starts at another loss level)."""
        self.task_start_step = self.trainer.step
        self.trainer.lr_offset = self.trainer.guard.good_steps.clone()
        self.trainer.total_steps = self._horizon(self.stream.position.task)
        self.trainer.guard.reset_loss_stats()

    def _set_loss_hook(self) -> None:
        self.trainer.loss_hook = self.ewc.penalty if self.ewc is not None and self.ewc.active else None

    def _device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)

    def _val_limit(self, task: TaskData) -> int:
        n = len(task.val)
        return min(self.spec.train.eval_batches or n, n)

    def _val_batches(self, task: TaskData):
        """--eval-batches batches spread evenly across the validation split (the first N
        would be a handful of files, unlike the split the baselines describe), or all of it;
        each rank evaluates its rows of each. A long validation says how far it got."""
        n, limit, d = len(task.val), self._val_limit(task), self.dist
        started = shown = time.monotonic()
        if limit >= 100:
            self.report.line(f"validating {task.name} on {limit} batches")
        for i in range(limit):
            x, y = task.val.get(0, i * n // limit)
            yield self._device((x[d.rank::d.world], y[d.rank::d.world]) if d.active else (x, y))
            now = time.monotonic()
            if now - shown > 10:
                self.report.line(f"validating {task.name}: {i + 1}/{limit} batches, {now - started:.0f}s")
                shown = now

    # state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Everything the run knows: a checkpoint, and (deep-copied) a snapshot."""
        return {
            "trainer": self.trainer.state_dict(),
            "position": self.stream.position.as_dict(),  # the next batch to read
            "stream": self.stream.state_dict(),
            "ranks": gather(self.dist, {"rng": rng_state(), **self.stream.rank_state()}),  # each rank's own
            "best_val": self.best_val,
            "window": {"last_sync_step": self.monitor.last_sync_step, "totals": self.monitor.totals.state_dict(),
                       "healthy": self._healthy, "last_pos": self._last_pos.as_dict(),
                       "steps": [[s, [p.as_dict() for p in ps], r] for s, (ps, r) in sorted(self._steps.items())]},
            "continual": {"matrix": self.matrix, "task_start_step": self.task_start_step,
                          "ewc": self.ewc.state_dict() if self.ewc else None},
            "recovery": self.recovery.state_dict(),
            "metrics_offset": self.report.offset(),
            "config": self._configs(),
            "corpus": self.fingerprint,
        }

    def _restore(self, state: dict[str, Any], rollback: bool = False) -> None:
        """Load a checkpoint (resume) or a rollback target. A rollback keeps what the run
        has learnt since: the quarantine, the recovery state, the best validation loss,
        the epoch's totals and metrics.jsonl as written."""
        if self.checkpoints.sharded and not rollback:
            state = self.checkpoints.materialize(state, self._template())
        mine = state["ranks"][self.dist.rank]
        self.trainer.load_state_dict(state["trainer"])
        self.stream.load_state_dict(state["stream"], mine, keep_quarantine=rollback)
        set_rng_state(mine["rng"])
        cont = state["continual"]
        self.matrix, self.task_start_step = [list(r) for r in cont["matrix"]], cont["task_start_step"]
        if self.ewc is not None:
            self.ewc.load_state_dict(cont["ewc"])
        self._set_loss_hook()
        window = state["window"]
        self._last_pos = Position(**window["last_pos"])
        if rollback:
            self.monitor.last_sync_step = self.trainer.step
            self._steps = {s: v for s, v in self._steps.items() if s <= self.trainer.step}
        else:
            self.recovery.load_state_dict(state["recovery"])
            self.best_val = state["best_val"]
            self.monitor.last_sync_step = window["last_sync_step"]
            self.monitor.totals = Totals.from_state(window["totals"])
            self._saved_step = self.trainer.step
            self._healthy = window["healthy"]
            self._steps = {s: [[Position(**p) for p in ps], r] for s, ps, r in window["steps"]}
            self.report.truncate_to(state["metrics_offset"])
        self.trainer.lr_factor = torch.full((), self.recovery.lr_factor, device=self.device)

    def _save(self, keep: bool) -> bool:
        """Write last.pt (and with ``keep`` a kept checkpoint of this step). With non-finite
        weights, or when the disk refuses (full, gone read-only), write nothing, keep the
        previous checkpoint, warn and return False: the next save tries again. Every rank
        returns the same answer."""
        self._saving = True
        refused = failed = None
        try:
            self._persist_snapshot()
            self.checkpoints.save(self._state(), keep=keep)
        except CorruptStateError as e:  # every rank finds the same weights non-finite
            refused = e
        except OSError as e:  # rank 0's write (or, sharded, any rank's) failed
            failed = e
        finally:
            self._saving = False
            barrier(self.dist)  # no rank reads a checkpoint before rank 0 has written it
        failed_everywhere = any_rank(self.dist, failed is not None)
        previous = f"step {self._saved_step}" if self._saved_step is not None else "none yet"
        if refused is not None:
            self.report.warn(f"{refused}; keeping the previous checkpoint ({previous})")
            self._weights_finite = False
            return False
        self._weights_finite = True
        if failed_everywhere:
            why = f"{failed.strerror or failed}" if failed is not None else "on another rank"
            self.report.warn(f"could not write {self.checkpoints.last} at step {self.trainer.step} ({why}); "
                             f"keeping the previous checkpoint ({previous}) and trying again at the next save")
            self._unsaved = failed or OSError("the write failed on another rank")
            return False
        self._unsaved, self._saved_step = None, self.trainer.step
        self._write_quarantine()
        return True

    def _persist_snapshot(self) -> None:
        """Before last.pt moves on, put the in-memory snapshot on disk if it is newer than
        every kept checkpoint: a restart then rolls back to the same state."""
        snap = self.recovery.snapshot
        if snap is None or snap.persisted:
            return
        kept = self.checkpoints.kept()
        if not kept or snap.step > kept[-1][0]:
            self.checkpoints.keep_state(snap.state, snap.step)
        snap.persisted = True

    def _snapshot(self, good_steps: int | None = None) -> None:
        if good_steps is None:
            good_steps = int(self.trainer.guard.good_steps)  # host sync (epoch ends, start)
        self.recovery.take(copy.deepcopy(self._state()), self.trainer.step, good_steps)

    def _write_quarantine(self) -> None:
        """quarantine.jsonl: every batch a rollback took out of the stream, with its sources."""
        if not self.dist.main:
            return
        path = self.out / "quarantine.jsonl"
        lines = [json.dumps({**self.stream.describe(p), **why}) for p, why in sorted(self.stream.quarantined.items())]
        if lines or path.exists():
            atomic_write(path, "".join(line + "\n" for line in lines))

    # recovery ------------------------------------------------------------------------------
    def _failed_steps(self, consecutive: int, step: int) -> list[int]:
        """The steps of the skip streak that triggered a rollback (fp16 overflows belong to
        the loss scale and do not count)."""
        scaled = self.trainer.policy.enabled
        failed, s = [], step
        while len(failed) < consecutive and s in self._steps:
            reason = self._steps[s][1]
            if reason in (None, "ok"):
                break
            if not (scaled and reason == REASONS[OVERFLOW]):
                failed.append(s)
            s -= 1
        return failed[::-1]

    def _culprit_modules(self) -> list[str]:
        """The modules whose parameters had non-finite gradients on the failing steps
        themselves (the guard keeps the mask on the device and reads it at sync points)."""
        names = [self._param_names[i] for i in sorted(self._bad_params)]
        return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))

    def _culprits(self) -> str:
        modules = self._culprit_modules()
        if not modules:
            return ""
        more = f" (+{len(modules) - 5} more)" if len(modules) > 5 else ""
        return f"gradients went non-finite in: {', '.join(modules[:5])}{more}"

    def _rollback_target(self) -> tuple[dict[str, Any], str, bool] | None:
        """The newest good state, where it came from, and whether it is on disk: a kept
        checkpoint newer than the in-memory snapshot, else the snapshot (after a restart
        the snapshot is gone and the kept checkpoints are not)."""
        snap = self.recovery.snapshot
        for step, path in reversed(self.checkpoints.kept()):
            if snap is not None and step <= snap.step:
                break
            try:
                return self.checkpoints.load(path, self._template()), str(path.relative_to(self.out)), True
            except UnreadableCheckpoint as e:
                self.report.warn(f"{e}; trying an older checkpoint")
        if snap is not None:
            return copy.deepcopy(snap.state), f"the in-memory snapshot of step {snap.step}", snap.persisted
        return None

    def _rollback(self, consecutive: int, step: int) -> None:
        failed_steps = self._failed_steps(consecutive, step)
        failed = [p for s in failed_steps for p in self._steps[s][0]]
        reason = self._steps[step][1] if step in self._steps else "unknown"
        target = None if self.recovery.exhausted() else self._rollback_target()
        if target is None:
            why = f"after {self.recovery.rollbacks} rollbacks" if self.recovery.exhausted() else "and no good state"
            raise Unrecoverable(f"{consecutive} consecutive skipped steps (last: {reason}) {why}",
                                self._diagnose(reason, step))
        state, source, on_disk = target
        self.recovery.rollbacks += 1
        self.stream.quarantine(failed, step, reason)
        self._restore(state, rollback=True)
        self.checkpoints.drop_after(self.trainer.step)
        self.recovery.take(state, self.trainer.step, int(self.trainer.guard.good_steps))  # host sync, rare
        self.recovery.snapshot.persisted = on_disk
        culprits = self._culprits()
        self.report.warn(
            f"step {step}: {consecutive} consecutive skipped steps ({reason}{'; ' + culprits if culprits else ''}); "
            f"rolled back to step "
            f"{self.trainer.step} from {source} (rollback {self.recovery.rollbacks}/{self.spec.guard.max_rollbacks}), "
            f"quarantined {len(failed)} batches (see quarantine.jsonl), learning rate x{self.recovery.lr_factor:g}")
        # the record leaves out where the state came from (memory, or a kept checkpoint after a
        # restart): the same state either way, and a resumed run must write the same records
        self.report.record("rollback", step=step, to_step=self.trainer.step, reason=reason,
                           rollbacks=self.recovery.rollbacks, failed_batches=len(failed),
                           batches=[self.stream.describe(p) for p in failed])
        self._save(keep=False)  # the rolled-back state is what a restart must continue from

    def _diagnose(self, reason: str, step: int) -> dict[str, Any]:
        last = self._steps.get(step, [[]])[0] or [self._last_pos]
        diag = diagnose(self.model, self._device(self.stream.raw(last[-1])), lm_loss, self.trainer.autocast)
        seen = self._culprit_modules()
        report = {"step": step, "reason": reason, "nonfinite_weights": diag.nonfinite_weights,
                  "nonfinite_activations": diag.nonfinite_activations, "nonfinite_grads": diag.nonfinite_grads,
                  "nonfinite_grads_seen": seen, "loss": diag.loss,
                  "lines": [*diag.lines(), *([self._culprits()] if seen else [])],
                  "batches": [self.stream.describe(p) for p in last]}
        if self.dist.active:  # every rank diagnosed its own rows of the batch; rank 0 names the bad ones
            found = gather(self.dist, {"loss": diag.loss, "activations": diag.nonfinite_activations,
                                       "peer_skips": int(self.trainer.guard.peer_skips)})  # host sync
            bad = [r for r, f in enumerate(found) if not math.isfinite(f["loss"]) or f["activations"]]
            report["ranks"] = found
            report["bad_ranks"] = bad
            report["lines"].append(f"ranks whose own batch went bad: {', '.join(map(str, bad)) or 'none'} "
                                   f"(of {self.dist.world}; the others skipped for them)")
        return report

    def _unrecoverable(self, e: Unrecoverable) -> int:
        report = e.report
        target = self._rollback_target()
        saved = None
        self.report.record("stop", step=report["step"], reason=report["reason"], error=str(e))
        if target is not None:  # the last good state, with what recovery learnt and the log as it is
            state = {**target[0], "recovery": self.recovery.state_dict(), "metrics_offset": self.report.offset()}
            state["stream"] = {**state["stream"], "quarantined": self.stream.state_dict()["quarantined"]}
            try:
                self.checkpoints.save(state, keep=False)
                saved = self.checkpoints.last
            except CorruptStateError as err:
                self.report.warn(f"{err}; keeping the previous checkpoint")
        barrier(self.dist)
        last_good_step = target[0]["trainer"]["step"] if target else None
        report.update(error=str(e), last_good_checkpoint=str(saved) if saved else None, last_good_step=last_good_step)
        if self.dist.main:
            atomic_write(self.out / "report.json", json.dumps(report, indent=2, default=str))
        self.report.line(f"error: training stopped at step {report['step']}: {e}")
        for line in report["lines"]:
            self.report.line(f"  {line}")
        if saved:
            self.report.line(f"  last good state (step {last_good_step}) saved to {saved}")
        self.report.line(f"  report: {self.out / 'report.json'}")
        self._draw_report()
        return EXIT_UNRECOVERABLE

    # interrupts ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            return
        if self._saving:  # never abandon a checkpoint half-way
            self.report.line("still saving the checkpoint; it finishes in a moment")
            return
        raise KeyboardInterrupt  # a second signal during a step stops at once

    def _interrupted(self) -> int:
        self._save(keep=False)  # with the unlogged window, so the resumed run logs it as if never stopped
        name = signal.Signals(self.stop_signal).name
        self.report.line(f"{name} at step {self.trainer.step}: saved {self.checkpoints.last}; "
                         "continue with the same command and --resume")
        return _EXIT_ON[self.stop_signal]

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
        if t.resume:
            pos = self.stream.position
            self.report.line(f"resumed from {self.checkpoints.last} at step {self.trainer.step} (task {pos.task + 1}, "
                             f"epoch {pos.epoch + 1}, batch {pos.index}); {self.recovery.rollbacks} rollbacks so far, "
                             f"{len(self.stream.quarantined)} batches quarantined")


def run(spec: RunSpec, stream: TextIO | None = None) -> int:
    """Train; return the exit code. Bad input raises before anything is written."""
    r = Run(spec, stream)
    r.setup()
    return r.fit()


__all__ = ["BadInput", "Position", "Run", "RunSpec", "run"]
