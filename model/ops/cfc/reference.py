"""The oracle of the fused CfC scan: the default-mode, one-layer CfC recurrence of
``model.liquid.CfCCell`` (ncps' formulation), straight from the equations, in plain autograd.

Shape letters: b batch, l length, k backbone units, q liquid units.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cfc_scan_ref(
    zx: Tensor, h0: Tensor, w_h: Tensor, w_p: Tensor, b_p: Tensor, scale_in: float = 1.0, scale_out: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The default-mode, one-layer CfC recurrence, straight from the equations:

        a_t = scale_out * tanh(scale_in * (zx_t + h_{t-1} w_h^T))    (b k)
        p_t = a_t w_p^T + b_p                                         (b 3q)  ff1 | ff2 | gate
        h_t = lerp(tanh(p_t1), tanh(p_t2), sigmoid(p_t3))             (b q)

    zx (b l k) is the input half of the backbone, x w_x^T + b, for every token; the gate's
    head is ts * time_a + time_b. Returns (h for every token (b l q), last h (b q)).
    """
    h, hs = h0, []
    for zx_t in zx.unbind(1):
        a = scale_out * torch.tanh(scale_in * (zx_t + h @ w_h.t()))  # (b k)
        p1, p2, p3 = (a @ w_p.t() + b_p).chunk(3, 1)  # (b q) each
        h = torch.tanh(p1) * (1 - torch.sigmoid(p3)) + torch.sigmoid(p3) * torch.tanh(p2)  # (b q)
        hs.append(h)
    return torch.stack(hs, 1), h
