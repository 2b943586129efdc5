"""Hypothesis strategies shared by the suite, named for the domain."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def token_streams(draw: st.DrawFn, max_len: int = 300, vocab_size: int = 50) -> torch.Tensor:
    """A 1-D int64 token stream of 0..max_len tokens below ``vocab_size``."""
    ids = draw(st.lists(st.integers(0, vocab_size - 1), max_size=max_len))
    return torch.tensor(ids, dtype=torch.long)


def window_shapes() -> st.SearchStrategy[tuple[int, int]]:
    """(batch_size, seq_len) of a batcher."""
    return st.tuples(st.integers(1, 8), st.integers(1, 24))


def relative_paths() -> st.SearchStrategy[list[str]]:
    """Distinct relative POSIX paths, as documents of a corpus are keyed."""
    part = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
    path = st.lists(part, min_size=1, max_size=3).map(lambda parts: "/".join(parts) + ".txt")
    return st.lists(path, min_size=2, max_size=40, unique=True)


TRANSIENT_SITES = ("loss", "grad", "activation[blocks.0]", "activation", "grad[blocks.1]", "overflow")
FAULT_KINDS = ("nan", "inf", "-inf")


@st.composite
def fault_plans(draw: st.DrawFn, steps: int = 12, max_faults: int = 4) -> str:
    """An --inject-fault plan of transient faults (each poisons one step and leaves the
    weights alone) at distinct steps in 2..steps-2, possibly empty."""
    at = draw(st.lists(st.integers(2, steps - 2), max_size=max_faults, unique=True))
    items = []
    for step in sorted(at):
        site = draw(st.sampled_from(TRANSIENT_SITES))
        # a -inf logit (the model's output) is a masked logit, not a fault: finite loss and gradients
        kind = draw(st.sampled_from(FAULT_KINDS if site != "activation" else ("nan", "inf")))
        items.append(f"overflow@{step}" if site == "overflow" else f"{site}:{kind}@{step}")
    return ",".join(items)


@st.composite
def crash_plans(draw: st.DrawFn, steps: int = 14, first_checkpoint: int = 3) -> tuple[str, int]:
    """A fault plan that may include a weight corruption (which forces a rollback), and
    the optimizer-step attempt after ``first_checkpoint`` at which the process dies."""
    plan = draw(fault_plans(steps=steps, max_faults=2))
    if draw(st.booleans()):
        at = draw(st.integers(2, steps - 4))
        plan = ",".join(filter(None, [plan, f"param:nan@{at}"]))
    crash = draw(st.integers(first_checkpoint + 1, steps))
    return plan, crash
