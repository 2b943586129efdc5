"""Kernels a step launches on the GPU code path, counted on any machine.

On CUDA every op is a kernel launch of 5-10 us of eager overhead whatever its size, so at
the phases' sizes a step's time is bound by how many it launches. ``LaunchCounter`` counts,
over the code it watches:

- every aten op that reaches the dispatcher and does work: views (``view``, ``transpose``,
  ``unbind``, ``_unsafe_view``, ...), allocations (``empty``, ``empty_strided``, ...),
  ``detach`` and the profiler's record functions launch nothing and are not counted;
  everything else is at least one launch on CUDA (a fused multi-tensor op such as
  ``_fused_adamw_`` counts once, as a handful of launches would);
- every Triton kernel launch, once. Under Triton's interpreter (the CPU, TRITON_INTERPRET=1)
  a launch copies its arguments with aten ops; those are the interpreter's, not the GPU's,
  and are not counted.

So the count taken on the CPU with the GPU implementations (``--cfc-impl triton --lif-impl
triton --scan-impl triton``, run by the interpreter) is the launch count of a GPU step.
``tests/benchmarks/test_launches.py`` holds it to "independent of the sequence length";
``benchmarks/test_launches.py`` records it at each phase's shape beside the Transformer's.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that do no work on a device: allocation, bookkeeping, and the views whose schema says
# nothing of aliasing (``_unsafe_view``, what reshape and matmul make of a (b l d) input).
_FREE = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
    "_local_scalar_dense", "set_", "resize_", "_unsafe_view", "_record_function_enter_new",
    "_record_function_exit",
})


def _free(func) -> bool:
    return func._schema.name.split("::")[-1] in _FREE or func.is_view


def _custom_op_body(func) -> Callable | None:
    """The Python function behind a ``torch.library.custom_op`` of lsnn's, or None: the
    dispatcher hands the mode the op as one call, and its body's ops are the launches."""
    if func.namespace != "lsnn":
        return None
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(func._name)
    return None if opdef is None else opdef._init_fn


def _composite_only(func) -> bool:
    """An op that is only a composite of others (no kernel of its own for the CPU, and so,
    for the ops in a step, none for CUDA either)."""
    keys = torch._C.DispatchKey
    return (func.has_kernel_for_dispatch_key(keys.CompositeImplicitAutograd)
            and not func.has_kernel_for_dispatch_key(keys.CPU))


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: step()``; then ``c.total``, ``c.aten`` (by op name) and
    ``c.triton`` (by kernel name).

    ``run_triton=False`` counts each Triton launch without running it, leaving its outputs
    as allocated: Triton's interpreter would take minutes for a step at the phases' widths,
    and a step's launches do not depend on the values (the guard decides on the device and
    no op waits for the host; the tests check that a tiny step counts the same either way).
    """

    def __init__(self, run_triton: bool = True) -> None:
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.run_triton = run_triton
        self._inside_launch = 0
        self._depth = 0  # entered this many times: the body of a custom op re-enters the mode

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside_launch:
            return func(*args, **kwargs)
        body = _custom_op_body(func)
        if body is not None:  # lsnn's ops: what runs inside them, not the op, launches kernels
            with self:
                return body(*args, **kwargs)
        if _composite_only(func):
            # reached only from inside a custom op's body, below autograd, where composites
            # (contiguous, reshape, matmul, to) arrive whole: count what they decompose into.
            # An op with a kernel of its own (silu_backward) runs that kernel: one launch.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if not _free(func):
            self.aten[func._schema.name.split("::")[-1]] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        if self._depth == 0:  # Triton's launches are watched once, by the outermost entry
            self._patches = contextlib.ExitStack()
            self._patches.enter_context(_watch_triton(self))
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._patches.close()


@contextlib.contextmanager
def _watch_triton(counter: LaunchCounter) -> Iterator[None]:
    """Count each Triton launch once, compiled (``JITFunction.run``) or interpreted
    (``InterpretedFunction.run``), and hide the aten ops issued inside it."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing to count
        yield
        return
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def wrap(run: Callable) -> Callable:
        def counted(self, *args, **kwargs):
            if counter._inside_launch:
                return run(self, *args, **kwargs)
            counter.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            if not counter.run_triton:
                return None
            counter._inside_launch += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                counter._inside_launch -= 1
        return counted

    for cls, run in originals.items():
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def count_launches(step: Callable[[], object], run_triton: bool = True) -> LaunchCounter:
    """The launches of one call of ``step`` (run it once before, so that lazy state such as
    the optimizer's moments exists, as in every later step)."""
    with LaunchCounter(run_triton) as counter:
        step()
    return counter


# ---------------------------------------------------------------------------------------
# A guarded training step of a phase, on a chosen code path
# ---------------------------------------------------------------------------------------

GPU_PATH = dict(cfc_impl="triton", lif_impl="triton", scan_impl="triton", kernels="triton", sizes="cuda")
"""The implementations a CUDA machine runs by default (``auto`` there, without mamba-ssm): the
recurrences' kernels, the step's bookkeeping (the rates, the guard) fused, and the sizes
chosen for CUDA (the loss's chunks, the spike rate as a pool)."""
TORCH_LOOPS = dict(cfc_impl="torch", lif_impl="torch", scan_impl="parallel", kernels="torch", sizes="cpu")
"""The GPU code path before the fused kernels: the recurrences' torch loops, the
bookkeeping in torch ops."""
# The phases' layouts at a tiny width: the launch count depends on the layout, not the width.
TINY = dict(hidden_dim=16, num_layers=2, liquid_units=8, spiking_units=8, liquid_backbone_units=16, mamba_d_state=4,
            num_gate_heads=2, cross_attn_heads=2)


def phase_step(phase: int, impls: dict[str, str], length: int | None = None, tiny: bool = False,
               vocab: int = 8192, batch: int | None = None, warm_up: bool = True) -> Callable[[], object]:
    """One guarded ``Trainer.train_step`` of phase ``phase`` (its model, training and
    plasticity settings; continual learning acts between tasks, not in a step) with the
    recurrences' ``impls``, on the CPU. ``tiny``: the phase's layout at the widths of
    ``TINY``. ``warm_up``: take one step first, so that lazy state (the optimizer's moments,
    the guard's warm-up) is as in every later step; without it, the same first step at any
    length (a comparison between lengths needs no more)."""
    from model import HybridLM, ModelConfig
    from stability.cli import PHASES
    from stability.config import GuardConfig, PlasticityConfig, TrainConfig
    from stability.trainer import Trainer

    kernels, sizes = impls.get("kernels", "auto"), impls.get("sizes", "cpu")
    preset = {**PHASES[phase], **(TINY if tiny else {}),
              **{k: v for k, v in impls.items() if k not in ("kernels", "sizes")}}
    if length is not None:
        preset["sequence_length"] = length
    if batch is not None:
        preset["batch_size"] = batch

    def pick(cls, **fixed):
        return cls(**{k: v for k, v in preset.items() if k in cls.__dataclass_fields__}, **fixed)

    model_cfg, train, plasticity = pick(ModelConfig, vocab_size=vocab), pick(TrainConfig), pick(PlasticityConfig)
    torch.manual_seed(0)
    trainer = Trainer(HybridLM(model_cfg), train, GuardConfig(), torch.device("cpu"), total_steps=10_000,
                      amp_dtype=torch.bfloat16 if train.mixed_precision else None, plasticity_cfg=plasticity,
                      kernels=kernels)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, vocab, (train.batch_size, train.sequence_length + 1), generator=g)
    batches = [(w[:, :-1], w[:, 1:])]

    def step():
        with _sized_for(sizes):
            trainer.train_step(batches)

    if warm_up:
        step()
    return step


@contextlib.contextmanager
def _sized_for(device_type: str) -> Iterator[None]:
    """The CPU takes the choices ``device_type`` would make: the loss's chunks (on CUDA eight
    times the CPU's, each chunk's ops being launches there) and the spike rate's formulation
    (an average pool on CUDA, a cumsum's difference on the CPU)."""
    from model import loss, spiking

    saved = loss._CHUNK_LOGITS["cpu"], spiking.RATE_BY_POOL["cpu"]
    loss._CHUNK_LOGITS["cpu"] = loss._CHUNK_LOGITS[device_type]
    spiking.RATE_BY_POOL["cpu"] = spiking.RATE_BY_POOL[device_type]
    try:
        yield
    finally:
        loss._CHUNK_LOGITS["cpu"], spiking.RATE_BY_POOL["cpu"] = saved
