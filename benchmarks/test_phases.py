"""Time per optimizer step (forward, loss, backward, AdamW) for the four phases of the
users' plan, beside a same-width causal ``nn.TransformerEncoder`` LM; peak step memory;
the ratio's scaling with sequence length.

Run: ``pytest benchmarks --benchmark-only``. Compare the rows of one group within one
run (these machines are shared; absolute times drift, ratios hold): every ratio quoted
comes from ``bench_paired``, which times both steps in every round. Inputs are built in
fixtures; only the step is timed. On CUDA the step is synchronised inside the timed call.

Environment variables widen the runs (``scripts/gpu-check`` sets the first two on a GPU):
``LSNN_BENCH_AMP=bf16`` runs every phase, hybrid and Transformer, under bf16 autocast;
``LSNN_BENCH_SCAN_IMPLS=parallel,triton`` times the hybrid with each named selective-scan
implementation (default: auto only); ``LSNN_BENCH_LOOP_IMPLS=torch,triton`` with each named
implementation of the CfC's and the LIF's loops (``--cfc-impl``/``--lif-impl``; default: auto
only); ``LSNN_BENCH_CUDA_GRAPHS=off,on`` eager and with ``--cuda-graphs`` (the hybrid's
step replayed from a CUDA graph; the Transformer stays eager, as its users run it; default:
off); ``LSNN_BENCH_THREADS=1`` sets torch's (and so the numba kernel's) thread count, for a
machine whose cores other jobs share.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import pytest
import torch
from torch import nn

from benchmarks.flops import count_flops
from model import HybridLM, ModelConfig
from model.loss import linear_cross_entropy
from stability.cli import PHASES
from stability.config import GuardConfig, PlasticityConfig, TrainConfig
from stability.cuda_graphs import GraphedSteps
from stability.trainer import Trainer, lm_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AMP = os.environ.get("LSNN_BENCH_AMP", "")
SCAN_IMPLS = [s for s in os.environ.get("LSNN_BENCH_SCAN_IMPLS", "auto").split(",") if s]
LOOP_IMPLS = [s for s in os.environ.get("LSNN_BENCH_LOOP_IMPLS", "auto").split(",") if s]
GRAPHS = [s for s in os.environ.get("LSNN_BENCH_CUDA_GRAPHS", "off").split(",") if s]
THREADS = int(os.environ.get("LSNN_BENCH_THREADS", "0"))


@pytest.fixture(autouse=True)
def _thread_count():
    """LSNN_BENCH_THREADS, if set; process-wide, so restored afterwards (denormals are
    flushed for every benchmark, in conftest.py)."""
    threads = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


VOCAB = 8192


def _fields(cls, preset):
    return {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}


def phase_configs(phase: int, length: int | None = None) -> tuple[ModelConfig, TrainConfig, PlasticityConfig]:
    """The phase's model, training and plasticity settings (continual learning acts
    between tasks, not inside a step), optionally at another sequence length."""
    preset = dict(PHASES[phase])
    if length is not None:
        preset["sequence_length"] = length
    if AMP:
        preset.update(mixed_precision=True, amp_dtype=AMP)
    model = ModelConfig(vocab_size=VOCAB, **_fields(ModelConfig, preset))
    return model, TrainConfig(**_fields(TrainConfig, preset)), PlasticityConfig(**_fields(PlasticityConfig, preset))


class TransformerLM(nn.Module):
    """The baseline: pre-norm causal Transformer of the same width, depth and vocabulary."""

    def __init__(self, vocab: int, d: int, layers: int, length: int, heads: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embedding.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (b l d), the head's input."""
        h = self.embedding(tokens) + self.pos[: tokens.shape[1]]
        return self.norm(self.encoder(h, mask=self.mask, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


def machine() -> dict[str, object]:
    """What a ratio was measured on: the ratios move with the CPU (its vector width) and
    the thread count (the Transformer's products scale with threads, the recurrences less)."""
    cpu = "unknown"
    if DEVICE.type == "cuda":
        cpu = torch.cuda.get_device_name()
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"device": str(DEVICE), "processor": cpu, "threads": torch.get_num_threads()}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _batch(train: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, VOCAB, (train.batch_size, train.sequence_length + 1), generator=g).to(DEVICE)
    return w[:, :-1], w[:, 1:]


def _amp(train: TrainConfig) -> torch.dtype | None:
    if not train.mixed_precision:
        return None
    return torch.float16 if train.amp_dtype == "fp16" else torch.bfloat16


def hybrid_step(phase: int, guard: bool = True, scan_impl: str = "auto", length: int | None = None,
                loop_impl: str = "auto", graphs: bool = False):
    model_cfg, train, plasticity = phase_configs(phase, length)
    model_cfg = dataclasses.replace(model_cfg, scan_impl=scan_impl, cfc_impl=loop_impl, lif_impl=loop_impl)
    train = dataclasses.replace(train, cuda_graphs=graphs)
    torch.manual_seed(0)
    model = HybridLM(model_cfg).to(DEVICE)
    trainer = Trainer(model, train, GuardConfig(guard=guard), DEVICE, total_steps=10_000, amp_dtype=_amp(train),
                      plasticity_cfg=plasticity)
    stepper = GraphedSteps(trainer) if graphs else trainer  # the warm-ups before timing capture the graph
    batch = _batch(train)

    def step():
        stepper.train_step([batch])
        _sync()

    return step, train


def transformer_step(phase: int, length: int | None = None, chunked_loss: bool = False):
    """The baseline's step, with the loss as its users would write it (``F.cross_entropy`` of
    the logits) or, ``chunked_loss``, with lsnn's chunked loss (``model.loss``)."""
    model_cfg, train, _ = phase_configs(phase, length)
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, model_cfg.hidden_dim, model_cfg.num_layers, train.sequence_length).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = _batch(train)
    amp = _amp(train)

    def step():
        with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
            if chunked_loss:
                loss = linear_cross_entropy(model.hidden(x).flatten(0, 1), model.head.weight, y.flatten())
            else:
                loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    return step, train


def _bench(benchmark, make, phase: int, rounds: int) -> None:
    step, train = make(phase)
    for _ in range(3):  # warm-up: lazy optimizer state, allocator, caches
        step()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    tokens = train.batch_size * train.sequence_length
    benchmark.extra_info["tokens_per_step"] = tokens
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.extra_info["amp"] = AMP or "off"


ROUNDS = {1: 60, 2: 30, 3: 8, 4: 5}
PAIRED_ROUNDS = {1: 150, 2: 60, 3: 16, 4: 10}

STEPS = {"transformer": transformer_step} | {
    "hybrid" if impl == "auto" else f"hybrid-{impl}": (lambda p, impl=impl: hybrid_step(p, scan_impl=impl))
    for impl in SCAN_IMPLS
}


# phase-major, so each pair is timed back to back with the same memory history
@pytest.mark.parametrize("phase,model", [(p, m) for p in (1, 2, 3, 4) for m in STEPS])
def test_step(benchmark, phase, model):
    benchmark.group = f"phase {phase} step"
    _bench(benchmark, STEPS[model], phase, ROUNDS[phase])


def bench_paired(benchmark, a, b, rounds: int, warmup: int = 5) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` back to back in every round, alternating which goes first, and
    return the quartiles (q1, median, q3) of the per-round ratios a/b: machine drift hits
    both alike, unlike two separately timed groups."""
    for _ in range(warmup):
        a()
        b()
    ratios: list[float] = []

    def pair():
        first, second = (a, b) if len(ratios) % 2 else (b, a)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        ta, tb = (t1 - t0, t2 - t1) if first is a else (t2 - t1, t1 - t0)
        ratios.append(ta / tb)

    benchmark.pedantic(pair, rounds=rounds, iterations=1)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, median, q3


def peak_step_memory(step) -> int:
    """Bytes of tensors alive at the peak of one ``step``, parameters and optimizer state
    included: ``max_memory_allocated`` on CUDA; on the CPU the profiler's memory timeline
    (slow, seconds, so it runs once, after the timed rounds)."""
    step()  # lazy state (optimizer moments) exists before the measured step
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes)


@pytest.mark.parametrize("graphs", GRAPHS)
@pytest.mark.parametrize("loop_impl", LOOP_IMPLS)
@pytest.mark.parametrize("scan_impl", SCAN_IMPLS)
@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_paired_ratio(benchmark, phase, scan_impl, loop_impl, graphs):
    """Hybrid step / Transformer step at the phase's shape, paired round by round; the two
    steps' peak memory; their counted FLOPs (matrix products, convolutions, attention;
    ``benchmarks.flops``), whose ratio is the time ratio the hybrid would have if both ran
    their products equally fast and the rest (the scan, the recurrences) cost nothing."""
    if graphs == "on" and DEVICE.type != "cuda":
        pytest.skip("--cuda-graphs needs CUDA")
    benchmark.group = (f"phase {phase}, paired" + ("" if scan_impl == "auto" else f", scan {scan_impl}")
                       + ("" if loop_impl == "auto" else f", loops {loop_impl}")
                       + ("" if graphs == "off" else ", cuda graphs"))
    hybrid, train = hybrid_step(phase, scan_impl=scan_impl, loop_impl=loop_impl, graphs=graphs == "on")
    transformer, _ = transformer_step(phase)
    q1, median, q3 = bench_paired(benchmark, hybrid, transformer, rounds=PAIRED_ROUNDS[phase])
    mem_h, mem_t = peak_step_memory(hybrid), peak_step_memory(transformer)
    # a replay runs no aten op to count: the eager step's FLOPs are the graph's
    flop_h = count_flops(hybrid_step(phase, scan_impl=scan_impl, loop_impl=loop_impl)[0] if graphs == "on"
                         else hybrid)["total"]
    flop_t = count_flops(transformer)["total"]
    benchmark.extra_info.update(
        gflop_hybrid=flop_h / 1e9, gflop_transformer=flop_t / 1e9, flop_ratio=flop_h / flop_t, cuda_graphs=graphs,
        hybrid_over_transformer_median=median, quartiles=[q1, q3], amp=AMP or "off", **machine(),
        tokens_per_step=train.batch_size * train.sequence_length, scan_impl=scan_impl, loop_impl=loop_impl,
        peak_mb_hybrid=mem_h / 2**20, peak_mb_transformer=mem_t / 2**20, peak_memory_ratio=mem_h / mem_t,
    )


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_chunked_loss_alone(benchmark, phase):
    """What --chunked-loss is worth by itself: the Transformer baseline's step with lsnn's
    chunked loss over the same step with its plain one, paired; and their peak memory. The
    hybrid's paired ratio uses the chunked loss (its default) against the plain baseline, so
    this ratio is the part of that ratio the loss accounts for."""
    benchmark.group = f"phase {phase}, chunked loss"
    chunked, train = transformer_step(phase, chunked_loss=True)
    plain, _ = transformer_step(phase)
    q1, median, q3 = bench_paired(benchmark, chunked, plain, rounds=PAIRED_ROUNDS[phase])
    mem_c, mem_p = peak_step_memory(chunked), peak_step_memory(plain)
    benchmark.extra_info.update(
        chunked_over_plain_median=median, quartiles=[q1, q3], amp=AMP or "off", **machine(),
        tokens_per_step=train.batch_size * train.sequence_length,
        peak_mb_chunked=mem_c / 2**20, peak_mb_plain=mem_p / 2**20, peak_memory_ratio=mem_c / mem_p,
    )


SCALING_ROUNDS = {64: 12, 128: 10, 256: 8, 512: 6, 1024: 4, 2048: 3}


@pytest.mark.parametrize("length", list(SCALING_ROUNDS))
@pytest.mark.parametrize("phase", [1, 3])
def test_scaling(benchmark, phase, length):
    """The paired ratio at the phase's width and depth over sequence lengths: linear
    recurrences against quadratic attention."""
    benchmark.group = f"phase {phase} shape, scaling"
    hybrid, train = hybrid_step(phase, length=length)
    transformer, _ = transformer_step(phase, length=length)
    q1, median, q3 = bench_paired(benchmark, hybrid, transformer, rounds=SCALING_ROUNDS[length], warmup=1)
    benchmark.extra_info.update(
        length=length, hybrid_over_transformer_median=median, quartiles=[q1, q3], **machine(),
        tokens_per_step=train.batch_size * length,
    )
