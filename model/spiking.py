"""The spiking path of a block: two layers of leaky integrate-and-fire (LIF) neurons over
the token axis (``model.ops.lif``, with the semantics of
``snntorch.Leaky(reset_mechanism="subtract")``), and spike-to-continuous conversion.

Shapes: b batch, l length, s spiking units, d hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.ops.discounted_cumsum import discounted_cumsum
from model.ops.lif import lif


def spikes_to_features(
    spk: torch.Tensor, mem: torch.Tensor, method: str, window: int, tau: float, threshold: float
) -> torch.Tensor:
    """Continuous features (b l s) from a spike train, all causal in the token axis.

    rate: moving average of the last ``window`` spikes (zeros before the start);
    temporal: exponential filter f[t] = a f[t-1] + (1-a) spk[t] with a = exp(-1/tau);
    potential: the membrane potential in units of the threshold.
    """
    if method == "rate":
        csum = spk.cumsum(dim=1)  # b l s
        lagged = F.pad(csum, (0, 0, window, 0))[:, : spk.shape[1]]  # b l s
        return (csum - lagged) / window
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


class SpikingPath(nn.Module):
    """input -> Linear -> LIF -> synapse (Linear) -> LIF -> features.

    ``synapse`` carries the weights STDP acts on: pre = first layer's spikes, post =
    second layer's spikes.
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

    def forward(self, h: torch.Tensor) -> SpikeTrace:
        c = self.cfg
        spk1, _ = lif(self.encoder(h), c.beta, c.spike_threshold, c.surrogate, c.surrogate_scale, c.lif_impl)
        spk2, mem2 = lif(self.synapse(spk1), c.beta, c.spike_threshold, c.surrogate, c.surrogate_scale, c.lif_impl)
        feats = spikes_to_features(
            spk2, mem2, c.spike_to_mamba_method, c.spike_rate_window, c.spike_temporal_tau, c.spike_threshold
        )
        return SpikeTrace(pre=spk1, post=spk2, membrane=mem2, features=feats)


__all__ = ["SpikeTrace", "SpikingPath", "spikes_to_features"]
