"""Pre-flight: sizes from the configuration alone, refused by the flag that sets them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import model.hybrid
from model import HybridLM
from stability import preflight
from stability.config import RunSpec, TrainConfig
from stability.distributed import Dist
from stability.preflight import (
    BLOCKS,
    LOGITS,
    OUTSIDE,
    BadInput,
    check_memory,
    checkpoint_bytes,
    estimate_training_bytes,
)
from tests.tiny import tiny_hybrid_config

CPU = torch.device("cpu")
BPE = TrainConfig(tokenizer="bpe", vocab_size=300, batch_size=2, sequence_length=8)
LAYOUTS = [{}, {"use_mamba": True}, {"use_mamba": True, "use_cross_attention": True, "integration_mode": "bidirectional"},
           {"use_adaptive_gating": True, "tie_embeddings": False}, {"mlp_ratio": 0, "liquid_backbone": "ltc"}]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(d) or "default")
def test_the_memory_estimate_counts_the_real_parameters_without_allocating_them(layout):
    cfg = tiny_hybrid_config(vocab_size=300, num_layers=3, **layout)
    parts = estimate_training_bytes(cfg, BPE)
    params = sum(p.numel() for p in HybridLM(cfg).parameters())
    assert parts[BLOCKS] + parts[OUTSIDE] == 7 * 4 * params, "weights, gradients, Adam's moments, the snapshot"
    assert checkpoint_bytes(cfg, BPE) == 3 * 4 * params, "the weights and Adam's moments on disk"


def test_the_logits_estimate_follows_the_loss_and_the_tokenizer():
    cfg = tiny_hybrid_config(vocab_size=300)
    # --chunked-loss (the default): two fp32 chunks of logits, here all 16 tokens, and the head's gradients
    assert estimate_training_bytes(cfg, BPE)[LOGITS] == 2 * 4 * 16 * 300 + 4 * (300 + 16) * 32
    plain = dataclasses.replace(cfg, chunked_loss=False)
    assert estimate_training_bytes(plain, BPE)[LOGITS] == 3 * 4 * 2 * 8 * 300
    byte = estimate_training_bytes(plain, dataclasses.replace(BPE, tokenizer="byte"))
    assert byte[LOGITS] == 3 * 4 * 2 * 8 * 256, "byte's vocabulary is 256 whatever the flag"
    # a long sequence: the chunks stay at their 256 rows of 8192 while the plain logits grow with it
    long = TrainConfig(tokenizer="bpe", vocab_size=8192, batch_size=8, sequence_length=4096)
    big = dataclasses.replace(cfg, vocab_size=8192)
    assert estimate_training_bytes(big, long)[LOGITS] == 2 * 4 * 256 * 8192 + 4 * (8192 + 8 * 4096) * 32
    assert estimate_training_bytes(dataclasses.replace(big, chunked_loss=False), long)[LOGITS] == \
        3 * 4 * 8 * 4096 * 8192


def _counting_blocks(monkeypatch, most: int = 3) -> list[int]:
    """The blocks the model package builds from now on; more than ``most`` fails at once."""
    built: list[int] = []
    create = model.hybrid.create_block

    def counted(cfg, index):
        built.append(index)
        assert len(built) <= most, f"{len(built)} blocks built to size the model"
        return create(cfg, index)

    monkeypatch.setattr(model.hybrid, "create_block", counted)
    return built


def test_a_typo_of_100000_layers_is_refused_by_its_flag_without_building_them(monkeypatch):
    """``--num-layers 100000`` (for 10) once built every block on the meta device first: 7
    minutes and 3.9 GB before anything was said."""
    built = _counting_blocks(monkeypatch)
    monkeypatch.setattr(preflight, "available_memory", lambda device: 64 * 10**9)
    spec = RunSpec(tiny_hybrid_config(hidden_dim=128, num_layers=100_000), BPE)
    with pytest.raises(BadInput, match=r"--num-layers 100000 x blocks of --hidden-dim 128: training would need "
                                       r"about \d+\.\d GB .* lower --num-layers or --hidden-dim"):
        check_memory(spec, CPU)
    assert built, "the count comes from the model package's own blocks"


def test_a_run_that_cannot_fit_is_refused_naming_what_to_lower(monkeypatch):
    """With --no-chunked-loss a long sequence's logits are what does not fit, and the
    message says which flags set them."""
    monkeypatch.setattr(preflight, "available_memory", lambda device: 2 * 10**9)
    train = TrainConfig(tokenizer="bpe", vocab_size=8192, batch_size=8, sequence_length=4096)
    plain = RunSpec(tiny_hybrid_config(vocab_size=8192, chunked_loss=False), train)
    with pytest.raises(BadInput, match=r"--batch-size 8 x --sequence-length 4096 x vocabulary 8192.*"
                                       r"about 3\.2 GB.*lower --batch-size, --sequence-length or --vocab-size, "
                                       r"or drop --no-chunked-loss"):
        check_memory(plain, CPU)
    check_memory(RunSpec(tiny_hybrid_config(vocab_size=8192), train), CPU)  # chunked: it fits
    untied = RunSpec(tiny_hybrid_config(vocab_size=20_000_000, tie_embeddings=False), dataclasses.replace(
        train, vocab_size=20_000_000, batch_size=1, sequence_length=8))
    with pytest.raises(BadInput, match=r"vocabulary 20000000 x --hidden-dim 32: .*lower --vocab-size or --hidden-dim"):
        check_memory(untied, CPU)


def test_each_process_is_sized_for_its_share_of_the_batch(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: 10**15)
    spec = RunSpec(tiny_hybrid_config(), dataclasses.replace(BPE, batch_size=6))
    with pytest.raises(BadInput, match="--batch-size 6 is the global batch, split over 4 processes"):
        check_memory(spec, CPU, Dist(rank=0, world=4, mode="ddp"))
    check_memory(spec, CPU, Dist(rank=0, world=3, mode="ddp"))
