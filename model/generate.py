"""Recurrent decoding for ``HybridLM``: the loop. Each new token costs O(1) in the sequence
length (O(l) in the cross-attention, which reads a KV cache).

The model owns its decoding state: ``HybridLM.init_state`` makes one (``DecodeState``, a
``BlockState`` per block, each part's own state: ``SpikingState``, the liquid layer's hidden
state, ``MambaState``, a ``KVCache`` per cross-attention), and ``HybridLM.decode`` runs the
blocks from it, ``HybridBlock.forward(x, state)`` being the one place a block is composed.
``advance`` feeds a fresh state the whole prompt in one pass (each part runs its sequence
function and keeps its last state, so the prompt's logits are the full forward's) and a
state that has seen tokens one token at a time (each part's own ``step``).

Nothing here imports ``model.hybrid``: the model is anything with ``decode`` and the state
anything with ``batch`` and ``position``, so ``model.hybrid`` can import this loop.

Shapes: b batch, l length, v vocabulary.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class Decoder(Protocol):
    training: bool

    def decode(self, tokens: Tensor, state: Any) -> Tensor: ...


@torch.no_grad()
def advance(model: Decoder, tokens: Tensor, state: Any) -> Tensor:
    """Feed ``tokens`` (b l) after what ``state`` has seen; returns their logits (b l v)
    and moves ``state`` past them."""
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] < 1:
        raise ValueError(
            f"tokens must be an integer tensor of shape (batch, length >= 1), got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if tokens.shape[0] != state.batch:
        raise ValueError(f"tokens have batch {tokens.shape[0]}, the decoding state was made for {state.batch}")
    if model.training:
        raise ValueError("decoding needs the model in eval mode (dropout would differ token by token); call .eval()")
    if state.position == 0:
        logits = model.decode(tokens, state)
    else:  # one token at a time: each part's own step
        logits = torch.cat([model.decode(t, state) for t in tokens.split(1, dim=1)], dim=1)
    state.position += tokens.shape[1]
    return logits  # b l v
