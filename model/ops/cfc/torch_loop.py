"""The fused CfC scan's per-token loops as torch kernels, on any device: the fallback where
neither the numba kernel (CPU) nor the Triton kernel (CUDA) runs, and the loops the two
kernels were written from. Five kernels a token forward, three backward.

Shape letters: l length, b batch, k backbone units, q liquid units.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cfc_forward(m0: Tensor, w_mt: Tensor, w_pt: Tensor, acts: Tensor, sigs: Tensor, m_all: Tensor) -> None:
    """``interface._CfCScan``'s forward loop as torch kernels, in place, with the kernels'
    arguments: acts (l b k) holds zx' and sigs (l b 3q) the bias on entry, each token's
    products accumulate into its slot (addmm_, beta = 1: five kernels a token and no copy
    inside them, where addmm(..., out=) copies its summand first)."""
    l, b, q = m_all.shape
    heads = [x.unbind(0) for x in sigs.view(l, b, 3, q).unbind(2)]  # 3 x l x (b q)
    m = m0
    for a, s, f1, f2, gate, m_t in zip(acts.unbind(0), sigs.unbind(0), *heads, m_all.unbind(0)):
        a.addmm_(m, w_mt).tanh_()  # (b k)
        s.addmm_(a, w_pt).sigmoid_()  # (b 3q)
        m = torch.lerp(f1, f2, gate, out=m_t)  # (b q)


def cfc_backward(w_p: Tensor, w_m: Tensor, acts: Tensor, sigs: Tensor, gms: Tensor, dp_all: Tensor,
                 dz_all: Tensor) -> None:
    """``interface._CfCScan``'s backward loop as torch kernels, in place, with the kernels'
    arguments. The local derivatives are batched over tokens first; per token, the gradients
    go straight into their slot of one buffer (out=), and the carry into dL/dm_{t-1}'s slot
    (addmm_), so each slot is the whole dL/dm_t when its token's turn comes."""
    l, b, q = gms.shape
    s1, s2, g = sigs.chunk(3, 2)  # (l b q) each
    # d m_t / d p_t for every token at once: lerp's partials times sigmoid's.
    coef = torch.stack([1 - g, g, s2 - s1], 2) * (sigs * (1 - sigs)).view(l, b, 3, q)  # (l b 3 q)
    dtanh = 1 - acts * acts  # (l b k)
    steps = zip(
        reversed(coef.unbind(0)), reversed(dtanh.unbind(0)), reversed(gms.view(l, b, 1, q).unbind(0)),
        reversed((None, *gms.unbind(0)[:-1])),
        reversed(dp_all.view(l, b, 3, q).unbind(0)), reversed(dp_all.unbind(0)), reversed(dz_all.unbind(0)),
    )
    for coef_t, dtanh_t, gm3, gm_prev, dp3, dp, dz in steps:
        torch.mul(coef_t, gm3, out=dp3)  # (b 3 q)
        torch.mm(dp, w_p, out=dz).mul_(dtanh_t)  # (b k)
        if gm_prev is not None:
            gm_prev.addmm_(dz, w_m)  # completes dL/dm_{t-1}
