"""``--cuda-graphs``: the whole guarded step captured once per batch shape as a CUDA graph and
replayed, so a step costs one launch from the host instead of hundreds.

What a step does on the device does not change from step to step: the guard decides on the
device and makes no host sync, the learning rate is computed there from device counters,
the optimizer is fused and capturable, and every piece of state that one step hands the
next (the weights, Adam's moments, the guard's statistics and counters, the plasticity
state, the per-group rates) is updated in place. So the forward and backward over the
micro-batches, the unscale, the clip, the guarded AdamW, the loss-scale update and
plasticity are recorded once and replayed with each step's batch copied into the graph's
input buffers. The guard stays on inside the graph: a NaN or a spike in a replayed step is
skipped exactly as in an eager one (Megatron's full-iteration graphs have to switch their
NaN and spike checks off; ours are device-side, so they need not).

How a step is run (``GraphedSteps.train_step``):

- a shape (the micro-batches' shapes) runs ``WARMUP`` eager steps first, on a side stream
  (lazy state: Adam's moments, Triton's compilation, the allocator), then is captured; the
  capture records without running, so the step is then replayed once;
- a step that Python must see is run eagerly: one a fault plan acts on (``--inject-fault``),
  and the step before a sync point, whose probes hook the forward;
- anything that replaces state rather than updating it (a rollback or a resume loading a
  state, a new task's schedule, the rollback's rate factor) bumps ``Trainer.generation``,
  and every graph is dropped and captured again after its warm-up.

Requires CUDA, one process, the guard, and bf16 or fp32 (fp16's loss scaler keeps part of
its state on the host); ``preflight.check_cuda_graphs`` refuses the rest with exit 2.
The recorder is injectable (``EagerRecorder``), so the bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
WARMUP = 2
"""Eager steps of a shape before it is captured."""


def shape_key(batches: Sequence[Batch]) -> tuple:
    """What a graph is specific to: every micro-batch's shapes and dtypes."""
    return tuple((tuple(x.shape), x.dtype, tuple(y.shape), y.dtype) for x, y in batches)


class CUDARecorder:
    """Records a step as a CUDA graph in a pool of its own, and replays it."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def record(self, step: Callable[[], Any]) -> tuple[Any, Any]:
        """The graph of ``step`` and the output it writes: the capture runs nothing."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        return graph, output

    def replay(self, recorded: tuple[Any, Any]) -> Any:
        graph, output = recorded
        graph.replay()
        return output

    @staticmethod
    def side_stream() -> contextlib.AbstractContextManager:
        return _side_stream()


class EagerRecorder:
    """A stand-in that "replays" by running the step again: the bookkeeping of
    ``GraphedSteps`` tested where there is no CUDA."""

    def record(self, step: Callable[[], Any]) -> Callable[[], Any]:
        return step

    def replay(self, recorded: Callable[[], Any]) -> Any:
        return recorded()

    @staticmethod
    def side_stream() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass
class Captured:
    """One shape's recorded step and the input buffers it reads."""

    recorded: Any
    inputs: list[Batch]


class GraphedSteps:
    """``trainer.train_step``, replayed from CUDA graphs where it can be (see the module)."""

    def __init__(self, trainer, recorder: CUDARecorder | EagerRecorder | None = None):
        if not trainer.guard.fused or trainer.policy.enabled or trainer.dist.active:
            raise ValueError("a step replayed from a CUDA graph updates its state in place: it needs the guard's "
                             "fused kernels (kernels='triton', CUDA's default), no fp16 loss scaler and one process")
        self.trainer = trainer
        self.recorder = recorder if recorder is not None else CUDARecorder()
        self._graphs: dict[tuple, Captured] = {}
        self._warm: Counter[tuple] = Counter()
        self._generation = trainer.generation
        self.replays = self.captures = self.eager = 0

    def train_step(self, batches: Sequence[Batch]):
        t = self.trainer
        if t.generation != self._generation:  # a state was loaded or replaced: the graphs read stale tensors
            self._graphs.clear()
            self._warm.clear()
            self._generation = t.generation
        if self._python_sees(t.attempt + 1):
            self.eager += 1
            return t.train_step(batches)
        key = shape_key(batches)
        captured = self._graphs.get(key)
        if captured is None:
            if self._warm[key] < WARMUP:
                self._warm[key] += 1
                self.eager += 1
                with self.recorder.side_stream():
                    return t.train_step(batches)
            captured = self._graphs[key] = self._capture(batches)
        for (x_in, y_in), (x, y) in zip(captured.inputs, batches, strict=True):
            x_in.copy_(x, non_blocking=True)
            y_in.copy_(y, non_blocking=True)
        t.before_replay()
        out = self.recorder.replay(captured.recorded)
        t.after_replay()
        self.replays += 1
        return out

    def _python_sees(self, attempt: int) -> bool:
        """Whether this step must run eagerly: a fault plan acts on it, or the probes watch it."""
        t = self.trainer
        probe = t.probe is not None and t.probe.armed
        return probe or (t.injector is not None and t.injector.acts_at(attempt))

    def _capture(self, batches: Sequence[Batch]) -> Captured:
        t = self.trainer
        inputs = [(x.clone(), y.clone()) for x, y in batches]
        t.optimizer.zero_grad(set_to_none=True)  # the backward allocates the gradients in the graph's pool
        if t.injector is not None:  # its hooks run while recording: as at the attempt recorded (nothing acts)
            t.injector.begin_step(t.attempt + 1)
        self.captures += 1
        return Captured(self.recorder.record(lambda: t.step_body(inputs)), inputs)


@contextlib.contextmanager
def _side_stream():
    """Run on a side stream that waits for, and is waited for by, the current one: the
    warm-up torch's CUDA graph capture asks for."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
