"""The data stream of a run: the one owner of the data position.

A run reads its training data as windows of micro-batches, one window per optimizer step,
task after task and epoch after epoch. ``DataStream`` holds the tasks, the position (the
next micro-batch to read), the quarantine (batches a rollback found bad, never read
again) and replay mixing. The run loop reads

    window = stream.next_window()    where the next step's micro-batches are; moves nothing
    ... train on stream.batches(window) ...
    stream.advance(window)           the position moves past it (the one writer)
    stream.rewind(state)             a rollback puts it back where a good state was

so a checkpoint or a snapshot taken after ``advance`` always means "the next batch to
read", and the epoch and task ends a window crosses are reported by the window itself,
never recomputed from positions (which a rollback moves back).

Positions are (task, epoch, index): batch ``index`` of ``epoch`` of task ``task``'s
training split. ``describe`` names a batch's sources (documents of the embedded corpus,
file paths for --data) so a skipped or quarantined batch can be found.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stability.config import RunSpec
from stability.continual import ReplayBuffer
from stability.data import TokenBatches
from stability.shards import PreparedCorpus, baselines, doc_offsets, load_prepared, progress_bar, task_tokens, \
    task_views
from stability.tokenizers import Tokenizer


@dataclass(frozen=True, order=True)
class Position:
    """Where the data stream stands: the next micro-batch to read."""

    task: int = 0
    epoch: int = 0
    index: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"task": self.task, "epoch": self.epoch, "index": self.index}


@dataclass
class TaskData:
    name: str
    train: TokenBatches
    val: TokenBatches
    unigram: float  # loss of predicting the validation split's own token frequencies
    unigram_acc: float  # accuracy of always predicting its most frequent token
    sources: Sequence[str] = field(default_factory=list)  # the training documents, in stream order
    offsets: Sequence[int] = field(default_factory=list)  # the token where each of them starts


# --- building the tasks, all of it before anything is written ------------------------------


def _mode_accuracy(tokens: torch.Tensor) -> float:
    """Next-token accuracy of always guessing the most frequent token."""
    targets = tokens[1:].long()
    return float(torch.bincount(targets).max()) / max(targets.numel(), 1)


def prepare_data(spec: RunSpec, say: Callable[[str], None] = lambda text: None
                 ) -> tuple[Tokenizer, PreparedCorpus, list[TaskData]]:
    """The tokenizer, the prepared corpus (``stability.shards``; prepared into the cache on
    first use, which ``say`` announces) and its tasks (one without --continual-learning),
    each reading its memory-mapped shards."""
    t = spec.train
    corpus = load_prepared(t, say, bar=progress_bar(t.progress))
    tok = corpus.tokenizer
    tasks = []
    for i, view in enumerate(task_views(corpus, spec.num_tasks)):
        train_tokens = task_tokens(corpus, "train", view.train_docs)
        val_tokens = task_tokens(corpus, "val", view.val_docs)
        train = TokenBatches(train_tokens, t.batch_size, t.sequence_length, seed=t.seed + i)
        val = TokenBatches(val_tokens, t.batch_size, t.sequence_length, shuffle=False, pad_id=tok.pad_id)
        unigram, unigram_acc = baselines(val_tokens, tok.vocab_size)
        tasks.append(TaskData(view.name, train, val, unigram, unigram_acc, corpus.names("train", view.train_docs),
                              doc_offsets(corpus, view.train_docs)))
    return tok, corpus, tasks


# --- the stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The micro-batches of one optimizer step, and what reading them ends."""

    positions: tuple[Position, ...]  # quarantined batches left out; may be empty
    after: Position  # where the stream stands once they are read
    epoch_end: tuple[int, int] | None = None  # (task, epoch) that the window finishes
    task_end: int | None = None  # the task that the window finishes


class DataStream:
    """Under distributed training every rank holds the same stream and position, and reads
    the rows ``rank, rank + world, ...`` of each batch (a disjoint, rank-strided slice of
    the same global window); the replay buffer is each rank's own."""

    def __init__(self, tasks: list[TaskData], epochs: int, accumulation: int,
                 replay: ReplayBuffer | None = None, replay_fraction: float = 0.25, rank: int = 0, world: int = 1):
        self.tasks, self.epochs, self.accumulation = tasks, epochs, accumulation
        self.replay, self.replay_fraction = replay, replay_fraction
        self.rank, self.world = rank, world
        self.position = Position()
        self.quarantined: dict[Position, dict[str, Any]] = {}  # position -> why (step, reason)

    @property
    def finished(self) -> bool:
        return self.position.task >= len(self.tasks)

    # -- reading ---------------------------------------------------------------------------
    def next_window(self) -> Window:
        """The next step's micro-batches from the position on, skipping quarantined ones."""
        pos = self.position
        n = len(self.tasks[pos.task].train)
        positions, index = [], pos.index
        while len(positions) < self.accumulation and index < n:
            here = Position(pos.task, pos.epoch, index)
            if here not in self.quarantined:
                positions.append(here)
            index += 1
        if index < n:
            return Window(tuple(positions), Position(pos.task, pos.epoch, index))
        ended = (pos.task, pos.epoch)
        if pos.epoch + 1 < self.epochs:
            return Window(tuple(positions), Position(pos.task, pos.epoch + 1, 0), epoch_end=ended)
        return Window(tuple(positions), Position(pos.task + 1, 0, 0), epoch_end=ended, task_end=pos.task)

    def raw(self, pos: Position) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the training batch at ``pos``: (inputs, targets), each (b, l)."""
        x, y = self.tasks[pos.task].train.get(pos.epoch, pos.index)
        if self.world == 1:
            return x, y
        return x[self.rank::self.world], y[self.rank::self.world]

    def batches(self, window: Window) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The window's batches as a step trains on them: with replay, each batch's last
        sequences swapped for earlier tasks' (this draws from the replay buffer's RNG)."""
        return [self._mix_replay(*self.raw(p), p.task) for p in window.positions]

    def _mix_replay(self, x: torch.Tensor, y: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.replay is None:
            return x, y
        k = max(1, round(self.replay_fraction * x.shape[0]))
        old = self.replay.sample(k, task)
        if old is None:
            return x, y
        x, y = x.clone(), y.clone()
        x[-k:], y[-k:] = old[:, :-1], old[:, 1:]
        return x, y

    # -- moving ----------------------------------------------------------------------------
    def advance(self, window: Window) -> None:
        """The window was trained on: offer its own sequences to replay, move past it."""
        if self.replay is not None:
            for p in window.positions:
                x, y = self.raw(p)
                self.replay.offer(torch.cat([x, y[:, -1:]], dim=1), p.task)
        self.position = window.after

    def start_task(self, task: int) -> None:
        """Jump to the start of ``task`` (a --max-steps budget ended the one before)."""
        self.position = Position(task, 0, 0)

    def quarantine(self, positions: list[Position], step: int, reason: str) -> None:
        for p in positions:
            self.quarantined.setdefault(p, {"step": step, "reason": reason})

    # -- finding the data ------------------------------------------------------------------
    def describe(self, pos: Position) -> dict[str, Any]:
        """The batch at ``pos``: its position, window ids and source documents."""
        task = self.tasks[pos.task]
        ids = task.train.window_ids(pos.epoch, pos.index)
        length = task.train.seq_len
        names: list[str] = []
        for w in ids:
            first = bisect.bisect_right(task.offsets, w * length) - 1
            last = bisect.bisect_right(task.offsets, w * length + length) - 1
            for name in task.sources[max(first, 0):last + 1]:
                if name not in names:
                    names.append(name)
        return {**pos.as_dict(), "windows": ids, "sources": names}

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What every rank shares: the position and the quarantine."""
        return {
            "position": self.position.as_dict(),
            "quarantined": [[*p.as_dict().values(), why["step"], why["reason"]]
                            for p, why in sorted(self.quarantined.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume: the position and the quarantine of a checkpoint."""
        self.rewind(state)
        self.quarantined = {Position(t, e, i): {"step": s, "reason": r} for t, e, i, s, r in state["quarantined"]}

    def rewind(self, state: dict[str, Any]) -> None:
        """A rollback: back to a good state's position, keeping today's quarantine (what the
        run learnt since, and the reason the batches after that position are not read again)."""
        self.position = Position(**state["position"])

    def rank_state_dict(self) -> dict[str, Any]:
        """What is this rank's own: its replay buffer."""
        return {"replay": self.replay.state_dict() if self.replay is not None else None}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
