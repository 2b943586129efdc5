"""--cuda-graphs: the bookkeeping of ``GraphedSteps`` on the CPU, with a recorder that replays
by running the recorded step again (warm-up, capture, replay, the steps that run eagerly,
re-capture after a state is replaced, one graph per shape), the refusals; and on CUDA the
real graphs (``gpu`` marker): a replayed step equals an eager one."""

from __future__ import annotations

import pytest
import torch

from model.ops import triton_support
from stability.config import GuardConfig, TrainConfig
from stability.cuda_graphs import WARMUP, EagerRecorder, GraphedSteps
from stability.faults import FaultInjector, parse_faults
from stability.trainer import Trainer
from tests.stability.test_trainer import assert_same_state
from tests.tiny import batches, tiny_hybrid

needs_interpreter = pytest.mark.skipif(not triton_support.interpreted(),
                                       reason="the fused guard runs on the CPU only under Triton's interpreter")


def _trainer(fault: str | None = None, device: str = "cpu", kernels: str = "triton", **train) -> Trainer:
    model = tiny_hybrid(vocab_size=32).to(device)
    injector = FaultInjector(parse_faults(fault), model) if fault else None
    cfg = TrainConfig(**{"learning_rate": 1e-2, "warmup_steps": 2, "log_every": 4, **train})
    return Trainer(model, cfg, GuardConfig(), torch.device(device), total_steps=20, injector=injector,
                   kernels=kernels)


def _same_guard(a: Trainer, b: Trainer) -> None:
    assert a.guard.read() == b.guard.read()
    assert (a.step, a.attempt, int(a.step_t)) == (b.step, b.attempt, int(b.step_t))


@needs_interpreter
def test_a_shape_warms_up_is_captured_once_and_then_replayed_as_the_eager_step_would_run():
    eager, graphed = _trainer(), _trainer()
    steps = GraphedSteps(graphed, EagerRecorder())
    for x, y in batches(6, vocab=32):
        eager.train_step([(x, y)])
        steps.train_step([(x, y)])
    assert (steps.eager, steps.captures, steps.replays) == (WARMUP, 1, 6 - WARMUP)
    assert_same_state(eager, graphed)
    _same_guard(eager, graphed)


@needs_interpreter
def test_a_replayed_step_reads_each_steps_own_batch_from_the_graphs_inputs():
    """The recorded step reads the capture's input buffers: each step's batch is copied in."""
    graphed = _trainer()
    steps = GraphedSteps(graphed, EagerRecorder())
    data = batches(WARMUP + 2, vocab=32)
    for x, y in data:
        out = steps.train_step([(x, y)])
    captured = next(iter(steps._graphs.values()))
    assert torch.equal(captured.inputs[0][0], data[-1][0]) and not torch.equal(data[-1][0], data[-2][0])
    assert out.tokens == data[-1][1].numel()


@needs_interpreter
def test_a_fault_plans_step_runs_eagerly_and_is_skipped_as_without_graphs():
    eager, graphed = _trainer("grad:nan@5"), _trainer("grad:nan@5")
    steps = GraphedSteps(graphed, EagerRecorder())
    for x, y in batches(7, vocab=32):
        eager.train_step([(x, y)])
        steps.train_step([(x, y)])
    assert steps.eager == WARMUP + 1 and steps.replays == 7 - WARMUP - 1
    assert graphed.guard.read()["skips"]["nonfinite_grad"] == 1
    assert_same_state(eager, graphed)


@needs_interpreter
def test_an_armed_probe_runs_its_step_eagerly():
    from stability.diagnostics import BlockProbe

    graphed = _trainer()
    graphed.probe = BlockProbe(graphed.model)
    steps = GraphedSteps(graphed, EagerRecorder())
    data = batches(WARMUP + 3, vocab=32)
    for x, y in data[:-1]:
        steps.train_step([(x, y)])
    graphed.probe.arm()
    steps.train_step(list(data[-1:]))
    assert steps.eager == WARMUP + 1 and graphed.probe.take() is not None


@needs_interpreter
@pytest.mark.parametrize("replace", ["load", "task", "factor"])
def test_a_replaced_state_drops_the_graphs_and_they_are_captured_again(replace):
    """What replaces tensors a graph reads (a rollback's or a resume's load, a new task's
    schedule, the rollback's rate factor) must never be followed by a replay of the old graph."""
    graphed = _trainer()
    steps = GraphedSteps(graphed, EagerRecorder())
    data = batches(2 * WARMUP + 3, vocab=32)
    for x, y in data[:WARMUP + 2]:
        steps.train_step([(x, y)])
    saved = graphed.state_dict()
    {"load": lambda: graphed.load_state_dict(saved), "task": lambda: graphed.start_task(30),
     "factor": lambda: graphed.set_lr_factor(0.5)}[replace]()
    for x, y in data[WARMUP + 2:]:
        steps.train_step([(x, y)])
    assert (steps.captures, steps.eager) == (2, 2 * WARMUP)


@needs_interpreter
def test_each_shape_has_its_own_graph_and_a_short_last_batch_never_replays_a_longer_ones():
    eager, graphed = _trainer(), _trainer()
    steps = GraphedSteps(graphed, EagerRecorder())
    long_, short = batches(4, vocab=32, l=8), batches(4, vocab=32, l=5, seed=3)
    for data in (long_, short, long_[:1]):
        for x, y in data:
            eager.train_step([(x, y)])
            out = steps.train_step([(x, y)])
            assert out.tokens == y.numel()
    assert steps.captures == 2 and len(steps._graphs) == 2
    assert_same_state(eager, graphed)


def test_graphs_refuse_a_trainer_whose_state_is_not_updated_in_place():
    with pytest.raises(ValueError, match="fused kernels.*no fp16 loss scaler and one process"):
        GraphedSteps(_trainer(kernels="torch"), EagerRecorder())


def test_the_flag_is_refused_on_the_cpu_saying_why_and_what_to_do(tmp_path):
    from stability.config import RunSpec
    from stability.distributed import Dist
    from stability.preflight import BadInput, check_cuda_graphs
    from model import ModelConfig

    spec = RunSpec(train=TrainConfig(cuda_graphs=True), model=ModelConfig(), guard=GuardConfig())
    with pytest.raises(BadInput, match="--cuda-graphs: .* on cpu .*drop --cuda-graphs, or run with --device cuda"):
        check_cuda_graphs(spec, torch.device("cpu"), None, Dist())
    cuda = torch.device("cuda")
    with pytest.raises(BadInput, match="--cuda-graphs: it runs in one process.*torchrun"):
        check_cuda_graphs(spec, cuda, None, Dist(world=2, mode="ddp"))
    with pytest.raises(BadInput, match="--cuda-graphs: .*--amp-dtype bf16"):
        check_cuda_graphs(spec, cuda, torch.float16, Dist())
    unguarded = RunSpec(train=spec.train, model=spec.model, guard=GuardConfig(guard=False))
    with pytest.raises(BadInput, match="--cuda-graphs: it replays the guarded step"):
        check_cuda_graphs(unguarded, cuda, None, Dist())
    check_cuda_graphs(spec, cuda, torch.bfloat16, Dist())  # fits


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_replayed_steps_equal_eager_steps_on_cuda(exact_fp32_cuda):
    eager, graphed = _trainer(device="cuda", kernels="auto"), _trainer(device="cuda", kernels="auto")
    steps = GraphedSteps(graphed)
    for x, y in batches(8, vocab=32):
        eager.train_step([(x.cuda(), y.cuda())])
        steps.train_step([(x.cuda(), y.cuda())])
    assert steps.replays == 8 - WARMUP
    assert_same_state(eager, graphed, exact=False)
    _same_guard(eager, graphed)


@pytest.mark.gpu
def test_a_fault_in_a_graphed_run_is_skipped_and_a_rollback_recaptures_on_cuda(exact_fp32_cuda):
    eager, graphed = _trainer("loss:nan@5", device="cuda", kernels="auto"), \
        _trainer("loss:nan@5", device="cuda", kernels="auto")
    steps = GraphedSteps(graphed)
    data = [(x.cuda(), y.cuda()) for x, y in batches(9, vocab=32)]
    saved = None
    for i, batch in enumerate(data):
        eager.train_step([batch])
        steps.train_step([batch])
        if i == 6:
            saved = graphed.state_dict()
            graphed.load_state_dict(saved)  # as a rollback does
            eager.load_state_dict(eager.state_dict())
    assert graphed.guard.read()["skips"]["nonfinite_loss"] == 1 and steps.captures == 2
    assert_same_state(eager, graphed, exact=False)


@pytest.mark.gpu
def test_a_short_last_batch_is_not_replayed_through_the_full_batchs_graph_on_cuda():
    graphed = _trainer(device="cuda", kernels="auto")
    steps = GraphedSteps(graphed)
    for x, y in batches(4, vocab=32, l=8) + batches(4, vocab=32, l=5):
        out = steps.train_step([(x.cuda(), y.cuda())])
        assert out.tokens == y.numel() and torch.isfinite(out.loss)
    assert steps.captures == 2
