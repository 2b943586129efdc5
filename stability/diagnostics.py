"""Per-block diagnostics for the ``blocks`` record, collected on the device at no host sync.

A ``BlockProbe`` is armed for one step, the step before a sync point. While armed, forward
hooks on each block's submodules see what the step computes and reduce it to one number
per block; unarmed it has no hooks at all, so every other step runs exactly as without
it. Each value stays a device tensor until ``take`` returns them all as one flat tensor,
which the run concatenates into the guard's single transfer; ``fields`` turns the floats
read back into the record's fields. Per block i:

    grad_norm             ||grad theta_i||, after unscaling, before clipping (observe_grads)
    param_norm            ||theta_i|| after the step
    firing_rate_pre       spikes per token and neuron of the first LIF layer
    firing_rate_post      the same for the second layer
    membrane_abs          mean |membrane potential| of the second layer
    liquid_abs            mean |h_t| of the liquid cell's state over the tokens
    mamba_delta           mean step size delta = softplus(dt_proj(dt) + bias) of the selective scan
    mamba_state           ||h_L||, the norm of the scan's final state (e n) per sequence, averaged
    cross_attn_max_logit  max of q.k / sqrt(c) over heads and causal pairs (both directions
                          in the bidirectional mode)

The Mamba and cross-attention values are recomputed beside the model from each module's
inputs and parameters (the hooks capture the inputs; they never change an output). With
gradient accumulation a value is the mean over the step's micro-batches (the max logit:
their max). A component the layout lacks gives None. Under distributed training the
gradient norms are of the reduced gradients, the forward values of this rank's batches.

Shapes: b batch, l length, d hidden, e Mamba inner width, n state size, h heads, c d / h.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.fusion import CausalCrossAttention
from model.mamba import Mamba
from model.ops.selective_scan import selective_scan
from stability.distributed import Dist, all_reduce_, local

FIELDS = ("grad_norm", "param_norm", "firing_rate_pre", "firing_rate_post", "membrane_abs", "liquid_abs",
          "mamba_delta", "mamba_state", "cross_attn_max_logit")
_MAMBA = ("mamba_delta", "mamba_state")
_CROSS = ("cross_attn_max_logit",)
_LOGIT_BLOCK = 2**22  # query rows per chunk keep a chunk's b h r l logits near 16 MB in fp32


@torch.no_grad()
def mamba_stats(mamba: Mamba, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean delta, mean over sequences of ||final state||) of ``mamba`` on ``hidden``
    (b l d), by the arithmetic of ``Mamba.forward`` and its own selective scan."""
    m, l = mamba, hidden.shape[1]
    xz = m.in_proj(hidden).transpose(1, 2)  # b 2e l
    x, z = xz.chunk(2, dim=1)  # b e l each
    x = F.silu(m.conv1d(x)[..., :l])
    dt, B, C = m.x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    raw = F.linear(dt, m.dt_proj.weight).transpose(1, 2)  # b e l
    bias = m.dt_proj.bias.float()
    delta = F.softplus(raw.float() + bias[:, None])  # b e l
    _, last = selective_scan(x, raw, -torch.exp(m.A_log.float()), B.transpose(1, 2).contiguous(),
                             C.transpose(1, 2).contiguous(), m.D.float(), z=z, delta_bias=bias,
                             delta_softplus=True, return_last_state=True, impl=m.scan_impl)  # last: b e n
    return delta.mean(), last.float().flatten(1).norm(dim=1).mean()


@torch.no_grad()
def cross_attn_max_logit(attn: CausalCrossAttention, query_stream: torch.Tensor,
                         kv_stream: torch.Tensor) -> torch.Tensor:
    """The largest attention logit q.k / sqrt(c) that ``attn`` computes on these streams
    (each b l d), over heads and the pairs its causal mask keeps (key <= query)."""
    b, l, d = query_stream.shape
    h = attn.heads
    c = d // h
    q = attn.q(attn.norm_q(query_stream)).view(b, l, h, c).transpose(1, 2).float()  # b h l c
    k = attn.kv(attn.norm_kv(kv_stream)).view(b, l, 2, h, c)[:, :, 0].transpose(1, 2).float()  # b h l c
    keys = torch.arange(l, device=q.device)
    rows = max(1, _LOGIT_BLOCK // (b * h * l))
    best = torch.full((), -math.inf, device=q.device)
    for start, chunk in zip(range(0, l, rows), q.split(rows, dim=2)):
        logits = chunk @ k.transpose(-1, -2) / math.sqrt(c)  # b h r l
        queries = torch.arange(start, start + logits.shape[2], device=q.device)
        logits = logits.masked_fill(keys[None, :] > queries[:, None], -math.inf)
        best = torch.maximum(best, logits.amax())
    return best


def _norms(per_block: list[list[torch.Tensor]], dist: Dist, device: torch.device) -> torch.Tensor:
    """The norm (n,) of each block's list of tensors (shards under FSDP2: their squares are summed)."""
    squares = torch.stack([
        torch.stack(torch._foreach_norm(ts)).float().square().sum() if ts else torch.zeros((), device=device)
        for ts in per_block])
    if dist.mode == "fsdp":
        all_reduce_(dist, squares)
    return squares.sqrt()


class BlockProbe:
    """``arm()`` before a step, ``observe_grads()`` inside it after unscaling, ``take()``
    after it: the step's values as one flat device tensor, ``fields(floats)`` the record."""

    def __init__(self, model: nn.Module, dist: Dist = Dist()):
        self.model, self.dist = model, dist
        self.blocks = list(model.blocks)
        cfg = model.cfg
        self.present = {name: (cfg.use_mamba if name in _MAMBA else
                               cfg.use_cross_attention if name in _CROSS else True) for name in FIELDS}
        self.device = next(model.parameters()).device
        self.armed = False
        self.calls = 0  # hook calls: an unarmed step makes none
        self._handles: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._grad_norms: torch.Tensor | None = None

    # -- arming -------------------------------------------------------------------------
    def arm(self) -> None:
        """Hook the blocks for the next step's forward passes."""
        if self.armed:
            return
        self._reset()
        for i, block in enumerate(self.blocks):
            self._hook(block.spiking, lambda mod, args, out, i=i: self._spikes(i, out))
            self._hook(block.liquid, lambda mod, args, out, i=i: self._liquid(i, out))
            if self.present["mamba_delta"]:
                self._hook(block.mamba, lambda mod, args, out, i=i: self._mamba(i, mod, args[0]))
            for name in ("cross_attn", "cross_attn_back"):
                if hasattr(block, name):
                    self._hook(getattr(block, name), lambda mod, args, out, i=i: self._max(
                        "cross_attn_max_logit", i, cross_attn_max_logit(mod, *args)))
        self.armed = True

    def _hook(self, module: nn.Module, fn: Callable[..., None]) -> None:
        def hook(mod, args, out):
            self.calls += 1
            with torch.no_grad():
                fn(mod, args, out)

        self._handles.append(module.register_forward_hook(hook))

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.armed = False

    # -- what the hooks collect ---------------------------------------------------------------
    def _add(self, name: str, i: int, value: torch.Tensor) -> None:
        key = (name, i)
        value = value.detach().float()
        self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._counts[key] = self._counts.get(key, 0) + 1

    def _max(self, name: str, i: int, value: torch.Tensor) -> None:
        key = (name, i)
        self._sums[key] = torch.maximum(self._sums[key], value) if key in self._sums else value.detach().float()
        self._counts[key] = 1

    def _spikes(self, i: int, trace) -> None:
        self._add("firing_rate_pre", i, trace.pre.float().mean())
        self._add("firing_rate_post", i, trace.post.float().mean())
        self._add("membrane_abs", i, trace.membrane.float().abs().mean())

    def _liquid(self, i: int, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._add("liquid_abs", i, out[0].float().abs().mean())  # out: (states b l q, last state b q)

    def _mamba(self, i: int, mamba: Mamba, hidden: torch.Tensor) -> None:
        delta, state = mamba_stats(mamba, hidden.detach())
        self._add("mamba_delta", i, delta)
        self._add("mamba_state", i, state)

    def observe_grads(self) -> None:
        """Each block's gradient norm, now: call it after unscaling and before clipping."""
        grads = [[local(p.grad) for p in block.parameters() if p.grad is not None] for block in self.blocks]
        self._grad_norms = _norms(grads, self.dist, self.device)

    # -- reading ---------------------------------------------------------------------------
    @torch.no_grad()
    def take(self) -> torch.Tensor | None:
        """Disarm; the values since ``arm`` as one flat device tensor, field-major (len(FIELDS)
        x blocks), NaN where nothing was seen; None if the probe was not armed."""
        if not self.armed:
            return None
        self._disarm()
        n = len(self.blocks)
        nan = torch.full((), math.nan, device=self.device)
        rows = []
        for name in FIELDS:
            if name == "grad_norm":
                rows.append(self._grad_norms if self._grad_norms is not None else nan.expand(n))
            elif name == "param_norm":
                rows.append(_norms([[local(p.detach()) for p in b.parameters()] for b in self.blocks], self.dist,
                                   self.device))
            else:
                rows.append(torch.stack([self._mean(name, i, nan) for i in range(n)]))
        self._reset()
        return torch.cat([r.float().reshape(n) for r in rows])

    def _mean(self, name: str, i: int, missing: torch.Tensor) -> torch.Tensor:
        key = (name, i)
        return self._sums[key] / self._counts[key] if key in self._sums else missing

    def fields(self, floats: list[float]) -> dict[str, list[float] | None]:
        """The ``blocks`` record's fields from ``take()``'s values read on the host: one float
        per block, None for a component the layout lacks."""
        n = len(self.blocks)
        if len(floats) != len(FIELDS) * n:
            raise ValueError(f"expected {len(FIELDS) * n} values ({len(FIELDS)} fields x {n} blocks), "
                             f"got {len(floats)}")
        return {name: [float(v) for v in floats[k * n:(k + 1) * n]] if self.present[name] else None
                for k, name in enumerate(FIELDS)}

    @property
    def size(self) -> int:
        """Length of ``take()``'s tensor."""
        return len(FIELDS) * len(self.blocks)
