"""Recurrent decoding for ``HybridLM``: a per-block state, so each new token costs O(1)
in the sequence length (O(l) in the cross-attention, which reads a KV cache).

Per block the state holds

    mem1, mem2   (b s)        the membranes of the two LIF layers (reset by subtraction)
    window       (b w s)      rate features: the last spike_rate_window spikes of layer 2
    trace        (b s)        temporal features: the exponential filter's running sum
    liquid       (b q)        the CfC or LTC state, one time unit per token
    conv         (b e k)      Mamba: the causal depthwise conv's last k = d_conv - 1 inputs
    ssm          (b e n)      Mamba: the selective scan's state, as mamba-ssm's ``Mamba.step``
    kv           per cross-attention, the keys and values so far, (b h t c) each

Gating, MLP and LayerNorm are per token and keep no state.

``advance(model, tokens, state)`` on a fresh state (no token seen yet) runs the modules'
own sequence functions over the whole prompt, so the prompt's logits are those of the full
forward, and keeps their last states; on a state that has seen tokens it steps token by
token with each component's recurrence. ``HybridLM.prefill``/``step`` call it.

The block's composition below mirrors ``HybridBlock.forward`` line for line; the test that
incremental logits equal full-sequence logits for every layout keeps the two together.

Shapes: b batch, l length, d hidden, s spiking units, w rate window, q liquid units,
e Mamba inner width, n state size, k conv history, h heads, c channels per head, t tokens
seen, v vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from model.fusion import CausalCrossAttention
from model.mamba import Mamba
from model.ops.discounted_cumsum import discounted_cumsum
from model.ops.lif import lif
from model.ops.selective_scan import selective_scan
from model.spiking import SpikingPath, spikes_to_features

if TYPE_CHECKING:
    from model.hybrid import HybridBlock, HybridLM


@dataclass
class BlockState:
    """What one block carries from token to token; None until the first token."""

    mem1: Tensor | None = None  # b s, fp32
    mem2: Tensor | None = None  # b s, fp32
    window: Tensor | None = None  # b w s
    trace: Tensor | None = None  # b s
    liquid: Tensor | None = None  # b q
    conv: Tensor | None = None  # b e k
    ssm: Tensor | None = None  # b e n
    kv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (b h t c) each


@dataclass
class DecodeState:
    """The decoding state of a batch of ``batch`` sequences after ``position`` tokens."""

    batch: int
    blocks: list[BlockState]
    position: int = 0


def init_state(model: HybridLM, batch: int) -> DecodeState:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return DecodeState(batch, [BlockState() for _ in model.blocks])


@torch.no_grad()
def advance(model: HybridLM, tokens: Tensor, state: DecodeState) -> Tensor:
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
        logits = _forward(model, tokens, state, fresh=True)
    else:  # one token at a time: each component's recurrence
        logits = torch.cat([_forward(model, t, state, fresh=False) for t in tokens.split(1, dim=1)], dim=1)
    state.position += tokens.shape[1]
    return logits  # b l v


def _forward(model: HybridLM, tokens: Tensor, state: DecodeState, fresh: bool) -> Tensor:
    x = model.embedding(tokens)  # b l d
    for block, st in zip(model.blocks, state.blocks, strict=True):
        x = _block(block, x, st, fresh)
    return model.head(model.norm(x))  # b l v


# --- the block: HybridBlock.forward with state ---------------------------------------------


def _block(block: HybridBlock, x: Tensor, st: BlockState, fresh: bool) -> Tensor:
    cfg = block.cfg
    h = block.norm(x)  # b l d
    feats = _spiking(block.spiking, h, st, fresh)  # b l s
    if cfg.use_mamba:
        mixed, _ = block.mixer(h, _with_mamba(block, h, feats, st, fresh))  # b l d
    else:
        liq = _liquid(block, torch.cat([h, feats], dim=-1), st)  # b l q
        if cfg.use_adaptive_gating:
            mixed, _ = block.mixer(h, [block.spike_out(feats), block.liquid_out(liq)])
        else:
            mixed = block.stream_out(torch.cat([feats, liq], dim=-1))  # b l d
    x = x + block.dropout(mixed)
    if cfg.mlp_ratio:
        x = x + block.dropout(block.mlp(block.mlp_norm(x)))
    return x


def _with_mamba(block: HybridBlock, h: Tensor, feats: Tensor, st: BlockState, fresh: bool) -> list[Tensor]:
    mode = block.cfg.integration_mode
    if mode == "bidirectional":
        m = _mamba(block.mamba, h + block.spike_to_mamba(feats), st, fresh)  # spike -> Mamba
        liq_in = h + block.mamba_to_liquid(m)  # Mamba -> liquid
    else:
        liq_in = h
    liq = _liquid(block, torch.cat([liq_in, feats], dim=-1), st)  # b l q
    a = block.stream_out(torch.cat([feats, liq], dim=-1))  # b l d
    if mode == "sequential":
        m = _mamba(block.mamba, h + a, st, fresh)
    elif mode == "parallel":
        m = _mamba(block.mamba, h, st, fresh)
    if block.cfg.use_cross_attention:
        a_new = a + _attend(block.cross_attn, a, m, st, "cross_attn", fresh)
        if mode == "bidirectional":
            m = m + _attend(block.cross_attn_back, m, a, st, "cross_attn_back", fresh)
        a = a_new
    return [a, m]


# --- spiking --------------------------------------------------------------------------------


def _lif_step(cur: Tensor, mem: Tensor, beta: float, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """One token of ``model.spiking``'s recurrence, in its order of operations:
    mem = (beta mem + cur) - threshold [mem_prev > threshold]; returns (spk, mem) in
    cur's dtype (b 1 s) and the fp32 state (b s)."""
    c = cur[:, 0].float()  # b s
    reset = (mem > threshold).float()
    new = mem * beta + c - reset * threshold
    spk = (new > threshold).to(cur.dtype)
    return spk[:, None], new.to(cur.dtype)[:, None], new


def _spiking(path: SpikingPath, h: Tensor, st: BlockState, fresh: bool) -> Tensor:
    """The spike features (b l s) of ``SpikingPath.forward``, keeping the membranes and
    the feature filter's state."""
    c = path.cfg
    method, window, thr = c.spike_to_mamba_method, c.spike_rate_window, c.spike_threshold
    if fresh:
        spk1, mem1 = lif(path.encoder(h), c.beta, thr, c.surrogate, c.surrogate_scale, c.lif_impl)
        spk2, mem2 = lif(path.synapse(spk1), c.beta, thr, c.surrogate, c.surrogate_scale, c.lif_impl)
        feats = spikes_to_features(spk2, mem2, method, window, c.spike_temporal_tau, thr)
        st.mem1, st.mem2 = mem1[:, -1].float(), mem2[:, -1].float()
        if method == "rate":
            st.window = F.pad(spk2, (0, 0, window, 0))[:, spk2.shape[1]:]  # b w s: the last w spikes
        elif method == "temporal":
            st.trace = discounted_cumsum(spk2, math.exp(-1.0 / c.spike_temporal_tau))[:, -1]  # b s
        return feats
    spk1, _, st.mem1 = _lif_step(path.encoder(h), st.mem1, c.beta, thr)
    spk2, mem2, st.mem2 = _lif_step(path.synapse(spk1), st.mem2, c.beta, thr)
    if method == "rate":  # sums of 0/1 are exact, so this equals the cumsum difference bit for bit
        st.window = torch.cat([st.window[:, 1:], spk2], dim=1)  # b w s
        return st.window.sum(dim=1, keepdim=True) / window  # b 1 s
    if method == "temporal":
        a = math.exp(-1.0 / c.spike_temporal_tau)
        st.trace = a * st.trace + spk2[:, 0]  # b s
        return ((1 - a) * st.trace)[:, None]
    return mem2 / thr  # potential


# --- liquid -----------------------------------------------------------------------------------


def _liquid(block: HybridBlock, x: Tensor, st: BlockState) -> Tensor:
    """The liquid layer over ``x`` (b l i) from the carried state: the layer itself takes an
    initial state, so its own (CfC or LTC) step runs, one time unit per token."""
    y, st.liquid = block.liquid(x, st.liquid)  # b l q, b q
    return y


# --- Mamba ------------------------------------------------------------------------------------


def _mamba(mamba: Mamba, hidden: Tensor, st: BlockState, fresh: bool) -> Tensor:
    return _mamba_sequence(mamba, hidden, st) if fresh else _mamba_step(mamba, hidden, st)


def _mamba_sequence(mamba: Mamba, hidden: Tensor, st: BlockState) -> Tensor:
    """``Mamba.forward`` over a prompt (b l d), keeping the conv inputs and the last state."""
    l, k = hidden.shape[1], mamba.d_conv - 1
    xz = mamba.in_proj(hidden).transpose(1, 2)  # b 2e l
    x, z = xz.chunk(2, dim=1)  # b e l each
    st.conv = F.pad(x, (k, 0))[..., l:]  # b e k: the last k inputs, zeros before the start
    x = F.silu(mamba.conv1d(x)[..., :l])
    x_dbl = mamba.x_proj(x.transpose(1, 2))  # b l r+2n
    dt, B, C = x_dbl.split([mamba.dt_rank, mamba.d_state, mamba.d_state], dim=-1)
    delta = F.linear(dt, mamba.dt_proj.weight).transpose(1, 2)  # b e l
    y, st.ssm = selective_scan(
        x, delta, -torch.exp(mamba.A_log.float()),
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),  # b n l each
        mamba.D.float(), z=z, delta_bias=mamba.dt_proj.bias.float(), delta_softplus=True,
        return_last_state=True, impl=mamba.scan_impl,
    )  # b e l, b e n
    return mamba.out_proj(y.transpose(1, 2))  # b l d


def _mamba_step(mamba: Mamba, hidden: Tensor, st: BlockState) -> Tensor:
    """One token (b 1 d) of the mixer, as mamba-ssm's ``Mamba.step``."""
    xz = mamba.in_proj(hidden[:, 0])  # b 2e
    x, z = xz.chunk(2, dim=-1)  # b e each
    window = torch.cat([st.conv, x[..., None]], dim=-1)  # b e k+1, oldest first
    st.conv = window[..., 1:]
    x = (window * mamba.conv1d.weight[:, 0]).sum(-1)  # b e: the causal conv at this token
    if mamba.conv1d.bias is not None:
        x = x + mamba.conv1d.bias
    x = F.silu(x)
    dt, B, C = mamba.x_proj(x).split([mamba.dt_rank, mamba.d_state, mamba.d_state], dim=-1)  # b r, b n, b n
    dtype = st.ssm.dtype  # the scan's compute dtype (fp32, or fp64 for an fp64 model)
    delta = F.softplus(F.linear(dt, mamba.dt_proj.weight).to(dtype) + mamba.dt_proj.bias.to(dtype))  # b e
    A = -torch.exp(mamba.A_log.to(dtype))  # e n
    u = x.to(dtype)
    st.ssm = torch.exp(delta[..., None] * A) * st.ssm + (delta * u)[..., None] * B.to(dtype)[:, None]  # b e n
    y = torch.einsum("ben,bn->be", st.ssm, C.to(dtype)) + u * mamba.D.to(dtype)
    y = y * F.silu(z.to(dtype))
    return mamba.out_proj(y.to(hidden.dtype))[:, None]  # b 1 d


# --- cross-attention ----------------------------------------------------------------------------


def _keys_values(attn: CausalCrossAttention, kv_stream: Tensor) -> tuple[Tensor, Tensor]:
    b, l, d = kv_stream.shape
    k, v = attn.kv(attn.norm_kv(kv_stream)).view(b, l, 2, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    return k, v  # b h l c each


def _attend(
    attn: CausalCrossAttention, query_stream: Tensor, kv_stream: Tensor, st: BlockState, name: str, fresh: bool
) -> Tensor:
    """``CausalCrossAttention`` with a KV cache: the new token's query reads every key so far."""
    if fresh:
        st.kv[name] = _keys_values(attn, kv_stream)
        return attn(query_stream, kv_stream)  # b l d
    b, _, d = query_stream.shape
    k, v = _keys_values(attn, kv_stream)  # b h 1 c
    keys, values = (torch.cat([old, new], dim=2) for old, new in zip(st.kv[name], (k, v)))  # b h t c
    st.kv[name] = keys, values
    q = attn.q(attn.norm_q(query_stream)).view(b, 1, attn.heads, d // attn.heads).transpose(1, 2)  # b h 1 c
    out = F.scaled_dot_product_attention(q, keys, values)  # b h 1 c: every cached key is in the past
    return attn.out(out.transpose(1, 2).reshape(b, 1, d))  # b 1 d
