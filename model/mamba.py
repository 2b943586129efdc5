"""The Mamba mixer block, as mamba-ssm's ``mamba_simple.Mamba`` (its non-fused path).

Parameter names equal mamba-ssm's, so its state dicts load into this module and back. For
decoding, ``MambaState`` is its inference cache (the conv's last inputs, the scan's state)
and ``Mamba.step`` advances it by one token, as mamba-ssm's ``Mamba.step`` does.

Shape letters:
    b  batch
    l  sequence length
    d  model width (d_model)
    e  inner width, expand * d (d_inner)
    n  state size per channel (d_state)
    r  rank of the delta projection (dt_rank)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.ops.selective_scan import SCAN_IMPLS, ScanImpl, resolve_scan_impl, selective_scan
from model.ops.selective_scan.mamba_inner import mamba_inner


@dataclass
class MambaState:
    """The mixer's inference cache; None before the first token."""

    conv: Tensor | None = None  # b e k: the conv's last k = d_conv - 1 inputs, oldest first
    ssm: Tensor | None = None  # b e n: the selective scan's state, in its compute dtype


class Mamba(nn.Module):
    """in_proj -> causal depthwise conv + silu -> selective scan gated by silu(z) -> out_proj."""

    # children whose weights are used but whose forward never runs (dt_proj's bias goes to
    # the scan as delta_bias, as mamba-ssm does): a forward hook on them would never fire
    weights_only_children = ("dt_proj",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        scan_impl: ScanImpl = "auto",
    ) -> None:
        super().__init__()
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; valid: {', '.join(SCAN_IMPLS)}")
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.scan_impl = scan_impl
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.out_proj = nn.Linear(e, d_model, bias=bias)
        self._init_dt_proj(dt_min, dt_max, dt_init_floor, dt_scale)

        # S4D-real: A[e, :] = -(1..n). A deterministic log of positive integers: never NaN.
        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(e, 1)  # (e n)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(e))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def _init_dt_proj(self, dt_min: float, dt_max: float, floor: float, scale: float) -> None:
        """Weight uniform in +-scale/sqrt(r); bias so that softplus(bias) = dt, with dt
        log-uniform in [dt_min, dt_max] (clamped at ``floor``), as mamba-ssm does."""
        std = self.dt_rank**-0.5 * scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)  # (e)
        inv_softplus = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Mamba:
        return cls(
            cfg.hidden_dim,
            d_state=cfg.mamba_d_state,
            d_conv=cfg.mamba_d_conv,
            expand=cfg.mamba_expand,
            dt_rank=cfg.mamba_dt_rank,
            scan_impl=cfg.scan_impl,
        )

    def forward(self, hidden: Tensor, state: MambaState | None = None) -> Tensor:
        """(b l d) -> (b l d); position t reads positions <= t only. With a ``MambaState``
        (decoding): over an empty state, the sequence, keeping its last state; over a state
        that has seen tokens, token by token (``step``)."""
        if state is not None and state.ssm is not None:
            return torch.cat([self.step(h_t, state) for h_t in hidden.split(1, dim=1)], dim=1)
        xz = self.in_proj(hidden)  # (b l 2e)
        if state is None and torch.is_grad_enabled() and resolve_scan_impl(xz, self.scan_impl) == "numba" \
                and not self._watched():
            return self._fused(xz)
        return self.out_proj(self._unfused(xz, state))

    def _watched(self) -> bool:
        """Whether a forward hook watches a layer the fused Function would run past
        (``--inject-fault activation:...``, the non-finite diagnosis): then the op-by-op
        path runs, and the hook sees the layer's output."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.conv1d, self.x_proj, self.out_proj))

    def _fused(self, xz: Tensor) -> Tensor:
        """(b l 2e) -> (b l d), out_proj included, in one autograd Function that keeps only
        xz and the weights (``model.ops.selective_scan.mamba_inner``): the CPU path, where
        the scan is the numba kernel, under autograd. Without autograd nothing is saved, and
        the op-by-op path is what a decoding prefill runs, so its logits equal the forward's
        bit for bit (the fused forward alone would be about 1.2x faster there)."""
        conv = self.conv1d
        return mamba_inner(xz, conv.weight, conv.bias, self.x_proj.weight, self.dt_proj.weight,
                           self.dt_proj.bias, self.A_log, self.D, self.out_proj.weight, self.out_proj.bias)

    def _unfused(self, xz: Tensor, state: MambaState | None = None) -> Tensor:
        """(b l 2e) -> (b l e) op by op, as mamba-ssm's reference path; any scan. With a
        ``state``, the conv's last inputs and the scan's last state are kept in it."""
        l = xz.shape[1]
        xz = xz.transpose(1, 2)  # (b 2e l)
        x, z = xz.chunk(2, dim=1)  # (b e l) each
        if state is not None:
            state.conv = F.pad(x, (self.d_conv - 1, 0))[..., l:]  # b e k: the last k inputs, zeros before
        x = F.silu(self.conv1d(x)[..., :l])  # causal: drop the outputs that read the right pad
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b l r+2n)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b e l)
        A = -torch.exp(self.A_log.float())  # (e n)
        y = selective_scan(
            x, delta, A,
            B.transpose(1, 2),  # (b n l), a view: every scan reads strides
            C.transpose(1, 2),  # (b n l)
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=state is not None,
            impl=self.scan_impl,
        )  # (b e l)
        if state is not None:
            y, state.ssm = y  # (b e l), (b e n)
        return y.transpose(1, 2)  # (b l e)

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        """One token (b 1 d) after what ``state`` has seen, as mamba-ssm's ``Mamba.step``;
        moves the state on by that token."""
        xz = self.in_proj(hidden[:, 0])  # b 2e
        x, z = xz.chunk(2, dim=-1)  # b e each
        window = torch.cat([state.conv, x[..., None]], dim=-1)  # b e k+1, oldest first
        state.conv = window[..., 1:]
        x = (window * self.conv1d.weight[:, 0]).sum(-1)  # b e: the causal conv at this token
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # b r, b n, b n
        dtype = state.ssm.dtype  # the scan's compute dtype (fp32, or fp64 for an fp64 model)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).to(dtype) + self.dt_proj.bias.to(dtype))  # b e
        A = -torch.exp(self.A_log.to(dtype))  # e n
        u = x.to(dtype)
        state.ssm = torch.exp(delta[..., None] * A) * state.ssm + (delta * u)[..., None] * B.to(dtype)[:, None]
        y = torch.einsum("ben,bn->be", state.ssm, C.to(dtype)) + u * self.D.to(dtype)  # b e
        y = y * F.silu(z.to(dtype))
        return self.out_proj(y.to(hidden.dtype))[:, None]  # b 1 d
