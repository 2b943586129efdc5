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
def _forward(m0_ptr, w_mt_ptr, w_pt_ptr, acts_ptr, sigs_ptr, m_all_ptr, b, l, q, k,
             BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acts (l b k) holds zx' and sigs (l b 3q) the bias on entry; on return acts holds a_t,
    sigs s_t and m_all (l b q) m_t. Padded rows and columns read 0 and are never written."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB)
    cq = tl.arange(0, BLOCK_Q)
    ck = tl.arange(0, BLOCK_K)
    on_b, on_q, on_k = rows < b, cq < q, ck < k
    bq = on_b[:, None] & on_q[None, :]  # (BB BQ)
    bk = on_b[:, None] & on_k[None, :]  # (BB BK)
    # the recurrent weights, once: w_m (q k), and w_p's three heads (k q) each
    w_m = tl.load(w_mt_ptr + cq[:, None] * k + ck[None, :], mask=on_q[:, None] & on_k[None, :], other=0.0)
    heads = w_pt_ptr + ck[:, None] * (3 * q) + cq[None, :]
    kq = on_k[:, None] & on_q[None, :]
    w_1 = tl.load(heads, mask=kq, other=0.0)
    w_2 = tl.load(heads + q, mask=kq, other=0.0)
    w_3 = tl.load(heads + 2 * q, mask=kq, other=0.0)
    m = tl.load(m0_ptr + rows[:, None] * q + cq[None, :], mask=bq, other=0.0)  # (BB BQ), fp32
    a_at = acts_ptr + rows[:, None] * k + ck[None, :]
    s_at = sigs_ptr + rows[:, None] * (3 * q) + cq[None, :]
    m_at = m_all_ptr + rows[:, None] * q + cq[None, :]
    for t in range(l):
        a_t = a_at + t * b * k
        a = _tanh(tl.load(a_t, mask=bk, other=0.0) + tl.dot(m, w_m, input_precision=PRECISION))  # (BB BK)
        tl.store(a_t, a, mask=bk)
        s_t = s_at + t * b * 3 * q
        s1 = tl.sigmoid(tl.load(s_t, mask=bq, other=0.0) + tl.dot(a, w_1, input_precision=PRECISION))
        s2 = tl.sigmoid(tl.load(s_t + q, mask=bq, other=0.0) + tl.dot(a, w_2, input_precision=PRECISION))
        s3 = tl.sigmoid(tl.load(s_t + 2 * q, mask=bq, other=0.0) + tl.dot(a, w_3, input_precision=PRECISION))
        tl.store(s_t, s1, mask=bq)
        tl.store(s_t + q, s2, mask=bq)
        tl.store(s_t + 2 * q, s3, mask=bq)
        m = s1 + s3 * (s2 - s1)  # lerp(s1, s2, s3)
        tl.store(m_at + t * b * q, m, mask=bq)


@triton.jit
def _backward(w_p_ptr, w_m_ptr, acts_ptr, sigs_ptr, gms_ptr, dp_ptr, dz_ptr, b, l, q, k,
              BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """gms (l b q) holds dL/dm_t from the outputs on entry, and is completed with the carry
    from m_{t+1}; writes dL/dp_t into dp (l b 3q) and dL/d(zx'_t) into dz (l b k)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cq = tl.arange(0, BLOCK_Q)
    ck = tl.arange(0, BLOCK_K)
    on_b, on_q, on_k = rows < b, cq < q, ck < k
    bq = on_b[:, None] & on_q[None, :]
    bk = on_b[:, None] & on_k[None, :]
    qk = on_q[:, None] & on_k[None, :]
    # w_p (3q k): its three heads (q k) each; w_m (k q)
    heads = w_p_ptr + cq[:, None] * k + ck[None, :]
    w_1 = tl.load(heads, mask=qk, other=0.0)
    w_2 = tl.load(heads + q * k, mask=qk, other=0.0)
    w_3 = tl.load(heads + 2 * q * k, mask=qk, other=0.0)
    w_m = tl.load(w_m_ptr + ck[:, None] * q + cq[None, :], mask=on_k[:, None] & on_q[None, :], other=0.0)
    g_at = gms_ptr + rows[:, None] * q + cq[None, :]
    s_at = sigs_ptr + rows[:, None] * (3 * q) + cq[None, :]
    dp_at = dp_ptr + rows[:, None] * (3 * q) + cq[None, :]
    a_at = acts_ptr + rows[:, None] * k + ck[None, :]
    dz_at = dz_ptr + rows[:, None] * k + ck[None, :]
    carry = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)  # dL/dm_t through m_{t+1}
    for back in range(l):
        t = l - 1 - back
        g_t = g_at + t * b * q
        gm = tl.load(g_t, mask=bq, other=0.0) + carry
        tl.store(g_t, gm, mask=bq)
        s_t = s_at + t * b * 3 * q
        s1 = tl.load(s_t, mask=bq, other=0.0)
        s2 = tl.load(s_t + q, mask=bq, other=0.0)
        gate = tl.load(s_t + 2 * q, mask=bq, other=0.0)
        # lerp's partials times sigmoid's
        dp1 = (1.0 - gate) * s1 * (1.0 - s1) * gm
        dp2 = gate * s2 * (1.0 - s2) * gm
        dp3 = (s2 - s1) * gate * (1.0 - gate) * gm
        dp_t = dp_at + t * b * 3 * q
        tl.store(dp_t, dp1, mask=bq)
        tl.store(dp_t + q, dp2, mask=bq)
        tl.store(dp_t + 2 * q, dp3, mask=bq)
        a = tl.load(a_at + t * b * k, mask=bk, other=0.0)
        dz = tl.dot(dp1, w_1, input_precision=PRECISION)
        dz += tl.dot(dp2, w_2, input_precision=PRECISION)
        dz += tl.dot(dp3, w_3, input_precision=PRECISION)
        dz = dz * (1.0 - a * a)  # (BB BK)
        tl.store(dz_at + t * b * k, dz, mask=bk)
        carry = tl.dot(dz, w_m, input_precision=PRECISION)  # (BB BQ)


def supported(q: int, k: int, dtype: torch.dtype) -> str | None:
    """Why the kernels do not take this scan, or None when they do."""
    if dtype != torch.float32:
        return f"the Triton CfC kernels compute in float32, got {dtype}"
    if max(q, k) > MAX_UNITS:
        return (f"the Triton CfC kernels take at most {MAX_UNITS} liquid and backbone units "
                f"(their weights stay on chip), got --liquid-units {q}, --liquid-backbone-units {k}")
    return None


def _launch(kernel, b: int, q: int, k: int, *args) -> None:
    block_q, block_k = (triton_support.next_power_of_2(n, 16) for n in (q, k))
    kernel[(triton.cdiv(b, BLOCK_B),)](*args, BLOCK_B=BLOCK_B, BLOCK_Q=block_q, BLOCK_K=block_k,
                                        PRECISION=triton_support.dot_precision(),
                                        num_warps=8 if max(block_q, block_k) > 64 else 4, num_stages=1)


def cfc_forward(m0: Tensor, w_mt: Tensor, w_pt: Tensor, acts: Tensor, sigs: Tensor, m_all: Tensor) -> None:
    """The forward loop of ``interface._CfCScan``, in place, one launch: m0 (b q), w_mt (q k),
    w_pt (k 3q), and the contiguous time-major buffers acts (l b k) = zx', sigs (l b 3q) =
    bias, m_all (l b q); all fp32, ``supported``."""
    l, b, k = acts.shape
    q = m0.shape[1]
    _launch(_forward, b, q, k, m0.contiguous(), w_mt, w_pt, acts, sigs, m_all, b, l, q, k)


def cfc_backward(w_p: Tensor, w_m: Tensor, acts: Tensor, sigs: Tensor, gms: Tensor, dp_all: Tensor,
                 dz_all: Tensor) -> None:
    """The backward loop of ``interface._CfCScan``, in place, one launch: w_p (3q k), w_m
    (k q), the saved acts (l b k) and sigs (l b 3q), gms (l b q) = dL/dm_t from the outputs;
    fills dp_all (l b 3q) and dz_all (l b k) and completes gms."""
    l, b, k = acts.shape
    q = gms.shape[2]
    _launch(_backward, b, q, k, w_p, w_m, acts, sigs, gms, dp_all, dz_all, b, l, q, k)
