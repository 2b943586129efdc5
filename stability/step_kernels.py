"""The training step's scalar bookkeeping as Triton kernels: the GPU path of the learning-rate
schedule and of ``StepGuard``.

The schedule (``stability.schedule.get_lr`` times the rollback factor, into every parameter
group's rate) and the guard's ``judge`` and ``commit`` are written in torch ops on 0-dim
tensors, about 170 of them a step. On the CPU each costs a fraction of a microsecond, but
on CUDA each is a kernel launch of 5-10 us: this bookkeeping alone would cost a millisecond
or more a step, several times a small Transformer's whole step. Here each is one launch, a
single program reading and writing the tensors the torch ops do, in the same order of
float operations, so the decisions are the same (the tests hold the two paths to it, under
Triton's interpreter, over random states and inputs). The torch ops stay the reference, the
CPU's path, and the guard's path under torch.distributed (whose all-reduce sits in the
middle of the judgement).

Supports any ``GuardConfig`` and schedule; the state's dtypes are the trainer's and the
guard's (fp32 rates and statistics, int64 counters, an fp32 history).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

_SPIKE_POLICIES = {"off": 0, "clip": 1, "skip": 2}


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _ema(mean_ptr, var_ptr, count_ptr, value, include, one_minus_decay):
    """``StepGuard._ema`` in place: a plain mean while warming up, an EMA after."""
    mean = tl.load(mean_ptr)
    var = tl.load(var_ptr)
    count = tl.load(count_ptr)
    alpha = tl.maximum(1.0 / (count + 1).to(tl.float32), one_minus_decay)
    alpha = tl.where(include, alpha, 0.0)
    delta = tl.where(include, value, 0.0) - mean
    tl.store(mean_ptr, mean + alpha * delta)
    tl.store(var_ptr, (1 - alpha) * (var + alpha * delta * delta))
    tl.store(count_ptr, count + include.to(tl.int64))


@triton.jit
def _judge(loss_ok_ptr, norm_ptr, loss_ptr,
           norm_mean_ptr, norm_var_ptr, norm_count_ptr, loss_mean_ptr, loss_var_ptr, loss_count_ptr, clipped_ptr,
           skip_ptr, reason_ptr, band_ptr, max_norm_ptr, overflow_ptr, inf_ptr,
           clip_norm, spike_z, spike_warmup, loss_z, loss_min_rise, loss_warmup, one_minus_decay,
           edge_healthy, edge_high, edge_critical,
           SPIKE_POLICY: tl.constexpr, LOSS_SPIKES: tl.constexpr, HAS_LOSS: tl.constexpr):
    loss_ok = tl.load(loss_ok_ptr) != 0
    norm = tl.load(norm_ptr).to(tl.float32)
    grads_ok = _finite(norm)
    nan_grads = norm != norm
    loss_spike = loss_ok != loss_ok  # False, as a tensor
    if HAS_LOSS:
        value = tl.load(loss_ptr).to(tl.float32)
        if LOSS_SPIKES:
            lmean = tl.load(loss_mean_ptr)
            rise = tl.maximum(loss_z * tl.sqrt_rn(tl.maximum(tl.load(loss_var_ptr), 0.0)),
                              loss_min_rise * tl.abs(lmean))
            armed_loss = tl.load(loss_count_ptr) >= loss_warmup
            loss_spike = loss_ok & _finite(value) & armed_loss & (value > lmean + rise)
    threshold = tl.load(norm_mean_ptr) + spike_z * tl.sqrt_rn(tl.maximum(tl.load(norm_var_ptr), 0.0))
    armed = tl.load(norm_count_ptr) >= spike_warmup
    spike = grads_ok & armed & (norm > threshold) & (SPIKE_POLICY != 0)
    reason = tl.where(spike & (SPIKE_POLICY == 2), 3, 0)  # SPIKE
    reason = tl.where(loss_spike, 4, reason)  # LOSS_SPIKE
    reason = tl.where(grads_ok, reason, tl.where(nan_grads, 5, 2))  # NONFINITE_GRAD, OVERFLOW
    reason = tl.where(loss_ok, reason, 1)  # NONFINITE_LOSS
    max_norm = clip_norm
    if SPIKE_POLICY == 1:
        max_norm = tl.where(spike, tl.minimum(max_norm, threshold), max_norm)
        tl.store(clipped_ptr, tl.load(clipped_ptr) + spike.to(tl.int64))
    band = (norm >= edge_healthy).to(tl.int64) + (norm > edge_high).to(tl.int64) + (norm > edge_critical).to(tl.int64)
    good = reason == 0
    # a clipped spike enters the statistics at its clipped value; a skipped step stays out
    _ema(norm_mean_ptr, norm_var_ptr, norm_count_ptr, tl.where(spike, threshold, norm), good & grads_ok,
         one_minus_decay)
    if HAS_LOSS:
        _ema(loss_mean_ptr, loss_var_ptr, loss_count_ptr, value, good & _finite(value), one_minus_decay)
    tl.store(skip_ptr, (reason != 0).to(tl.float32))
    tl.store(reason_ptr, reason.to(tl.int64))
    tl.store(band_ptr, tl.where(grads_ok, band, 4))  # exploded
    tl.store(max_norm_ptr, max_norm)
    tl.store(overflow_ptr, (loss_ok & ~grads_ok).to(tl.int1))
    tl.store(inf_ptr, (loss_ok & ~grads_ok & ~nan_grads).to(tl.int1))


@triton.jit
def _commit(reason_ptr, band_ptr, counts_ptr, loss_ptr, norm_ptr, scale_ptr, lr_ptr,
            skips_ptr, bands_ptr, good_ptr, consecutive_ptr, row_ptr):
    reason = tl.load(reason_ptr)
    band = tl.load(band_ptr)
    tl.store(skips_ptr + reason, tl.load(skips_ptr + reason) + 1)
    tl.store(bands_ptr + band, tl.load(bands_ptr + band) + 1)
    skipped = reason != 0
    tl.store(good_ptr, tl.load(good_ptr) + (~skipped).to(tl.int64))
    consecutive = tl.load(consecutive_ptr)
    consecutive = tl.where(skipped & (tl.load(counts_ptr) != 0), consecutive + 1, tl.where(skipped, consecutive, 0))
    tl.store(consecutive_ptr, consecutive)
    tl.store(row_ptr, tl.load(loss_ptr).to(tl.float32))
    tl.store(row_ptr + 1, tl.load(norm_ptr).to(tl.float32))
    tl.store(row_ptr + 2, reason.to(tl.float32))
    tl.store(row_ptr + 3, band.to(tl.float32))
    tl.store(row_ptr + 4, tl.load(scale_ptr).to(tl.float32))
    tl.store(row_ptr + 5, tl.load(lr_ptr).to(tl.float32))


def judge(guard, loss_ok, norm, loss, outputs) -> None:
    """One launch of ``_judge`` over ``guard``'s state (a ``StepGuard``); ``outputs`` are the
    six verdict tensors it fills (skip, reason, band, max_norm, overflow, inf)."""
    c = guard.cfg
    _judge[(1,)](loss_ok, norm, loss if loss is not None else norm,
                 guard.norm_mean, guard.norm_var, guard.norm_count, guard.loss_mean, guard.loss_var,
                 guard.loss_count, guard.spikes_clipped, *outputs,
                 guard.clip_norm, c.spike_zscore, c.spike_warmup, c.loss_spike_zscore, c.loss_spike_min_rise,
                 c.loss_spike_warmup, 1 - c.spike_ema, c.band_healthy, c.band_high, c.band_critical,
                 SPIKE_POLICY=_SPIKE_POLICIES[c.spike_policy], LOSS_SPIKES=c.loss_spike_policy != "off",
                 HAS_LOSS=loss is not None)


def commit(guard, row, verdict, loss, grad_norm, scale, lr, counts) -> None:
    """One launch of ``_commit``: the counters of ``guard`` and the history ``row`` (6,)."""
    _commit[(1,)](verdict.reason, verdict.band, counts, loss, grad_norm, scale, lr, guard.skips, guard.bands,
                  guard.good_steps, guard.consecutive_skips, row)


@triton.jit
def _learning_rates(good_ptr, offset_ptr, factor_ptr, scale_ptr, lr_ptr, lrs_ptr, groups,
                    peak, warmup, span, floor, half_range, pi, BLOCK_G: tl.constexpr):
    """``get_lr`` of the task's good steps, times the rollback factor, into ``lr`` and, times
    each group's multiplier, into every group's rate."""
    step = (tl.load(good_ptr) - tl.load(offset_ptr)).to(tl.float32)
    warm = peak * (step + 1) / (warmup + 1)
    progress = tl.minimum(tl.maximum((step - warmup) / span, 0.0), 1.0)
    cosine = floor + half_range * (1 + tl.cos(pi * progress))
    lr = tl.where(step < warmup, warm, cosine) * tl.load(factor_ptr)
    tl.store(lr_ptr, lr)
    g = tl.arange(0, BLOCK_G)
    tl.store(lrs_ptr + g, lr * tl.load(scale_ptr + g, mask=g < groups, other=0.0), mask=g < groups)


def learning_rates(good_steps, lr_offset, lr_factor, group_scale, lrs, peak: float, warmup: int, total: int,
                   min_ratio: float):
    """One launch: the base rate (returned, 0-dim) and each group's into ``lrs`` (g,)."""
    lr = lrs.new_empty(())
    floor = peak * min_ratio
    groups = lrs.shape[0]
    _learning_rates[(1,)](good_steps, lr_offset, lr_factor, group_scale, lr, lrs, groups, peak, warmup,
                          max(total - warmup, 1), floor, (peak - floor) * 0.5, math.pi,
                          BLOCK_G=max(2, 1 << (groups - 1).bit_length()))
    return lr
