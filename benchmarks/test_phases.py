"""Time per optimizer step (forward, loss, backward, AdamW) for the four phases of the
users' plan, beside a same-width causal ``nn.TransformerEncoder`` LM.

Run: ``pytest benchmarks --benchmark-only``. Compare the rows of one group within one
run (these machines are shared; absolute times drift, ratios hold). Inputs are built in
fixtures; only the step is timed. On CUDA the step is synchronised inside the timed call.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from model import HybridLM, ModelConfig
from stability.cli import PHASES
from stability.config import GuardConfig, PlasticityConfig, TrainConfig
from stability.trainer import Trainer, lm_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _flush_denormals():
    """As `lsnn train` does on the CPU: subnormals make any model ~10x slower (the
    baseline too). Process-wide, so restored afterwards."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
VOCAB = 8192
def _fields(cls, preset):
    return {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}


def phase_configs(phase: int) -> tuple[ModelConfig, TrainConfig, PlasticityConfig]:
    """The phase's model, training and plasticity settings (continual learning acts
    between tasks, not inside a step)."""
    preset = PHASES[phase]
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h, mask=self.mask, is_causal=True)))


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _batch(train: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, VOCAB, (train.batch_size, train.sequence_length + 1), generator=g).to(DEVICE)
    return w[:, :-1], w[:, 1:]


def _amp(train: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if train.mixed_precision else None


def hybrid_step(phase: int, guard: bool = True):
    model_cfg, train, plasticity = phase_configs(phase)
    torch.manual_seed(0)
    model = HybridLM(model_cfg).to(DEVICE)
    trainer = Trainer(model, train, GuardConfig(guard=guard), DEVICE, total_steps=10_000, amp_dtype=_amp(train),
                      plasticity_cfg=plasticity)
    batch = _batch(train)

    def step():
        trainer.train_step([batch])
        _sync()

    return step, train


def transformer_step(phase: int):
    model_cfg, train, _ = phase_configs(phase)
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, model_cfg.hidden_dim, model_cfg.num_layers, train.sequence_length).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = _batch(train)
    amp = _amp(train)

    def step():
        with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
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


ROUNDS = {1: 60, 2: 30, 3: 8, 4: 5}


STEPS = {"hybrid": hybrid_step, "transformer": transformer_step}


# phase-major, so each pair is timed back to back with the same memory history
@pytest.mark.parametrize("phase,model", [(p, m) for p in (1, 2, 3, 4) for m in ("transformer", "hybrid")])
def test_step(benchmark, phase, model):
    benchmark.group = f"phase {phase} step"
    _bench(benchmark, STEPS[model], phase, ROUNDS[phase])


def bench_paired(benchmark, a, b, rounds: int) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` back to back in every round, alternating which goes first, and
    return the quartiles (q1, median, q3) of the per-round ratios a/b: machine drift hits
    both alike, unlike two separately timed groups."""
    for _ in range(5):
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


def test_phase1_paired_ratio(benchmark):
    """Hybrid step / Transformer step at the phase-1 shape, paired round by round."""
    benchmark.group = "phase 1, paired"
    q1, median, q3 = bench_paired(benchmark, hybrid_step(1)[0], transformer_step(1)[0], rounds=150)
    benchmark.extra_info.update(hybrid_over_transformer_median=median, quartiles=[q1, q3])
