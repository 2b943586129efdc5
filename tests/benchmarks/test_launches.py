"""The launch counter (``benchmarks.launches``) counts what a GPU would launch, and a guarded
training step on the GPU code path launches as many kernels at any sequence length: the
work that grows with the sequence lives inside the recurrences' kernels (issue 23)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.launches import GPU_PATH, TORCH_LOOPS, LaunchCounter, count_launches, phase_step
from model.ops import triton_support

needs_interpreter = pytest.mark.skipif(not triton_support.interpreted(),
                                       reason="Triton compiles in this process (CUDA present): counted on the CPU")


def test_views_and_allocations_launch_nothing_and_every_other_op_once():
    x = torch.randn(4, 8)
    with LaunchCounter() as c:
        y = x.t().unsqueeze(0).expand(2, 8, 4)  # views
        torch.empty(3), x.new_empty(5), x.detach()  # allocations, detach
        z = torch.add(x, 1)
        z.mul_(2).sum()
    assert dict(c.aten) == {"add": 1, "mul_": 1, "sum": 1} and c.total == 3
    assert y.shape == (2, 8, 4)


@needs_interpreter
def test_a_triton_launch_counts_once_and_hides_the_interpreters_copies():
    from model.ops.lif import triton_kernel

    cur = torch.randn(2, 7, 5)
    with LaunchCounter() as c:
        triton_kernel.lif_forward(cur, 0.9, 1.0)
    assert dict(c.triton) == {"_forward": 1}
    assert sum(c.aten.values()) == 0, c.aten  # contiguous input, outputs only allocated


def test_a_custom_op_counts_the_ops_inside_it():
    """The dispatcher hands lsnn's ops to the counter as one call; their bodies launch."""
    from model.ops.lif import lif

    cur = torch.randn(2, 7, 5)
    with LaunchCounter() as c:
        lif(cur, 0.9, 1.0, impl="torch")  # three ops a token, then (mem > threshold)
    assert "lif" not in c.aten and c.aten["gt"] == 7 + 1 and c.aten["add"] == 7


@pytest.fixture
def short_chunks(monkeypatch):
    """The Triton scan's backward recomputes CHUNK steps at once, padded steps included:
    8 instead of 64 keeps the interpreter quick and launches the same kernels."""
    from model.ops.selective_scan import triton_kernel

    monkeypatch.setattr(triton_kernel, "CHUNK", 8)


def _count(phase: int, impls: dict[str, str], length: int, run_triton: bool = True):
    """A steady step's launches at the phase's layout, tiny: the first step, counted without
    running the kernels, builds what later steps find (the optimizer's moments, the decay
    matrices' cache)."""
    step = phase_step(phase, impls, length=length, tiny=True, vocab=64, batch=1, warm_up=False)
    count_launches(step, run_triton=False)
    return count_launches(step, run_triton=run_triton)


@needs_interpreter
@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_a_gpu_step_launches_as_many_kernels_at_any_length(phase, short_chunks):
    short, long = (_count(phase, GPU_PATH, length) for length in (16, 32))
    grew = {k: (short.aten[k], long.aten[k]) for k in short.aten | long.aten if short.aten[k] != long.aten[k]}
    assert short.total == long.total, f"ops whose count grows with the length: {grew}"
    assert short.triton == long.triton and sum(short.triton.values()) >= 4  # the CfC and the LIF, each way


@needs_interpreter
def test_the_torch_loops_launch_more_with_length_so_the_count_can_fail(short_chunks):
    """The control: the same step on the recurrences' torch loops grows by a few ops a token."""
    short, long = (_count(1, TORCH_LOOPS, length) for length in (16, 32))
    assert long.total - short.total >= 16 * 10  # CfC 9 a token and the LIF 3, two layers: well over 10


@needs_interpreter
def test_counting_without_running_the_kernels_counts_the_same(short_chunks):
    """What lets the benchmark count a step at the phases' widths without the interpreter
    running every kernel: the launches of the richest layout do not depend on the values."""
    run, dry = (_count(4, GPU_PATH, 16, run_triton) for run_triton in (True, False))
    assert run.aten == dry.aten and run.triton == dry.triton


@needs_interpreter
def test_a_launch_inside_a_custom_op_counts_once_and_the_counter_leaves_triton_as_it_was():
    """The custom op's body re-enters the counter (and composites such as contiguous are
    decomposed there): the launch is still counted once, its copies hidden, and Triton's
    ``run`` is the original again afterwards."""
    from triton.runtime.interpreter import InterpretedFunction

    from model.ops.cfc import cfc_scan

    run = InterpretedFunction.run
    args = [torch.randn(2, 5, 16), torch.rand(2, 8), torch.randn(16, 8), torch.randn(24, 16), torch.randn(24)]
    args = [a.requires_grad_() for a in args]
    counts = []
    for run_triton in (True, False):  # not running the kernels: no interpreter, no copies to hide
        for a in args:
            a.grad = None
        with LaunchCounter(run_triton) as c:
            y, _ = cfc_scan(*args, impl="triton")
            y.sum().backward()
        counts.append(c)
        assert InterpretedFunction.run is run
    assert dict(counts[0].triton) == {"_forward": 1, "_backward": 1}
    assert counts[0].aten == counts[1].aten
    assert counts[0].aten["mm"] == 1 and counts[0].aten["cat"] == 1  # matmul, a composite, decomposed
    assert counts[0].aten["addmm"] == 1  # d w_p, scaled in the product


def test_a_matmul_of_a_batch_of_sequences_counts_its_product_not_its_reshapes():
    """matmul of (b l d) by (d e) reshapes to (bl d) and back (``_unsafe_view``, a view that
    launches nothing): one launch, the product."""
    x, w = torch.randn(2, 5, 8), torch.randn(8, 3)
    with LaunchCounter() as c:
        torch.matmul(x, w)
    assert c.total == 1, c.aten


def test_an_op_with_its_own_kernel_counts_once_though_it_has_a_decomposition_too():
    """silu's backward is one kernel on CUDA (and on the CPU), though torch also registers a
    decomposition of it (seven ops): autograd hands it to the counter whole, and a kernel of
    its own is what runs. reshape, a composite without one, still counts what it runs."""
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.nn.functional.silu(x)
    g = torch.randn(4, 8)
    with LaunchCounter() as c:
        y.backward(g)
    assert dict(c.aten) == {"silu_backward": 1}, c.aten
    assert torch.ops.aten.silu_backward.default.has_kernel_for_dispatch_key(
        torch._C.DispatchKey.CompositeImplicitAutograd), "the case this test is about"


def test_the_gpu_path_is_counted_with_the_choices_cuda_makes():
    """Counted on the CPU, the GPU path takes CUDA's formulations: the spike rate as an
    average pool (two launches each way), not the CPU's cumsum difference, and restores the
    CPU's afterwards."""
    from benchmarks.launches import _sized_for
    from model.spiking import spikes_to_features

    spk = (torch.rand(2, 9, 4) < 0.5).float().requires_grad_()

    def count():
        with LaunchCounter() as c:
            torch.autograd.grad(spikes_to_features(spk, spk, "rate", 3, 1.0, 1.0).sum(), spk)
        return c.aten

    cpu = count()
    with _sized_for("cuda"):
        cuda = count()
    assert "avg_pool2d" in cuda and "avg_pool2d" not in cpu and "cumsum" in cpu
    assert count() == cpu
