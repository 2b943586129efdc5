"""The spiking path of a block: two layers of leaky integrate-and-fire (LIF) neurons over
the token axis (``model.ops.lif``, with the semantics of
``snntorch.Leaky(reset_mechanism="subtract")``), and spike-to-continuous conversion.

For decoding, ``SpikingState`` carries what the path needs from token to token (the two
membranes and the feature filter's state), and ``SpikingPath.step`` advances it by one token.

Shapes: b batch, l length, s spiking units, d hidden, w rate window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.ops.discounted_cumsum import discounted_cumsum
from model.ops.lif import lif


RATE_BY_POOL = {"cpu": False, "cuda": True}
"""Per device type, whether the rate features are an average pool over tokens (two kernels
each way, for a GPU) or a cumsum's difference (thirteen ops with the backward, but 2-4x
faster on the CPU, whose average pool is slow along the token axis). Both give the same
features bit for bit (sums of 0/1 are exact) and gradients within rounding."""


def _window_mean(spk: torch.Tensor, window: int, pool: bool) -> torch.Tensor:
    """Each token's mean of the last ``window`` spikes (b l s), zeros before the start."""
    if not pool:  # in fp32 at least: in bf16 the backward's running sums drift (7% at 300 tokens)
        csum = spk.to(torch.promote_types(spk.dtype, torch.float32)).cumsum(dim=1)  # b l s (not cumsum's
        # dtype=: its backward casts the gradient to the input's dtype first)
        lagged = F.pad(csum, (0, 0, window, 0))[:, : spk.shape[1]]  # b l s
        return ((csum - lagged) / window).to(spk.dtype)
    if spk.shape[1] == 0:
        return spk / window
    padded = F.pad(spk, (0, 0, window - 1, 0)).unsqueeze(1)  # b 1 (w-1+l) s
    return F.avg_pool2d(padded, (window, 1), stride=1).squeeze(1)  # b l s


def spikes_to_features(
    spk: torch.Tensor, mem: torch.Tensor, method: str, window: int, tau: float, threshold: float
) -> torch.Tensor:
    """Continuous features (b l s) from a spike train, all causal in the token axis.

    rate: moving average of the last ``window`` spikes (zeros before the start);
    temporal: exponential filter f[t] = a f[t-1] + (1-a) spk[t] with a = exp(-1/tau);
    potential: the membrane potential in units of the threshold.
    """
    if method == "rate":
        return _window_mean(spk, window, RATE_BY_POOL.get(spk.device.type, False))
    if method == "temporal":
        a = math.exp(-1.0 / tau)
        return (1 - a) * discounted_cumsum(spk, a)
    if method == "potential":
        return mem / threshold
    raise ValueError(f"unknown spike_to_mamba_method {method!r}; valid: rate, temporal, potential")


@dataclass
class SpikeTrace:
    """What one block's spiking path computed, kept for plasticity and monitoring."""

    pre: torch.Tensor  # b l s   spikes of the first LIF layer (pre-synaptic to `synapse`)
    post: torch.Tensor  # b l s  spikes of the second LIF layer (post-synaptic)
    membrane: torch.Tensor  # b l s  membrane potential of the second layer
    features: torch.Tensor  # b l s  continuous features after conversion

    def firing_rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean spikes per token per neuron (s,) of the two layers; stays on the device."""
        return self.pre.float().mean(dim=(0, 1)), self.post.float().mean(dim=(0, 1))


@dataclass
class SpikingState:
    """What the spiking path carries from token to token; None before the first token."""

    mem1: Tensor | None = None  # b s, fp32: the first layer's membranes
    mem2: Tensor | None = None  # b s, fp32: the second layer's
    window: Tensor | None = None  # b w s: the rate method's last w spikes of layer 2
    trace: Tensor | None = None  # b s: the temporal method's running sum


def _lif_step(cur: Tensor, mem: Tensor, beta: float, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """One token (b 1 s) of the LIF recurrence, in ``model.ops.lif``'s order of operations:
    mem = (beta mem + cur) - threshold [mem_prev > threshold]; returns (spk, mem) in cur's
    dtype (b 1 s) and the fp32 state (b s)."""
    c = cur[:, 0].float()  # b s
    reset = (mem > threshold).float()
    new = mem * beta + c - reset * threshold
    spk = (new > threshold).to(cur.dtype)
    return spk[:, None], new.to(cur.dtype)[:, None], new


class SpikingPath(nn.Module):
    """input -> Linear -> LIF -> synapse (Linear) -> LIF -> features.

    ``synapse`` carries the weights STDP acts on: pre = first layer's spikes, post =
    second layer's spikes. With a ``SpikingState`` (decoding), ``forward`` over an empty
    state runs the sequence and keeps its last state; over a state that has seen tokens it
    steps token by token (``step``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.spiking_units
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.hidden_dim, s)
        self.synapse = nn.Linear(s, s)
        # Scaled so that a fresh network with the default threshold of 1 fires on ~10-20%
        # of tokens instead of starting silent with every surrogate gradient near zero.
        # Deliberately independent of the threshold: scaling both together would make
        # --spike-threshold a no-op.
        nn.init.normal_(self.encoder.weight, std=0.45 / math.sqrt(cfg.hidden_dim))
        nn.init.normal_(self.synapse.weight, std=1.2 / math.sqrt(s))
        nn.init.zeros_(self.encoder.bias)
        nn.init.constant_(self.synapse.bias, 0.1)

    def forward(self, h: Tensor, state: SpikingState | None = None) -> SpikeTrace:
        """(b l d) -> the trace of every token, each (b l s)."""
        if state is not None and state.mem1 is not None:
            return _cat_traces([self.step(h_t, state) for h_t in h.split(1, dim=1)])
        c = self.cfg
        spk1, mem1 = lif(self.encoder(h), c.beta, c.spike_threshold, c.surrogate, c.surrogate_scale, c.lif_impl)
        spk2, mem2 = lif(self.synapse(spk1), c.beta, c.spike_threshold, c.surrogate, c.surrogate_scale, c.lif_impl)
        feats = spikes_to_features(
            spk2, mem2, c.spike_to_mamba_method, c.spike_rate_window, c.spike_temporal_tau, c.spike_threshold
        )
        if state is not None:
            self._keep(state, mem1, spk2, mem2)
        return SpikeTrace(pre=spk1, post=spk2, membrane=mem2, features=feats)

    def _keep(self, state: SpikingState, mem1: Tensor, spk2: Tensor, mem2: Tensor) -> None:
        """The state after a sequence: the last membranes and the feature filter's state."""
        c = self.cfg
        state.mem1, state.mem2 = mem1[:, -1].float(), mem2[:, -1].float()
        if c.spike_to_mamba_method == "rate":
            w = c.spike_rate_window
            state.window = F.pad(spk2, (0, 0, w, 0))[:, spk2.shape[1]:]  # b w s: the last w spikes
        elif c.spike_to_mamba_method == "temporal":
            state.trace = discounted_cumsum(spk2, math.exp(-1.0 / c.spike_temporal_tau))[:, -1]  # b s

    def step(self, h: Tensor, state: SpikingState) -> SpikeTrace:
        """One token (b 1 d) after what ``state`` has seen; moves it on by that token."""
        c = self.cfg
        thr = c.spike_threshold
        spk1, _, state.mem1 = _lif_step(self.encoder(h), state.mem1, c.beta, thr)
        spk2, mem2, state.mem2 = _lif_step(self.synapse(spk1), state.mem2, c.beta, thr)
        if c.spike_to_mamba_method == "rate":  # sums of 0/1 are exact: the pooled average bit for bit
            state.window = torch.cat([state.window[:, 1:], spk2], dim=1)  # b w s
            feats = state.window.sum(dim=1, keepdim=True) / c.spike_rate_window  # b 1 s
        elif c.spike_to_mamba_method == "temporal":
            a = math.exp(-1.0 / c.spike_temporal_tau)
            state.trace = a * state.trace + spk2[:, 0]  # b s
            feats = ((1 - a) * state.trace)[:, None]
        else:  # potential
            feats = mem2 / thr
        return SpikeTrace(pre=spk1, post=spk2, membrane=mem2, features=feats)


def _cat_traces(traces: list[SpikeTrace]) -> SpikeTrace:
    def cat(name: str) -> Tensor:
        return torch.cat([getattr(t, name) for t in traces], dim=1)

    return SpikeTrace(pre=cat("pre"), post=cat("post"), membrane=cat("membrane"), features=cat("features"))


__all__ = ["SpikeTrace", "SpikingPath", "SpikingState", "spikes_to_features"]
