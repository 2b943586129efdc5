"""Spike-timing-dependent plasticity rules for the synapses between a block's two LIF
layers (``SpikingPath.synapse``): pre = first layer's spikes, post = second layer's.

Each rule maps the spike trains of one batch to a weight change dW (i j) for the synapse
weight W (i j), post-synaptic i receiving from pre-synaptic j. Traces are causal
exponential filters, computed for every token at once with ``model.ops.discounted_cumsum``;
updates are batched einsums. There are no loops over time lags. Every function also takes
spike trains with leading dimensions (``...``, the blocks of a model, say) and returns one
change per leading index, so all blocks' changes are the same few ops, not a few a block.
The caller scales dW by a learning rate and applies it through the stability guard; nothing
here clamps weights, which keep their sign freedom.

Shapes: ... leading (blocks), b batch, l length, i post-synaptic units, j pre-synaptic units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.ops.discounted_cumsum import discounted_cumsum

RULES = ("classical", "triplet", "homeostatic", "bcm")

# Triplet amplitudes, normalised so the pair depression A2- is 1 (Pfister & Gerstner
# 2006 fit the ratios to cortex; the learning rate sets the overall scale).
A2_PLUS, A3_PLUS, A2_MINUS, A3_MINUS = 1.0, 1.0, 1.0, 0.0
SLOW_TRACE = 4.0  # the triplet rule's slow traces decay this many times slower
BCM_THETA_EMA = 0.1  # how fast the BCM threshold slides


def trace(spikes: torch.Tensor, tau: float) -> torch.Tensor:
    """x[t] = exp(-1/tau) x[t-1] + spikes[t]: includes the spike at t (... b l n)."""
    l, n = spikes.shape[-2:]
    return discounted_cumsum(spikes.reshape(-1, l, n), math.exp(-1.0 / tau)).reshape(spikes.shape)


def before(x: torch.Tensor, tau: float) -> torch.Tensor:
    """The trace ``x`` (time constant ``tau``) just before token t: exp(-1/tau) x[t-1],
    zero at t=0, so a spike at s < t contributes exp(-(t-s)/tau), as in ``trace`` (... b l n)."""
    return math.exp(-1.0 / tau) * F.pad(x, (0, 0, 1, 0))[..., :-1, :]


def _outer(post_side: torch.Tensor, pre_side: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of post_side[i] * pre_side[j] (... i j)."""
    b, l, _ = post_side.shape[-3:]
    return torch.einsum("...bli,...blj->...ij", post_side, pre_side) / (b * l)


def classical(pre: torch.Tensor, post: torch.Tensor, tau_plus: float, tau_minus: float) -> torch.Tensor:
    """Pair-based STDP with exponential windows. A post spike at t potentiates by the
    trace of pre spikes at or before t (a pre spike drives its post at the same token);
    a pre spike at t depresses by the trace of post spikes strictly before t."""
    ltp = _outer(post, trace(pre, tau_plus))
    ltd = _outer(before(trace(post, tau_minus), tau_minus), pre)
    return ltp - ltd


def triplet(pre: torch.Tensor, post: torch.Tensor, tau_plus: float, tau_minus: float) -> torch.Tensor:
    """Pfister & Gerstner (2006) all-to-all triplet rule: fast traces r1 (pre) and o1
    (post) as in the pair rule, slow traces r2 (pre) and o2 (post). Potentiation at a
    post spike grows with the post neuron's own earlier spikes (o2); depression at a pre
    spike with the pre neuron's earlier spikes (r2)."""
    tau_x, tau_y = SLOW_TRACE * tau_plus, SLOW_TRACE * tau_minus
    r1 = trace(pre, tau_plus)
    o1 = before(trace(post, tau_minus), tau_minus)
    r2 = before(trace(pre, tau_x), tau_x)
    o2 = before(trace(post, tau_y), tau_y)
    ltp = _outer(post * (A2_PLUS + A3_PLUS * o2), r1)
    ltd = _outer(o1, pre * (A2_MINUS + A3_MINUS * r2))
    return ltp - ltd


def homeostatic(pre: torch.Tensor, post: torch.Tensor, tau_plus: float, tau_minus: float,
                target_rate: float) -> torch.Tensor:
    """Pair-based STDP plus synaptic scaling toward a target rate: a post neuron firing
    below the target strengthens its inputs from active pre neurons, one above it
    weakens them, in proportion to the rate error and the pre rate."""
    post_rate = post.mean(dim=(-3, -2))  # ... i
    pre_rate = pre.mean(dim=(-3, -2))  # ... j
    return classical(pre, post, tau_plus, tau_minus) + (target_rate - post_rate).unsqueeze(-1) * pre_rate.unsqueeze(-2)


def bcm(pre: torch.Tensor, post: torch.Tensor, tau_plus: float, tau_minus: float, target_rate: float,
        theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCM with a sliding threshold: dW = y (y - theta) x, with y and x the filtered post
    and pre rates. Post activity above theta potentiates, below it depresses; theta
    slides toward E[y^2] / target_rate, so a neuron that fires a lot raises its own bar.
    Returns (dW, the new theta (... i))."""
    a_post, a_pre = math.exp(-1.0 / tau_minus), math.exp(-1.0 / tau_plus)
    y = (1 - a_post) * trace(post, tau_minus)  # ... b l i, a rate in spikes per token
    x = (1 - a_pre) * trace(pre, tau_plus)  # ... b l j
    dw = _outer(y * (y - theta[..., None, None, :]), x)
    new_theta = (1 - BCM_THETA_EMA) * theta + BCM_THETA_EMA * y.square().mean(dim=(-3, -2)) / target_rate
    return dw, new_theta


def stdp_update(rule: str, pre: torch.Tensor, post: torch.Tensor, tau_plus: float, tau_minus: float,
                target_rate: float, theta: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight change of ``rule`` for one batch, and the rule's new state (BCM's theta)."""
    pre, post = pre.float(), post.float()
    if rule == "classical":
        return classical(pre, post, tau_plus, tau_minus), theta
    if rule == "triplet":
        return triplet(pre, post, tau_plus, tau_minus), theta
    if rule == "homeostatic":
        return homeostatic(pre, post, tau_plus, tau_minus, target_rate), theta
    if rule == "bcm":
        if theta is None:
            theta = torch.full((*post.shape[:-3], post.shape[-1]), target_rate, device=post.device)
        return bcm(pre, post, tau_plus, tau_minus, target_rate, theta)
    raise ValueError(f"unknown --stdp-type {rule!r}; valid: {', '.join(RULES)}")
