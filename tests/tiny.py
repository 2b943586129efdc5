"""Tiny models and batches shared by the stability tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model import HybridLM, ModelConfig


@dataclass
class TinyOutput:
    logits: torch.Tensor
    blocks: list


class TinyLM(nn.Module):
    """An embedding, two blocks of Linear+tanh and a head: the HybridLM interface in
    microseconds, for guard arithmetic that needs no recurrences."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, return_aux: bool = False):
        x = self.embedding(tokens)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        return TinyOutput(logits, []) if return_aux else logits


def tiny_hybrid_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_dim=32, num_layers=2, spiking_units=8, liquid_units=8,
                liquid_backbone_units=16, mamba_d_state=4, num_gate_heads=2, cross_attn_heads=2, mlp_ratio=2)
    return ModelConfig(**{**base, **overrides})


def tiny_hybrid(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(tiny_hybrid_config(**overrides))


def batches(n: int, vocab: int = 32, b: int = 2, l: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (inputs, targets) pairs; targets are the inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, vocab, (b, l + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out
