"""How a block's streams are combined: branch gating and causal cross-attention.

For decoding, ``KVCache`` holds a cross-attention's keys and values so far, and
``CausalCrossAttention.step`` attends one new token's query over them.

Shapes: b batch, l length, d hidden, k branches, h heads, c channels per head (d / h),
t tokens seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# The attention kernels' outputs (the attention and its log-sum-exp) are what the backward of
# the cross-attention keeps; the norms and projections around them are recomputed.
_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
)


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_contexts():
    return create_selective_checkpoint_contexts(_keep_attention)


class BranchMixer(nn.Module):
    """Mixes k branch outputs (each b l d) into one.

    adaptive: per-token, per-head softmax gates over the branches, computed from the
    block input, so each head's channels choose their own mixture at every token;
    otherwise a fixed average.
    """

    def __init__(self, d: int, branches: int, heads: int, adaptive: bool):
        super().__init__()
        self.branches, self.heads = branches, heads
        self.gate = nn.Linear(d, heads * branches) if adaptive else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def forward(self, h: torch.Tensor, outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the mixture (b l d) and the gates (b l h k), None without gating."""
        if len(outs) != self.branches:
            raise ValueError(f"expected {self.branches} branches, got {len(outs)}")
        stacked = torch.stack(outs, dim=2)  # b l k d
        if self.gate is None:
            return stacked.mean(dim=2), None
        b, l, k, d = stacked.shape
        gates = self.gate(h).view(b, l, self.heads, k).softmax(dim=-1)  # b l h k
        per_head = stacked.view(b, l, k, self.heads, d // self.heads)  # b l k h c
        mixed = torch.einsum("blhk,blkhc->blhc", gates.to(per_head.dtype), per_head)  # b l h c
        return mixed.reshape(b, l, d), gates


@dataclass
class KVCache:
    """A cross-attention's keys and values of every token so far; None before the first."""

    keys: torch.Tensor | None = None  # b h t c
    values: torch.Tensor | None = None  # b h t c


class CausalCrossAttention(nn.Module):
    """Queries from one stream attend to keys/values of another, token t seeing only
    tokens <= t (``scaled_dot_product_attention(is_causal=True)``).

    recompute: under autograd, the backward keeps the two streams and the attention
    kernel's outputs (the attention and its log-sum-exp) and recomputes the norms and
    projections around it (selective activation checkpointing, ``torch.utils.checkpoint``),
    where autograd keeps about five (b l d) activations per call (the normed streams, q, k,
    v): 80 MB of the phase-4 step's peak, for a second run of the norms and projections
    (about 3% of the step). The attention, the costly part, runs once. The recomputation
    runs the same ops, so values and gradients equal the kept path's bit for bit. Not while
    a forward hook watches one of its layers (fault injection, the non-finite diagnosis):
    the recomputation would fire the hook a second time.
    """

    def __init__(self, d: int, heads: int, out_std: float, recompute: bool = False):
        super().__init__()
        self.heads, self.recompute = heads, recompute
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        for lin in (self.q, self.kv):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=out_std)

    def forward(self, query_stream: torch.Tensor, kv_stream: torch.Tensor, cache: KVCache | None = None
                ) -> torch.Tensor:
        """(b l d), (b l d) -> (b l d). With a ``KVCache`` (decoding): over an empty cache,
        the sequence, keeping its keys and values; over a filled one, token by token."""
        if cache is not None:
            if cache.keys is not None:
                return torch.cat([self.step(q_t, kv_t, cache) for q_t, kv_t in
                                  zip(query_stream.split(1, dim=1), kv_stream.split(1, dim=1))], dim=1)
            cache.keys, cache.values = self._keys_values(kv_stream)
        if self.recompute and torch.is_grad_enabled() and not self._watched():
            # no randomness inside: the RNG state need not be saved and restored
            return checkpoint(self._attend, query_stream, kv_stream, use_reentrant=False, preserve_rng_state=False,
                              context_fn=_keep_attention_contexts)
        return self._attend(query_stream, kv_stream)

    def _watched(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _attend(self, query_stream: torch.Tensor, kv_stream: torch.Tensor) -> torch.Tensor:
        b, l, d = query_stream.shape
        h = self.heads
        q = self.q(self.norm_q(query_stream)).view(b, l, h, d // h).transpose(1, 2)  # b h l c
        k, v = self.kv(self.norm_kv(kv_stream)).view(b, l, 2, h, d // h).permute(2, 0, 3, 1, 4)  # b h l c
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # b h l c
        return self.out(attn.transpose(1, 2).reshape(b, l, d))  # b l d

    def _keys_values(self, kv_stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, l, d = kv_stream.shape
        k, v = self.kv(self.norm_kv(kv_stream)).view(b, l, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k, v  # b h l c each

    def step(self, query_stream: torch.Tensor, kv_stream: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token (b 1 d) of each stream after what ``cache`` holds: the new query reads
        every key so far (all in the past), and the cache takes the new key and value."""
        b, _, d = query_stream.shape
        k, v = self._keys_values(kv_stream)  # b h 1 c
        cache.keys, cache.values = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)  # b h t c
        q = self.q(self.norm_q(query_stream)).view(b, 1, self.heads, d // self.heads).transpose(1, 2)  # b h 1 c
        out = F.scaled_dot_product_attention(q, cache.keys, cache.values)  # b h 1 c
        return self.out(out.transpose(1, 2).reshape(b, 1, d))  # b 1 d
