"""The run's checkpoint, composed from its parts, each of which keeps its own state.

A run has one fixed set of parts (``PARTS``): the trainer, the data stream, the monitor, the
step ledger, recovery, the tasks and the run itself. ``Checkpointer`` is handed them and
writes each one's ``state_dict()`` under its own key, and each rank's own state (its RNG
and the stream's replay buffer) under ``"ranks"``:

    {"format": 2, "trainer": ..., "stream": ..., "monitor": ..., "ledger": ...,
     "recovery": ..., "tasks": ..., "run": ..., "ranks": [{"rng": ..., "stream": ...}, ...]}

A resume calls every part's ``load_state_dict``. A rollback calls ``rewind`` (else
``load_state_dict``) on every part but recovery and the run, which keep what they learnt
since (the rollbacks so far, metrics.jsonl as written); each part's ``rewind`` says what of
its own it keeps. A checkpoint written before the parts kept their own state (format 1)
is converted on loading; one of a format this version does not know is refused by name.

The files themselves (atomic writes, kept checkpoints, sharding) are ``CheckpointDir``'s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from stability.atomic import atomic_write
from stability.checkpoint import CheckpointDir, CorruptStateError, UnreadableCheckpoint, rng_state, set_rng_state
from stability.distributed import Dist, any_rank, barrier, gather
from stability.preflight import BadInput
from stability.recovery import GoodState, Recovery
from stability.reporting import Reporter
from stability.stream import DataStream
from stability.trainer import Trainer

FORMAT = 2
PARTS = ("trainer", "stream", "monitor", "ledger", "recovery", "tasks", "run")
KEEP_LEARNING = ("recovery", "run")  # parts a rollback leaves as they are


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IncompatibleCheckpoint(ValueError):
    """A checkpoint this version of lsnn cannot continue: another format, or a part missing."""


def upgrade(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` in this version's layout: format 1 (lsnn before each part kept its own
    state) is converted; a format this version does not know, or a missing part, is refused."""
    found = state.get("format", 1 if "window" in state else None)
    if found == 1:
        state = _from_format_1(state)
    elif found != FORMAT:
        raise IncompatibleCheckpoint(
            f"{path} is a checkpoint of format {found!r}; this version of lsnn reads formats 1-{FORMAT}. Resume it "
            "with the lsnn that wrote it, or start over without --resume (with --overwrite)")
    missing = [part for part in (*PARTS, "ranks") if part not in state]
    if missing:
        raise IncompatibleCheckpoint(
            f"{path} has no state for {', '.join(missing)}; it was not written whole by this version of lsnn. "
            "Resume it with the lsnn that wrote it, or start over without --resume (with --overwrite)")
    return state


def _from_format_1(old: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the monitor's, the ledger's and the run's state under "window", the
    tasks' under "continual" and "best_val", and the data position twice."""
    window, tasks = old["window"], old["continual"]
    return {
        "format": FORMAT, "trainer": old["trainer"], "stream": old["stream"], "recovery": old["recovery"],
        "monitor": {"last_sync_step": window["last_sync_step"], "totals": window["totals"]},
        "ledger": {"step": old["trainer"]["step"], "last": window["last_pos"], "steps": window["steps"]},
        "tasks": {**tasks, "best_val": old["best_val"]},
        "run": {"config": old["config"], "corpus": old["corpus"], "healthy": window["healthy"],
                "metrics_offset": old["metrics_offset"]},
        "ranks": [{"rng": r["rng"], "stream": {"replay": r["replay"]}} for r in old["ranks"]],
        "kept": old.get("kept", False),
    }


def load_for_resume(checkpoints: CheckpointDir, say: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """last.pt, in this version's layout; if it is corrupt, the newest intact checkpoint,
    saying which. Sharded, its shards are read later, into the parts (``Checkpointer.resume``)."""
    try:
        return _readable_or_refused(checkpoints, checkpoints.last), checkpoints.last
    except UnreadableCheckpoint as e:
        first = e
    say(f"warning: {first}")
    found = []
    for path in [p for _, p in reversed(checkpoints.kept())] + [checkpoints.best]:
        if path.exists():
            try:
                found.append((_readable_or_refused(checkpoints, path), path))
            except UnreadableCheckpoint as e:
                say(f"warning: {e}")
    if not found:
        raise BadInput(f"--resume: {first}; no intact checkpoint to fall back on in {checkpoints.root}; "
                       "start without --resume (and --overwrite)")
    state, path = max(found, key=lambda f: f[0]["trainer"]["attempt"])  # the newest
    say(f"resuming from {path.relative_to(checkpoints.root.parent)} (step {state['trainer']['step']}) instead")
    return state, path


def _readable_or_refused(checkpoints: CheckpointDir, path: Path) -> dict[str, Any]:
    try:
        return upgrade(checkpoints.load(path), path)
    except IncompatibleCheckpoint as e:  # not damage: an older checkpoint would not do either
        raise BadInput(f"--resume: {e}") from e


class Checkpointer:
    def __init__(self, directory: CheckpointDir, report: Reporter, dist: Dist, *, trainer: Trainer,
                 stream: DataStream, monitor: Stateful, ledger: Stateful, recovery: Recovery, tasks: Stateful,
                 run: Stateful):
        self.directory, self.report, self.dist = directory, report, dist
        self.trainer, self.stream, self.recovery = trainer, stream, recovery
        self.parts: dict[str, Stateful] = {"trainer": trainer, "stream": stream, "monitor": monitor,
                                           "ledger": ledger, "recovery": recovery, "tasks": tasks, "run": run}
        self.saving = False  # a write is under way (a second Ctrl-C lets it finish)
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.unsaved: OSError | None = None  # why the last save could not be written, if it could not
        self.weights_finite = True  # the last save found the weights finite

    # -- composing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the run knows: a checkpoint, and (copied by ``Recovery.take``) a snapshot."""
        mine = {"rng": rng_state(), "stream": self.stream.rank_state_dict()}
        return {"format": FORMAT, **{key: part.state_dict() for key, part in self.parts.items()},
                "ranks": gather(self.dist, mine)}  # each rank's own

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every part from ``state`` (a resume)."""
        for key, part in self.parts.items():
            part.load_state_dict(state[key])
        self._load_rank(state)

    def rewind(self, state: dict[str, Any]) -> None:
        """Back to ``state`` (a rollback): every part but those that keep learning."""
        for key, part in self.parts.items():
            if key not in KEEP_LEARNING:
                getattr(part, "rewind", part.load_state_dict)(state[key])
        self._load_rank(state)

    def _load_rank(self, state: dict[str, Any]) -> None:
        mine = state["ranks"][self.dist.rank]
        self.stream.load_rank_state_dict(mine["stream"])
        set_rng_state(mine["rng"])

    def template(self) -> dict[str, Any]:
        """A fresh state with this rank's shards where a sharded checkpoint has them."""
        return copy.deepcopy(self.state_dict())

    # -- reading -----------------------------------------------------------------------------
    def resume(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state``, read from ``path`` by ``load_for_resume``."""
        if self.directory.sharded:
            state = self.directory.materialize(state, self.template(), path)
        self.load_state_dict(state)
        self.saved_step = self.trainer.step
        if path == self.directory.last and state.get("kept") and not self.directory.kept_path(self.saved_step).exists():
            self.directory.relink()  # the run died between writing last.pt and linking it
        self.write_quarantine()

    def last_good(self) -> GoodState | None:
        """The newest good state: a kept checkpoint newer than the in-memory snapshot, else
        the snapshot (after a restart the snapshot is gone and the kept checkpoints are not)."""
        snap = self.recovery.snapshot
        for step, path in reversed(self.directory.kept()):
            if snap is not None and step <= snap.step:
                break
            try:
                return GoodState(self._load(path), str(path.relative_to(self.directory.root.parent)), True)
            except (UnreadableCheckpoint, IncompatibleCheckpoint) as e:
                self.report.warn(f"{e}; trying an older checkpoint")
        if snap is not None:
            return GoodState(copy.deepcopy(snap.state), f"the in-memory snapshot of step {snap.step}", snap.persisted)
        return None

    def _load(self, path: Path) -> dict[str, Any]:
        state = upgrade(self.directory.load(path), path)  # sharded: state.pt alone, its shards next
        return self.directory.materialize(state, self.template(), path) if self.directory.sharded else state

    # -- writing -----------------------------------------------------------------------------
    def save(self, keep: bool) -> bool:
        """Write last.pt (and with ``keep`` a kept checkpoint of this step). With non-finite
        weights, or when the disk refuses (full, gone read-only), write nothing, keep the
        previous checkpoint, warn and return False: the next save tries again. Every rank
        returns the same answer."""
        self.saving = True
        refused = failed = None
        try:
            self._persist_snapshot()
            self.directory.save(self.state_dict(), keep=keep)
        except CorruptStateError as e:  # every rank finds the same weights non-finite
            refused = e
        except OSError as e:  # rank 0's write (or, sharded, any rank's) failed
            failed = e
        finally:
            self.saving = False
            barrier(self.dist)  # no rank reads a checkpoint before rank 0 has written it
        failed_everywhere = any_rank(self.dist, failed is not None)
        previous = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
        self.weights_finite = refused is None
        if refused is not None:
            self.report.warn(f"{refused}; keeping the previous checkpoint ({previous})")
            return False
        if failed_everywhere:
            why = f"{failed.strerror or failed}" if failed is not None else "on another rank"
            self.report.warn(f"could not write {self.directory.last} at step {self.trainer.step} ({why}); "
                             f"keeping the previous checkpoint ({previous}) and trying again at the next save")
            self.unsaved = failed or OSError("the write failed on another rank")
            return False
        self.unsaved, self.saved_step = None, self.trainer.step
        self.write_quarantine()
        return True

    def save_last_good(self) -> Path | None:
        """last.pt := the run as it stands (a stop, after rewinding to the last good state),
        without the retries of ``save``; None, with a warning, if its weights are not finite."""
        try:
            self.directory.save(self.state_dict(), keep=False)
        except CorruptStateError as e:
            self.report.warn(f"{e}; keeping the previous checkpoint")
            return None
        return self.directory.last

    def _persist_snapshot(self) -> None:
        """Before last.pt moves on, put the in-memory snapshot on disk if it is newer than
        every kept checkpoint: a restart then rolls back to the same state."""
        snap = self.recovery.snapshot
        if snap is None or snap.persisted:
            return
        kept = self.directory.kept()
        if not kept or snap.step > kept[-1][0]:
            self.directory.keep_state(snap.state, snap.step)
        self.recovery.persisted()

    def write_quarantine(self) -> None:
        """quarantine.jsonl: every batch a rollback took out of the stream, with its sources."""
        if not self.dist.main:
            return
        path = self.directory.root.parent / "quarantine.jsonl"
        stream = self.stream
        lines = [json.dumps({**stream.describe(p), **why}) for p, why in sorted(stream.quarantined.items())]
        if lines or path.exists():
            atomic_write(path, "".join(line + "\n" for line in lines))
