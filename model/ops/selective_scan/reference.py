"""The selective scan's oracle, straight from the equation, and the checks and the fp32
prologue and epilogue every implementation shares.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t      (per channel e, state n)
    y_t = <x_t, C_t> + D * u_t,      out_t = y_t * silu(z_t)

Arguments, shapes and semantics follow mamba-ssm's ``selective_scan_ref`` (real A only).
Shape letters as in ``model.ops.selective_scan``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ScanResult = Tensor | tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------
# Shared checks and the fp32 prologue/epilogue
# ---------------------------------------------------------------------------------------


def check_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
) -> None:
    """Raise a ValueError naming the shapes when the arguments do not fit together."""
    if A.is_complex():
        raise ValueError(
            "complex A is not supported by this selective scan; pass a real A (e n), "
            "as Mamba's S4D-real initialisation does"
        )
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(
            f"expected u and delta (b e l) and A (e n) with the same e; got u {tuple(u.shape)}, "
            f"delta {tuple(delta.shape)}, A {tuple(A.shape)}"
        )
    (b, e, l), n = u.shape, A.shape[1]
    if l < 1:
        raise ValueError(f"the sequence is empty: u {tuple(u.shape)} has length l = 0")
    for name, t in (("B", B), ("C", C)):
        ok = (
            (t.dim() == 2 and tuple(t.shape) == (e, n))
            or (t.dim() == 3 and tuple(t.shape) == (b, n, l))
            or (t.dim() == 4 and tuple(t.shape) == (b, t.shape[1], n, l) and t.shape[1] > 0
                and e % t.shape[1] == 0)
        )
        if not ok:
            raise ValueError(
                f"{name} {tuple(t.shape)} fits none of (e n)={(e, n)}, (b n l)={(b, n, l)} "
                f"or (b g n l) with e={e} divisible by g"
            )
    for name, t, shape in (("D", D, (e,)), ("z", z, (b, e, l)), ("delta_bias", delta_bias, (e,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for u {tuple(u.shape)}, got {tuple(t.shape)}")


def compute_dtype(u: Tensor) -> torch.dtype:
    """fp32 for fp32 and below, fp64 for fp64."""
    return torch.promote_types(u.dtype, torch.float32)


def discretize_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def skip_and_gate(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_out: torch.dtype
) -> Tensor:
    """out = (y + D u) * silu(z), cast to the input dtype; y and u in the compute dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


# ---------------------------------------------------------------------------------------
# Reference: the test oracle, straight from the equation
# ---------------------------------------------------------------------------------------


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Sequential selective scan, as mamba-ssm's ``selective_scan_ref``; the oracle."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, compute_dtype(u)
    e = u.shape[1]
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Grouped B/C: each group's matrix is shared by its e/g channels.
    if B.dim() == 4:
        B = B.repeat_interleave(e // B.shape[1], dim=1)  # (b e n l)
    if C.dim() == 4:
        C = C.repeat_interleave(e // C.shape[1], dim=1)  # (b e n l)
    B, C = B.to(dtype), C.to(dtype)

    deltaA = torch.exp(torch.einsum("bel,en->beln", delta, A))  # (b e l n)
    if B.dim() == 2:
        deltaB_u = torch.einsum("bel,en,bel->beln", delta, B, u)  # (b e l n)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bel,bnl,bel->beln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bel,benl,bel->beln", delta, B, u)
    C_steps = [C] * u.shape[2] if C.dim() == 2 else C.unbind(-1)  # each (e n), (b n) or (b e n)

    x = u.new_zeros(u.shape[0], e, A.shape[1])  # (b e n)
    ys = []
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_steps):
        x = dA_t * x + dBu_t
        if C.dim() == 3:  # variable: one (b n) C_t for all channels
            ys.append(torch.einsum("ben,bn->be", x, C_t))
        else:  # constant (e n) or per channel (b e n)
            ys.append((x * C_t).sum(-1))
    y = torch.stack(ys, dim=2)  # (b e l)
    out = y if D is None else y + u * D.to(dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(dtype))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out
