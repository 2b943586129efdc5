"""The language-model loss from the final hidden states: the LM head and the cross-entropy
together, a chunk of tokens at a time, so the (tokens x vocabulary) logits never exist whole.

``linear_cross_entropy_ref`` is the plain path, ``F.cross_entropy(F.linear(h, w).float(),
y)``: it materialises the logits (fp32), their log-softmax, which autograd keeps for the
backward, and then the logits' gradient, three (n v) tensors (b8 l256 v8192: 64 MB each,
and at a 200k vocabulary 1.6 GB each). ``linear_cross_entropy`` computes the same mean and
its gradients chunk by chunk in the forward (the way Liger-Kernel's fused linear
cross-entropy and Apple's Cut Cross-Entropy avoid the logits): per chunk of rows it forms the
chunk's logits, its loss, softmax minus one-hot, and from that the chunk's gradient of h and
its share of the gradient of w; the backward only scales the two by the incoming gradient.
What it keeps is one chunk's logits at a time, the gradient of h (n d) and of w (v d).
The products are the plain path's three, the same FLOPs; the logits' elementwise work runs
on a chunk that stays in cache instead of on fresh (n v) tensors.

Shapes: n tokens (batch x length, flattened), d hidden, v vocabulary, r rows per chunk.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# Logits per chunk, by device. The CPU's 2M (8 MB in fp32) stay in its caches; on CUDA every
# op of a chunk is a kernel launch, and 16M (64 MB) makes phase 4's 16.7M logits two chunks,
# not eight. At least 128 rows, so a large vocabulary still gets products of a useful height.
_CHUNK_LOGITS = {"cpu": 2**21, "cuda": 2**24}
_MIN_ROWS = 128


def chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk for a vocabulary of ``vocab`` on a ``device_type`` device."""
    return max(_MIN_ROWS, _CHUNK_LOGITS.get(device_type, _CHUNK_LOGITS["cpu"]) // max(vocab, 1))


def linear_cross_entropy_ref(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of the logits ``h weight^T`` (fp32) against ``targets``, targets of
    ``ignore_index`` left out: h (n d), weight (v d), targets (n) -> ()."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)


def logits_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of whole logits (b l v) against targets (b l), in fp32,
    targets of -100 left out: the plain path where the logits exist anyway."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def argmax_hits(logits: Tensor, targets: Tensor) -> Tensor:
    """Targets (b l) that are the argmax of their logits (b l v), -100 left out: () int64."""
    return ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The products' dtype: autocast's where it is on (as ``F.linear`` would run), else the
    wider of the two inputs'."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, rows: int,  # type: ignore[override]
                need_grad: bool, count_hits: bool):
        dt = _compute_dtype(h, weight)
        acc = torch.promote_types(dt, torch.float32)  # the gradients' sums: fp32, or fp64 for fp64 inputs
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dt), weight.to(dt)
            valid = targets != ignore_index
            count = valid.sum()
            # each row's weight in the mean: 1 / count, 0 for an ignored row
            share = (valid / count).unsqueeze(1)  # (n 1)
            picks = targets.masked_fill(~valid, 0).unsqueeze(1)  # (n 1)
            # the loss and grad_w start as their first chunk's sums, not as zeros added to (on
            # CUDA, where the phases' losses are one chunk, each zero fill is a launch); split
            # gives at least one chunk, an empty one for no rows
            total, first = None, True
            hits = torch.zeros((), dtype=torch.int64, device=h.device)
            grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_grad else None
            grad_w = torch.empty(weight.shape, dtype=acc, device=h.device) if need_grad and dt == acc else None
            chunks = zip(hc.split(rows), picks.split(rows), share.split(rows), valid.split(rows),
                         grad_h.split(rows) if need_grad else itertools.repeat(None))
            for h_r, pick, w_r, valid_r, grad_h_r in chunks:
                logits = torch.mm(h_r, wc.t()).float()  # (r v)
                if count_hits:  # targets that are their row's argmax (first of ties, as argmax)
                    hits += ((logits.argmax(1, keepdim=True) == pick).squeeze(1) & valid_r).sum()
                if not need_grad:
                    nll = -torch.where(valid_r, logits.log_softmax(1).gather(1, pick).squeeze(1), 0.0).sum()
                    total = nll if first else total.add_(nll)
                    first = False
                    continue
                # softmax, not exp of the log-softmax: torch's CPU exp is ~35x slower where its
                # result is subnormal (inputs below about -87), which a trained model's logits
                # reach. The loss needs no log-softmax pass either: a row's largest
                # probability is exp(0) / sum = 1 / sum, so logsumexp = max - log(max p) and the
                # row's loss is logsumexp - its target's logit (two reductions and a gather).
                p = logits.softmax(1)  # (r v)
                lse = logits.amax(1) - p.amax(1).log()  # (r)
                chunk = torch.where(valid_r, lse - logits.gather(1, pick).squeeze(1), 0.0).sum()
                total = chunk if first else total.add_(chunk)
                del logits
                # d loss / d logits = share * (softmax - one-hot), the share applied to the
                # (r d) sides of the two products rather than to the (r v) chunk.
                g = p.scatter_(1, pick, -1.0, reduce="add").to(dt)  # (r v)
                del p
                if dt == acc:  # straight into the buffers
                    torch.mm(g, wc, out=grad_h_r).mul_(w_r)  # (r d)
                    if first:
                        torch.mm(g.t(), h_r * w_r, out=grad_w)  # (v d)
                    else:
                        grad_w.addmm_(g.t(), h_r * w_r)
                else:  # products in dt (bf16, fp16), as F.linear's backward would run them; sums in fp32
                    grad_h_r.copy_(torch.mm(g, wc)).mul_(w_r)
                    product = torch.mm(g.t(), h_r * w_r.to(dt))
                    grad_w = product.float() if first else grad_w.add_(product.float())
                first = False
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(hits)
        return total / count, hits  # no valid row: 0 / 0 = NaN, as F.cross_entropy's mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_hits):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_loss).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         rows: int | None = None, return_hits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_cross_entropy_ref`` without the whole logits: h (n d), weight (v d), targets
    (n) -> the mean loss (), in fp32; ``rows`` per chunk (default ``chunk_rows`` of v on h's
    device). With ``return_hits`` also the number of counted targets that are their row's
    argmax (int64, for accuracy; one more pass over each chunk). Not twice differentiable.
    No host synchronisation: the chunks follow from the shapes."""
    if h.dim() != 2 or weight.dim() != 2 or targets.shape != h.shape[:1] or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (n d), weight (v d), targets (n); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    rows = chunk_rows(weight.shape[0], h.device.type) if rows is None else rows
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, hits = _LinearCrossEntropy.apply(h, weight, targets, ignore_index, rows, need_grad, return_hits)
    return (loss, hits) if return_hits else loss
