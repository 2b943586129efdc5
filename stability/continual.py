"""Continual learning: elastic weight consolidation, replay, and the task matrix.

**EWC.** At the end of task k a diagonal Fisher estimate F_k is taken: the mean squared
gradient of the loss over ``--fisher-batches`` training batches of task k, in eval mode.
The penalty added to every later loss is

    (lambda / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

accumulated over tasks. It is kept as three running sums, A = sum F_k,
B = sum F_k theta*_k and C = sum F_k theta*_k^2, so the penalty
(lambda / 2) * sum_i (A theta^2 - 2 B theta + C) costs the same memory after one task
as after fifty.

**Replay.** A reservoir-sampled buffer of training sequences. While task k trains, a
fraction of every batch is replaced by sequences from tasks < k, drawn with one of three
strategies: ``uniform``; ``importance``, in proportion to each sequence's loss under the
model at the end of its task (hard sequences more often); or ``balanced``, each earlier
task equally often.

**Task matrix.** After task i every task's validation split is evaluated: R[i][j] is the
loss on task j after training task i. The average final loss is the mean of the last
row. Forgetting is the mean over j < i of R[i][j] - R[j][j] (positive: forgotten), and
backward transfer is its negative, the usual sign.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stability.distributed import Dist, all_reduce_, full, local

Batch = tuple[torch.Tensor, torch.Tensor]


class EWC:
    def __init__(self, model: nn.Module, strength: float, dist: Dist = Dist()):
        self.strength, self.dist = strength, dist
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.A: list[torch.Tensor] | None = None
        self.B: list[torch.Tensor] | None = None
        if dist.mode == "fsdp":  # shards of the right placement from the start, for checkpoints to load into
            self.A = [torch.zeros_like(p) for p in self.params]
            self.B = [torch.zeros_like(p) for p in self.params]
        self.C = torch.zeros((), device=self.params[0].device)
        self.tasks = 0

    @property
    def active(self) -> bool:
        return self.tasks > 0 and self.strength > 0

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """(lambda / 2) * sum_k F_k (theta - theta*_k)^2, a differentiable scalar; None
        before the first consolidation or at strength 0 (the trainer's loss hook: it adds
        nothing then)."""
        if not self.active:
            return None
        terms = sum(((a * p - 2 * b) * p).sum() for p, a, b in zip(self.params, self.A, self.B))
        return 0.5 * self.strength * (self.C + full(terms))  # FSDP2: one reduction over the shards

    def consolidate(self, model: nn.Module, batches: list[Batch], loss_fn: Callable, autocast) -> int:
        """Estimate task k's diagonal Fisher on ``batches`` and fold it into the penalty;
        ``loss_fn(model, x, y)`` is the mean loss (``stability.trainer.model_loss``).
        Returns the number of batches used (batches with non-finite gradients are left out,
        counted, and reported by the caller). Off the hot path: it may sync."""
        was_training = model.training
        model.eval()  # no dropout, and fault-injection hooks fire only in training
        fisher = [torch.zeros_like(p) for p in self.params]
        used = 0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model, x, y)
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            finite = all_reduce_(self.dist, torch.stack([torch.isfinite(local(g)).all() for g in grads]).all()
                                 .logical_not().float(), "max") == 0  # every rank keeps or drops the batch
            if not bool(finite):  # host sync, off the hot path
                continue
            torch._foreach_add_(fisher, torch._foreach_mul(grads, grads))
            used += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if used == 0:
            return 0
        torch._foreach_div_(fisher, float(used))
        if self.dist.mode == "ddp":  # each rank's Fisher is of its own batches: average them
            for f in fisher:
                all_reduce_(self.dist, f, "mean")
        anchors = [p.detach().clone() for p in self.params]
        fb = torch._foreach_mul(fisher, anchors)
        if self.A is None:
            self.A, self.B = fisher, fb
        else:
            torch._foreach_add_(self.A, fisher)
            torch._foreach_add_(self.B, fb)
        self.C = self.C + full(sum((f * a).sum() for f, a in zip(fb, anchors)))
        self.tasks += 1
        return used

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A, "B": self.B, "C": self.C, "tasks": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.C.device
        # copies: consolidation adds into A and B in place, and a snapshot must not change
        move = lambda ts: None if ts is None else [t.to(device, copy=True) for t in ts]  # noqa: E731
        self.A, self.B = move(state["A"]), move(state["B"])
        self.C, self.tasks = state["C"].to(device, copy=True), state["tasks"]


class ReplayBuffer:
    """Reservoir-sampled sequences (each ``l + 1`` tokens) from the tasks trained so far."""

    def __init__(self, capacity: int, strategy: str, seed: int):
        if strategy not in ("uniform", "importance", "balanced"):
            raise ValueError(f"unknown --replay-strategy {strategy!r}; valid: uniform, importance, balanced")
        self.capacity, self.strategy = capacity, strategy
        self.rng = random.Random(seed)
        self.windows: list[torch.Tensor] = []
        self.tasks: list[int] = []
        self.importance: list[float] = []
        self.seen: dict[int, int] = {}

    def offer(self, windows: torch.Tensor, task: int) -> None:
        """Reservoir sampling over every sequence offered; ``balanced`` keeps one
        reservoir per task, splitting the capacity evenly."""
        for w in windows.unbind(0):
            self.seen[task] = self.seen.get(task, 0) + 1
            if self.strategy == "balanced":
                self._offer_balanced(w.cpu(), task)
            else:
                self._offer_reservoir(w.cpu(), task, sum(self.seen.values()))

    def _offer_reservoir(self, w: torch.Tensor, task: int, n_seen: int) -> None:
        if len(self.windows) < self.capacity:
            self._append(w, task)
            return
        slot = self.rng.randrange(n_seen)
        if slot < self.capacity:
            self.windows[slot], self.tasks[slot], self.importance[slot] = w, task, 1.0

    def _offer_balanced(self, w: torch.Tensor, task: int) -> None:
        quota = max(1, self.capacity // len(self.seen))
        mine = [i for i, t in enumerate(self.tasks) if t == task]
        if len(mine) < quota:
            if len(self.windows) >= self.capacity:  # a new task arrived: evict from the largest
                largest = max(set(self.tasks), key=self.tasks.count)
                victims = [i for i, t in enumerate(self.tasks) if t == largest]
                self._drop(self.rng.choice(victims))
            self._append(w, task)
            return
        slot = self.rng.randrange(self.seen[task])
        if slot < len(mine):
            self.windows[mine[slot]] = w

    def _append(self, w: torch.Tensor, task: int) -> None:
        self.windows.append(w)
        self.tasks.append(task)
        self.importance.append(1.0)  # scored when its task ends (importance strategy)

    def _drop(self, i: int) -> None:
        del self.windows[i], self.tasks[i], self.importance[i]

    def earlier(self, task: int) -> list[int]:
        return [i for i, t in enumerate(self.tasks) if t < task]

    def sample(self, n: int, task: int) -> torch.Tensor | None:
        """``n`` sequences from tasks before ``task`` (n, l + 1), or None if there are none."""
        pool = self.earlier(task)
        if not pool:
            return None
        if self.strategy == "importance":
            picks = self.rng.choices(pool, weights=[self.importance[i] for i in pool], k=n)
        elif self.strategy == "balanced":
            by_task: dict[int, list[int]] = {}
            for i in pool:
                by_task.setdefault(self.tasks[i], []).append(i)
            picks = [self.rng.choice(by_task[self.rng.choice(sorted(by_task))]) for _ in range(n)]
        else:
            picks = [self.rng.choice(pool) for _ in range(n)]
        return torch.stack([self.windows[i] for i in picks])

    @torch.no_grad()
    def score(self, model: nn.Module, task: int, loss_fn: Callable, device: torch.device,
              per_pass: int = 64) -> None:
        """Importance of task ``task``'s sequences: their loss under ``model`` now, ``per_pass``
        sequences a forward pass (``windows_per_pass``: their logits are the pass's peak)."""
        mine = [i for i, t in enumerate(self.tasks) if t == task]
        was_training = model.training
        model.eval()
        for ids in _chunks(mine, per_pass):
            w = torch.stack([self.windows[i] for i in ids]).to(device)
            logits = model(w[:, :-1])
            losses = loss_fn(logits, w[:, 1:]).tolist()  # host sync, at a task boundary
            for i, loss in zip(ids, losses):
                self.importance[i] = max(float(loss), 1e-3) if loss == loss else 1e-3
        model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": torch.stack(self.windows) if self.windows else None, "tasks": list(self.tasks),
                "importance": list(self.importance), "seen": dict(self.seen),
                "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = list(state["windows"].unbind(0)) if state["windows"] is not None else []
        self.tasks, self.importance = list(state["tasks"]), list(state["importance"])
        self.seen = {int(k): int(v) for k, v in state["seen"].items()}
        self.rng.setstate(_rng_from(state["rng"]))


def windows_per_pass(length: int, vocab: int, budget: int = 2**24, most: int = 64) -> int:
    """Sequences of ``length`` tokens a replay-scoring pass takes so that their fp32 logits
    stay within ``budget`` elements (64 MB, a phase-4 micro-batch's): 64 sequences of 256
    tokens at a vocabulary of 8192 would hold 0.5 GB of logits and as much log-softmax at a
    task boundary, several times a chunked training step's peak."""
    return max(1, min(most, budget // max(1, length * vocab)))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sequence (b,)."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                           reduction="none").view(targets.shape)
    mask = targets != -100
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def transfer(matrix: list[list[float]]) -> dict[str, float]:
    """Average final loss, forgetting and backward transfer of a task matrix R[i][j]
    (rows: after task i, columns: task j) whose last row is the current one."""
    last = len(matrix) - 1
    final = matrix[-1]
    avg = sum(final[: last + 1]) / (last + 1)
    if last == 0:
        return {"average_loss": avg, "forgetting": 0.0, "backward_transfer": 0.0}
    forgetting = sum(final[j] - matrix[j][j] for j in range(last)) / last
    return {"average_loss": avg, "forgetting": forgetting, "backward_transfer": -forgetting}


def format_matrix(matrix: list[list[float]], names: list[str]) -> list[str]:
    head = "  after task " + " ".join(f"{f'task {j + 1}':>9}" for j in range(len(names)))
    rows = [f"  {i + 1:>10} " + " ".join(f"{v:>9.4f}" for v in row) for i, row in enumerate(matrix)]
    return [head, *rows]
