"""The hybrid liquid-spiking-Mamba language model.

A pre-norm residual stack. Each block reads h = norm(x) and runs

    spiking stream   h -> LIF -> synapse -> LIF -> spike features     (model.spiking)
    liquid stream    [h, spike features] -> CfC/LTC over tokens        (model.liquid)
    Mamba stream     selective state-space mixer, if --use-mamba       (model.mamba)

combined by ``--integration-mode``:

    sequential     spiking -> liquid -> Mamba: the Mamba stream reads the liquid/spiking
                   stream's output
    parallel       the liquid/spiking stream and the Mamba stream both read h, side by side
    bidirectional  spike features feed the Mamba input (spike -> Mamba) and the Mamba output
                   feeds the liquid cell's input (Mamba -> liquid)

then the branches are mixed (adaptive gates or a fixed average), optionally after causal
cross-attention between the streams, and a feed-forward layer follows. Without Mamba the
spiking and liquid outputs are fused by one projection to d, or, with adaptive gating,
projected separately and gated.

Shapes: b batch, l length, d hidden, s spiking units, q liquid units, v vocabulary,
f the feed-forward width (mlp_ratio * d).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import INTEGRATION_MODES, ModelConfig
from model.fusion import BranchMixer, CausalCrossAttention, KVCache
from model.generate import advance
from model.liquid import LiquidLayer
from model.loss import argmax_hits, linear_cross_entropy, logits_cross_entropy
from model.mamba import Mamba, MambaState
from model.spiking import SpikeTrace, SpikingPath, SpikingState


@dataclass
class BlockAux:
    """Per-block internals returned with ``return_aux=True`` (no second forward pass)."""

    spikes: SpikeTrace
    gates: torch.Tensor | None  # b l h k, None without adaptive gating


@dataclass
class BlockState:
    """What one block carries from token to token when decoding: each stateful part's own
    state (the liquid layer's is its hidden state, (b q)). The feed-forward layer, the norms
    and the gating are per token and keep none."""

    spiking: SpikingState = field(default_factory=SpikingState)
    liquid: torch.Tensor | None = None  # b q
    mamba: MambaState = field(default_factory=MambaState)
    kv: dict[str, KVCache] = field(default_factory=lambda: {"cross_attn": KVCache(), "cross_attn_back": KVCache()})


@dataclass
class DecodeState:
    """The decoding state of a batch of ``batch`` sequences after ``position`` tokens."""

    batch: int
    blocks: list[BlockState]
    position: int = 0


@dataclass
class HybridOutput:
    logits: torch.Tensor | None  # b l v; None where the loss was computed without them
    blocks: list[BlockAux]
    loss: torch.Tensor | None = None  # () the mean next-token loss, when targets were given
    hits: torch.Tensor | None = None  # () int64 targets that are their row's argmax, in evaluation (no autograd)


def _linear(d_in: int, d_out: int, std: float, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, std=std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class _RecomputedMLP(torch.autograd.Function):
    """(x (b l d), the LayerNorm's weight and bias (d), w1 (f d), b1 (f) | None, w2 (d f),
    b2 (d) | None) -> LayerNorm -> Linear -> SiLU -> Linear (b l d), keeping only x and the
    weights: the backward recomputes the norm, the first Linear and the SiLU (one matmul),
    where autograd keeps the normed input and both (b l f) activations of every block until
    the backward (20 MB of the phase-3 step's peak). Its gradients are autograd's ops in
    autograd's order, so they equal the module path's bit for bit. ``dtype``: the autocast
    dtype the Linears run in (None without autocast); the norm runs in x's dtype."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2, dtype):  # type: ignore[override]
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2)
        ctx.eps, ctx.dtype, ctx.has_b2 = eps, dtype, b2 is not None
        h = torch.native_layer_norm(x, x.shape[-1:], ln_w, ln_b, eps)[0]
        h = h if dtype is None else h.to(dtype)
        return F.linear(F.silu(F.linear(h, w1, b1)), w2, b2)  # b l d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, ln_w, ln_b, w1, b1, w2 = ctx.saved_tensors
        normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], ln_w, ln_b, ctx.eps)
        h = normed if ctx.dtype is None else normed.to(ctx.dtype)
        a = F.linear(h, w1, b1).flatten(0, -2)  # (bl f)
        dy, h2 = dy.flatten(0, -2), h.flatten(0, -2)  # (bl d) each
        dw2 = dy.t().mm(F.silu(a))  # (d f)
        da = torch.ops.aten.silu_backward(dy.mm(w2), a)  # (bl f)
        dh = da.mm(w1).view_as(h).to(normed.dtype)  # the cast's backward, as autocast's
        needs = ctx.needs_input_grad
        dx, dln_w, dln_b = torch.ops.aten.native_layer_norm_backward(
            dh, x, x.shape[-1:], mean, rstd, ln_w, ln_b, [needs[0], needs[1], needs[2]])
        return (dx, dln_w, dln_b, None, da.t().mm(h2), None if b1 is None else da.sum(0), dw2,
                dy.sum(0) if ctx.has_b2 else None, None)


def _recomputed_mlp(norm: nn.LayerNorm, mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(norm(x))`` through ``_RecomputedMLP``. Under autocast its tensors are cast as
    autocast casts them (the norm's to fp32, the Linears' to the autocast dtype, fp64
    excepted) and the Function runs with autocast off: its ops, the backward's included,
    see the dtypes the module path's do."""
    device = x.device.type
    linears = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
    if not torch.is_autocast_enabled(device):
        return _RecomputedMLP.apply(x, norm.weight, norm.bias, norm.eps, *linears, None)
    dtype = torch.get_autocast_dtype(device)
    fp32 = [t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()
            for t in (x, norm.weight, norm.bias)]
    cast = [t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in linears]
    with torch.autocast(device, enabled=False):
        return _RecomputedMLP.apply(*fp32, norm.eps, *cast, dtype)


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        d, s, q = cfg.hidden_dim, cfg.spiking_units, cfg.liquid_units
        self.cfg, self.index = cfg, index
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # residual outputs shrink with depth
        self.norm = nn.LayerNorm(d)  # one fused kernel; RMSNorm is a composite, 2.7x slower on CPU
        self.spiking = SpikingPath(cfg)
        self.liquid = LiquidLayer.from_config(cfg, input_size=d + s)
        if cfg.use_mamba:
            self.mamba = Mamba.from_config(cfg)
            self.stream_out = _linear(s + q, d, out_std)  # liquid/spiking stream -> d
            if cfg.integration_mode == "bidirectional":
                self.spike_to_mamba = _linear(s, d, 0.02)
                self.mamba_to_liquid = _linear(d, d, 0.02)
            if cfg.use_cross_attention:
                recompute = cfg.recompute_cross_attention
                self.cross_attn = CausalCrossAttention(d, cfg.cross_attn_heads, out_std, recompute)
                if cfg.integration_mode == "bidirectional":
                    self.cross_attn_back = CausalCrossAttention(d, cfg.cross_attn_heads, out_std, recompute)
        elif cfg.use_adaptive_gating:
            self.spike_out = _linear(s, d, out_std)
            self.liquid_out = _linear(q, d, out_std)
        else:
            # the fixed average of two projections is one projection of the concatenation
            self.stream_out = _linear(s + q, d, out_std)
        self.mixer = BranchMixer(d, 2, cfg.num_gate_heads, cfg.use_adaptive_gating)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.mlp_ratio:
            self.mlp_norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(
                _linear(d, cfg.mlp_ratio * d, 0.02), nn.SiLU(), _linear(cfg.mlp_ratio * d, d, out_std)
            )

    def forward(self, x: torch.Tensor, state: BlockState | None = None) -> tuple[torch.Tensor, BlockAux]:
        """(b l d) -> (b l d) and the block's internals. With a ``BlockState`` (decoding) each
        stateful part runs from its state and moves it past these tokens: the whole sequence
        on a fresh state, token by token on a state that has seen tokens."""
        h = self.norm(x)  # b l d
        spikes = self.spiking(h, state=None if state is None else state.spiking)
        gates = None
        if self.cfg.use_mamba:
            mixed, gates = self.mixer(h, self._with_mamba(h, spikes.features, state))  # b l d
        else:
            liq = self._liquid(torch.cat([h, spikes.features], dim=-1), state)  # b l q
            if self.cfg.use_adaptive_gating:
                mixed, gates = self.mixer(h, [self.spike_out(spikes.features), self.liquid_out(liq)])
            else:
                mixed = self.stream_out(torch.cat([spikes.features, liq], dim=-1))  # b l d
        x = x + self.dropout(mixed)
        if self.cfg.mlp_ratio:
            x = x + self.dropout(self._mlp(x))
        return x, BlockAux(spikes=spikes, gates=gates)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``mlp(mlp_norm(x))``, (b l d) -> (b l d). With --recompute-mlp, under autograd,
        the normed input and the hidden (b l f) activations are recomputed in the backward,
        not kept; not while a forward hook watches the norm, the MLP or its layers (fault
        injection, a non-finite diagnosis), which the Function would skip."""
        watched = (self.mlp_norm, *self.mlp.modules())
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in watched)
        if self.cfg.recompute_mlp and torch.is_grad_enabled() and not hooked:
            return _recomputed_mlp(self.mlp_norm, self.mlp, x)
        return self.mlp(self.mlp_norm(x))

    def _liquid(self, x: torch.Tensor, state: BlockState | None) -> torch.Tensor:
        """The liquid layer (b l i) -> (b l q), from and into the state's hidden state. The
        parts' states go by keyword: a forward hook (fault injection, the probes) sees the
        same positional inputs with or without them."""
        y, last = self.liquid(x, h0=None if state is None else state.liquid)
        if state is not None:
            state.liquid = last
        return y

    def _with_mamba(self, h: torch.Tensor, feats: torch.Tensor, state: BlockState | None) -> list[torch.Tensor]:
        mode = self.cfg.integration_mode
        mamba_state = None if state is None else state.mamba
        if mode == "bidirectional":
            m = self.mamba(h + self.spike_to_mamba(feats), state=mamba_state)  # spike -> Mamba
            liq_in = h + self.mamba_to_liquid(m)  # Mamba -> liquid
        else:
            liq_in = h
        liq = self._liquid(torch.cat([liq_in, feats], dim=-1), state)  # b l q
        a = self.stream_out(torch.cat([feats, liq], dim=-1))  # b l d
        if mode == "sequential":
            m = self.mamba(h + a, state=mamba_state)  # spiking -> liquid -> Mamba
        elif mode == "parallel":
            m = self.mamba(h, state=mamba_state)
        if self.cfg.use_cross_attention:
            kv = {} if state is None else state.kv
            a_new = a + self.cross_attn(a, m, cache=kv.get("cross_attn"))  # liquid/spiking reads the Mamba stream
            if mode == "bidirectional":
                m = m + self.cross_attn_back(m, a, cache=kv.get("cross_attn_back"))  # and Mamba reads it back
            a = a_new
        return [a, m]


def create_block(cfg: ModelConfig, index: int) -> HybridBlock:
    """The block for ``cfg``'s layout; raises on an integration mode it does not know."""
    if cfg.integration_mode not in INTEGRATION_MODES:
        raise ValueError(
            f"unknown --integration-mode {cfg.integration_mode!r}; valid: {', '.join(INTEGRATION_MODES)}"
        )
    return HybridBlock(cfg, index)


# Parameter-name fragments -> component, first match wins (for the CLI's summary).
_COMPONENTS = (
    ("embedding", "embedding"),
    ("stream_out", "fusion"),
    ("spike_out", "fusion"),
    ("liquid_out", "fusion"),
    ("spike_to_mamba", "fusion"),
    ("mamba_to_liquid", "fusion"),
    ("spiking", "spiking"),
    ("liquid.", "liquid"),
    ("mamba.", "mamba"),
    ("cross_attn", "cross_attention"),
    ("mixer", "gating"),
    ("mlp", "mlp"),
    ("head", "head"),
    ("norm", "norm"),
)


class HybridLM(nn.Module):
    """``HybridLM(cfg)(tokens)`` -> logits (b l v); ``return_aux=True`` also returns each
    block's spike trains, membrane potentials and gates."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        # Tied logits have std ~ std_e * sqrt(d); keep it near 0.25 so the first loss is
        # within a few hundredths of a nat of ln(vocab), whatever the width.
        nn.init.normal_(self.embedding.weight, std=min(0.02, 0.25 / math.sqrt(d)))
        self.blocks = nn.ModuleList(create_block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        else:
            nn.init.zeros_(self.head.weight)

    def forward(self, tokens: torch.Tensor, return_aux: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor | HybridOutput:
        """Logits (b l v) of ``tokens`` (b l); with ``return_aux`` a ``HybridOutput`` with the
        blocks' internals too. With ``targets`` (b l, -100 ignored) a ``HybridOutput`` whose
        ``loss`` is the mean next-token cross-entropy (fp32) and, without autograd
        (evaluation), ``hits`` the number of targets that are the argmax: with --chunked-loss
        computed from the final hidden states a chunk of tokens at a time (``model.loss``),
        and then ``logits`` is None; without it, or while a forward hook watches the final
        norm or the head (fault injection, the non-finite diagnosis), from the whole logits."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an integer tensor of shape (batch, length), got "
                f"{tuple(tokens.shape)} {tokens.dtype}"
            )
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets must have the tokens' shape {tuple(tokens.shape)}, got {tuple(targets.shape)}")
        x = self.embedding(tokens)  # b l d
        aux = []
        for block in self.blocks:
            x, block_aux = block(x)
            aux.append(block_aux)
        if targets is None:
            logits = self.head(self.norm(x))  # b l v
            return HybridOutput(logits, aux) if return_aux else logits
        counting = not torch.is_grad_enabled()
        watched = any(m._forward_hooks or m._forward_pre_hooks for m in (self.norm, self.head))
        if self.cfg.chunked_loss and self.head.bias is None and not watched:
            h = self.norm(x).flatten(0, 1)
            loss, hits = linear_cross_entropy(h, self.head.weight, targets.flatten(), return_hits=True) \
                if counting else (linear_cross_entropy(h, self.head.weight, targets.flatten()), None)
            return HybridOutput(None, aux, loss, hits)
        logits = self.head(self.norm(x))
        return HybridOutput(logits, aux, logits_cross_entropy(logits, targets),
                            argmax_hits(logits, targets) if counting else None)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by component (a tied head counts once, as embedding)."""
        counts: Counter[str] = Counter()
        for name, p in self.named_parameters():
            component = next((c for frag, c in _COMPONENTS if frag in name), "other")
            counts[component] += p.numel()
        counts["total"] = sum(counts.values())
        return dict(counts)

    # --- decoding (the loop is model.generate's) ----------------------------------------------
    def init_state(self, batch: int) -> DecodeState:
        """A fresh decoding state for ``batch`` sequences."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        return DecodeState(batch, [BlockState() for _ in self.blocks])

    def decode(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits (b l v) of ``tokens`` (b l) after what ``state`` has seen, each block running
        from its state; the caller (``model.generate.advance``) moves ``state.position``."""
        x = self.embedding(tokens)  # b l d
        for block, block_state in zip(self.blocks, state.blocks, strict=True):
            x, _ = block(x, block_state)
        return self.head(self.norm(x))  # b l v

    def prefill(self, tokens: torch.Tensor, state: DecodeState | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt ``tokens`` (b l) in one parallel pass; returns its logits (b l v),
        equal to ``self(tokens)``, and the decoding state after it. With a ``state`` that has
        seen tokens, continues from it token by token."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        return advance(self, tokens, state), state

    def step(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per sequence (b,); returns the next-token logits (b v) and moves
        ``state`` on by one token, at a cost that does not grow with the length (the
        cross-attention's KV cache aside)."""
        if token.dim() != 1:
            raise ValueError(f"step takes one token per sequence, shape (batch,), got {tuple(token.shape)}")
        return advance(self, token[:, None], state)[:, 0]

    # --- export ----------------------------------------------------------------------------
    WEIGHTS_FILE = "model.safetensors"
    CONFIG_FILE = "config.json"

    def save_pretrained(self, directory) -> None:
        """Write ``directory/model.safetensors`` and ``directory/config.json``
        (``ModelConfig.to_dict``). A tied head is the embedding: safetensors refuses
        shared tensors, so it is saved once and re-tied by ``from_pretrained``."""
        import json
        import os
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            del tensors["head.weight"]
        for name, write in ((self.WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                            (self.CONFIG_FILE, lambda p: Path(p).write_text(
                                json.dumps(self.cfg.to_dict(), indent=2, default=str)))):
            tmp = out / f".{name}.tmp"
            write(str(tmp))
            os.replace(tmp, out / name)  # a reader never sees a half-written file

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu") -> HybridLM:
        """The model ``save_pretrained`` wrote into ``directory``, in eval mode."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        root = Path(directory)
        paths = [root / cls.CONFIG_FILE, root / cls.WEIGHTS_FILE]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file; pass a directory written by "
                                        "HybridLM.save_pretrained or `lsnn export`")
        model = cls(ModelConfig.from_dict(json.loads(paths[0].read_text())))
        tensors = load_file(str(paths[1]))
        if model.cfg.tie_embeddings and "head.weight" not in tensors and "embedding.weight" in tensors:
            tensors["head.weight"] = tensors["embedding.weight"]
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:  # missing/unexpected keys or shapes: say which file
            raise ValueError(f"{paths[1]} does not fit {paths[0]}: {e}") from e
        return model.to(device).eval()
