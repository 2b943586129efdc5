"""Tiny tasks and data streams shared by the stability tests (tests/tiny.py has the models)."""

from __future__ import annotations

import torch

from stability.continual import ReplayBuffer
from stability.data import TokenBatches
from stability.stream import DataStream, TaskData


def tiny_task(name: str, batches: int, seed: int) -> TaskData:
    """A task of ``batches`` training batches of 2 sequences of 4 tokens."""
    tokens = torch.arange(batches * 2 * 4 + 1) % 50
    train = TokenBatches(tokens, batch_size=2, seq_len=4, seed=seed)
    val = TokenBatches(tokens, batch_size=2, seq_len=4, shuffle=False)
    return TaskData(name, train, val, unigram=1.0, unigram_acc=0.1)


def tiny_stream(batches: tuple[int, ...] = (5, 3), epochs: int = 2, accumulation: int = 2,
                replay: ReplayBuffer | None = None) -> DataStream:
    """A stream over tasks of ``batches`` training batches each."""
    return DataStream([tiny_task(f"t{i}", n, i) for i, n in enumerate(batches)], epochs, accumulation, replay)
