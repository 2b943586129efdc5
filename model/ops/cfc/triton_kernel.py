"""The CfC recurrence's GPU kernels: every token of a sequence in one Triton program.

``interface._CfCScan`` folds the default-mode, one-layer CfC step into

    a_t = tanh(zx'_t + m_{t-1} w_mt)      (b k)
    s_t = sigmoid(b' + a_t w_pt)          (b 3q)   ff1 | ff2 | time gate
    m_t = lerp(s_t1, s_t2, s_t3)          (b q)

(its docstring has the folding). ``cfc_forward`` and ``cfc_backward`` do what the torch loops
(``torch_loop``) and the numba kernels do, on the same time-major buffers (l b ...), so the
folding and the weight gradients, one product over every token after the backward kernel
(no atomics: the same sums in the same order on every run), are shared with them. Where the
torch loops launch five kernels a token forward and three backward, these launch one each
for the whole sequence.

The design is FlashRNN's fused Triton kernels (NX-AI, ``flashrnn/triton_fused``): a program
owns a tile of BLOCK_B = 16 batch rows (the least ``tl.dot`` takes) and walks the tokens;
the recurrent weights are loaded once, before the time loop, and the state stays on chip,
in fp32, from the first token to the last. The rows of the batch are independent
recurrences, so programs never wait on each other.

Supports (checked by ``supported``; elsewhere the caller falls back to the torch loops):

- fp32 buffers (the liquid layer runs its recurrence in fp32 whatever the autocast dtype);
- q and k up to ``MAX_UNITS`` (128: the phases' 64 and 128), padded to a power of two of at
  least 16. The four weight tiles are then 4 * 128 * 128 fp32, 256 KB a program: more than
  one program's registers, so the compiler keeps what fits and spills the rest to local
  memory, which stays in L1/L2 (on chip). ``tl.dot``'s operand conversion stages one tile of
  at most 64 KB through shared memory, within an RTX 4090's 100 KB and an H100's 228 KB;
- any batch (a program per 16 rows) and any length (buffers under 2**31 elements);
- products in full fp32 ("ieee") or TF32, as torch's ``float32_matmul_precision`` says.

Not yet measured on a GPU (no device has been lent): ``scripts/gpu-check`` times the phases
with these kernels and with the torch loops.

Shape letters: l length, b batch (BB rows a program), k backbone units (BK), q liquid units
(BQ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.ops import triton_support

BLOCK_B = 16
"""Batch rows a program: ``tl.dot`` takes operands of at least 16 x 16."""
MAX_UNITS = 128
"""The most liquid (q) or backbone (k) units the kernels take."""


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: exact at 0 and +-inf, within 1e-7 absolute elsewhere
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _forward(zx_ptr, h0_ptr, wh_ptr, wp_ptr, bp_ptr, y_ptr, last_ptr, acts_ptr, sigs_ptr, b, l, q, k,
             swh_k, swh_q, scale_in, scale_out,
             BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The CfC over the sequence from the unfolded arguments (zx (b l k), h0 (b q), w_h (k q),
    w_p (3q k), b_p (3q)), folding them as ``interface`` says on the way in: writes h (b l q),
    the last h (b q), and what the backward reads, a_t into acts (l b k) and s_t into sigs
    (l b 3q). Padded rows and columns read 0 and are never written."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB)
    cq = tl.arange(0, BLOCK_Q)
    ck = tl.arange(0, BLOCK_K)
    on_b, on_q, on_k = rows < b, cq < q, ck < k
    bq = on_b[:, None] & on_q[None, :]  # (BB BQ)
    bk = on_b[:, None] & on_k[None, :]  # (BB BK)
    kq = on_k[:, None] & on_q[None, :]
    # the folded weights, once: w_m = 2 i w_h^T (q k), the heads' (k q) times (2o, 2o, o)
    w_ht = tl.load(wh_ptr + ck[None, :] * swh_k + cq[:, None] * swh_q, mask=on_q[:, None] & on_k[None, :],
                   other=0.0)  # (BQ BK)
    w_m = w_ht * (2 * scale_in)
    w_h_rows = tl.sum(w_ht, axis=0)  # (BK): zx' = i (zx - w_h 1)
    heads = wp_ptr + cq[None, :] * k + ck[:, None]  # w_p's rows of one head, transposed: (BK BQ)
    w_1 = tl.load(heads, mask=kq, other=0.0) * (2 * scale_out)
    w_2 = tl.load(heads + q * k, mask=kq, other=0.0) * (2 * scale_out)
    w_3 = tl.load(heads + 2 * q * k, mask=kq, other=0.0) * scale_out
    b_1 = tl.load(bp_ptr + cq, mask=on_q, other=0.0) * 2
    b_2 = tl.load(bp_ptr + q + cq, mask=on_q, other=0.0) * 2
    b_3 = tl.load(bp_ptr + 2 * q + cq, mask=on_q, other=0.0)
    m = (tl.load(h0_ptr + rows[:, None] * q + cq[None, :], mask=bq, other=0.0) + 1) * 0.5  # (BB BQ)
    zx_at = zx_ptr + rows[:, None] * (l * k) + ck[None, :]
    y_at = y_ptr + rows[:, None] * (l * q) + cq[None, :]
    a_at = acts_ptr + rows[:, None] * k + ck[None, :]
    s_at = sigs_ptr + rows[:, None] * (3 * q) + cq[None, :]
    for t in range(l):
        zx_t = (tl.load(zx_at + t * k, mask=bk, other=0.0) - w_h_rows[None, :]) * scale_in
        a = _tanh(zx_t + tl.dot(m, w_m, input_precision=PRECISION))  # (BB BK)
        tl.store(a_at + t * b * k, a, mask=bk)
        s_t = s_at + t * b * 3 * q
        s1 = tl.sigmoid(b_1[None, :] + tl.dot(a, w_1, input_precision=PRECISION))
        s2 = tl.sigmoid(b_2[None, :] + tl.dot(a, w_2, input_precision=PRECISION))
        s3 = tl.sigmoid(b_3[None, :] + tl.dot(a, w_3, input_precision=PRECISION))
        tl.store(s_t, s1, mask=bq)
        tl.store(s_t + q, s2, mask=bq)
        tl.store(s_t + 2 * q, s3, mask=bq)
        m = s1 + s3 * (s2 - s1)  # lerp(s1, s2, s3)
        tl.store(y_at + t * q, m * 2 - 1, mask=bq)
    tl.store(last_ptr + rows[:, None] * q + cq[None, :], m * 2 - 1, mask=bq)


@triton.jit
def _backward(gy_ptr, gh_ptr, wh_ptr, wp_ptr, acts_ptr, sigs_ptr, dzx_ptr, dp_ptr, dh0_ptr, b, l, q, k,
              swh_k, swh_q, sgy_b, sgy_t, sgy_q, scale_in, scale_out, HAS_GH: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The reverse loop from the upstream gy (b l q) and gh (b q): writes dL/dzx (b l k),
    dL/dp_t times each head's factor (2, 2, 1) into dp (l b 3q), what the weights' gradients
    are batched from, and dL/dh0 (b q)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cq = tl.arange(0, BLOCK_Q)
    ck = tl.arange(0, BLOCK_K)
    on_b, on_q, on_k = rows < b, cq < q, ck < k
    bq = on_b[:, None] & on_q[None, :]
    bk = on_b[:, None] & on_k[None, :]
    qk = on_q[:, None] & on_k[None, :]
    # the folded heads (q k) each, and w_m^T = 2 i w_h (k q)
    heads = wp_ptr + cq[:, None] * k + ck[None, :]
    w_1 = tl.load(heads, mask=qk, other=0.0) * (2 * scale_out)
    w_2 = tl.load(heads + q * k, mask=qk, other=0.0) * (2 * scale_out)
    w_3 = tl.load(heads + 2 * q * k, mask=qk, other=0.0) * scale_out
    w_m = tl.load(wh_ptr + ck[:, None] * swh_k + cq[None, :] * swh_q, mask=on_k[:, None] & on_q[None, :],
                  other=0.0) * (2 * scale_in)  # (BK BQ)
    gy_at = gy_ptr + rows[:, None] * sgy_b + cq[None, :] * sgy_q
    s_at = sigs_ptr + rows[:, None] * (3 * q) + cq[None, :]
    dp_at = dp_ptr + rows[:, None] * (3 * q) + cq[None, :]
    a_at = acts_ptr + rows[:, None] * k + ck[None, :]
    dzx_at = dzx_ptr + rows[:, None] * (l * k) + ck[None, :]
    carry = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)  # dL/dm_t through m_{t+1}
    if HAS_GH:  # dL/dm of the last token from the last h: h = 2 m - 1
        carry += 2 * tl.load(gh_ptr + rows[:, None] * q + cq[None, :], mask=bq, other=0.0)
    for back in range(l):
        t = l - 1 - back
        gm = 2 * tl.load(gy_at + t * sgy_t, mask=bq, other=0.0) + carry
        s_t = s_at + t * b * 3 * q
        s1 = tl.load(s_t, mask=bq, other=0.0)
        s2 = tl.load(s_t + q, mask=bq, other=0.0)
        gate = tl.load(s_t + 2 * q, mask=bq, other=0.0)
        # lerp's partials times sigmoid's
        dp1 = (1.0 - gate) * s1 * (1.0 - s1) * gm
        dp2 = gate * s2 * (1.0 - s2) * gm
        dp3 = (s2 - s1) * gate * (1.0 - gate) * gm
        dp_t = dp_at + t * b * 3 * q
        tl.store(dp_t, dp1 * 2, mask=bq)
        tl.store(dp_t + q, dp2 * 2, mask=bq)
        tl.store(dp_t + 2 * q, dp3, mask=bq)
        a = tl.load(a_at + t * b * k, mask=bk, other=0.0)
        dz = tl.dot(dp1, w_1, input_precision=PRECISION)
        dz += tl.dot(dp2, w_2, input_precision=PRECISION)
        dz += tl.dot(dp3, w_3, input_precision=PRECISION)
        dz = dz * (1.0 - a * a)  # (BB BK): dL/dzx'_t
        tl.store(dzx_at + t * k, dz * scale_in, mask=bk)
        carry = tl.dot(dz, w_m, input_precision=PRECISION)  # (BB BQ)
    tl.store(dh0_ptr + rows[:, None] * q + cq[None, :], carry * 0.5, mask=bq)


def supported(q: int, k: int, dtype: torch.dtype) -> str | None:
    """Why the kernels do not take this scan, or None when they do."""
    if dtype != torch.float32:
        return f"the Triton CfC kernels compute in float32, got {dtype}"
    if max(q, k) > MAX_UNITS:
        return (f"the Triton CfC kernels take at most {MAX_UNITS} liquid and backbone units "
                f"(their weights stay on chip), got --liquid-units {q}, --liquid-backbone-units {k}")
    return None


def _launch(kernel, b: int, q: int, k: int, *args, **constants) -> None:
    block_q, block_k = (triton_support.next_power_of_2(n, 16) for n in (q, k))
    kernel[(triton.cdiv(b, BLOCK_B),)](*args, **constants, BLOCK_B=BLOCK_B, BLOCK_Q=block_q, BLOCK_K=block_k,
                                        PRECISION=triton_support.dot_precision(),
                                        num_warps=8 if max(block_q, block_k) > 64 else 4, num_stages=1)


def cfc_scan_forward(zx: Tensor, h0: Tensor, w_h: Tensor, w_p: Tensor, b_p: Tensor, scale_in: float,
                     scale_out: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``interface``'s op body, one launch: (h (b l q), last h (b q), acts (l b k), sigs
    (l b 3q)) from zx (b l k), h0 (b q), w_h (k q), w_p (3q k), b_p (3q), fp32, ``supported``.
    w_h is read through its strides (the liquid layer's is a slice of the backbone's weight)."""
    zx, h0, w_p, b_p = (x.contiguous() for x in (zx, h0, w_p, b_p))
    b, l, k = zx.shape
    q = h0.shape[1]
    y, last = zx.new_empty(b, l, q), h0.new_empty(b, q)
    acts, sigs = zx.new_empty(l, b, k), zx.new_empty(l, b, 3 * q)
    if l == 0:
        return y, h0.clone(), acts, sigs
    _launch(_forward, b, q, k, zx, h0, w_h, w_p, b_p, y, last, acts, sigs, b, l, q, k, *w_h.stride(), scale_in,
            scale_out)
    return y, last, acts, sigs


def cfc_scan_backward(gy: Tensor | None, gh: Tensor | None, h0: Tensor, w_h: Tensor, w_p: Tensor, y: Tensor,
                      acts: Tensor, sigs: Tensor, scale_in: float, scale_out: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's backward, one launch and three products: gradients of zx (b l k), h0 (b q),
    w_h (k q), w_p (3q k) and b_p (3q). The weights' gradients are products over every token
    after the kernel (one GEMM each: no atomics, the same sums on every run). gy and w_h are
    read through their strides."""
    l, b, k = acts.shape
    q = h0.shape[1]
    h0, w_p = h0.contiguous(), w_p.contiguous()
    gy = y.new_zeros(b, l, q) if gy is None else gy
    d_zx, dp = acts.new_empty(b, l, k), acts.new_empty(l, b, 3 * q)
    d_h0 = torch.empty_like(h0)
    _launch(_backward, b, q, k, gy, h0 if gh is None else gh.contiguous(), w_h, w_p, acts, sigs, d_zx, dp, d_h0,
            b, l, q, k, *w_h.stride(), *gy.stride(), scale_in, scale_out, HAS_GH=gh is not None)
    h_prev = torch.cat([h0.unsqueeze(1), y[:, :-1]], 1).view(b * l, q)  # (bl q)
    d_wh = d_zx.view(b * l, k).t() @ h_prev  # (k q): i dz^T (2 m_prev - 1), the i in d_zx
    dp = dp.view(l * b, 3 * q)  # each head's factor in already
    # (3q k), scaled in the product's epilogue (beta 0: the uninitialised input is never read)
    d_wp = torch.addmm(w_p.new_empty(w_p.shape), dp.t(), acts.view(l * b, k), beta=0, alpha=scale_out)
    return d_zx, d_h0, d_wh, d_wp, dp.sum(0)
