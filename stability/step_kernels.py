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
            skips_ptr, bands_ptr, good_ptr, consecutive_ptr, step_ptr, history_ptr, window):
    reason = tl.load(reason_ptr)
    band = tl.load(band_ptr)
    tl.store(skips_ptr + reason, tl.load(skips_ptr + reason) + 1)
    tl.store(bands_ptr + band, tl.load(bands_ptr + band) + 1)
    skipped = reason != 0
    tl.store(good_ptr, tl.load(good_ptr) + (~skipped).to(tl.int64))
    consecutive = tl.load(consecutive_ptr)
    consecutive = tl.where(skipped & (tl.load(counts_ptr) != 0), consecutive + 1, tl.where(skipped, consecutive, 0))
    tl.store(consecutive_ptr, consecutive)
    row_ptr = history_ptr + (tl.load(step_ptr) % window) * 6
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


def commit(guard, step_t, verdict, loss, grad_norm, scale, lr, counts) -> None:
    """One launch of ``_commit``: the counters of ``guard`` and its history's row for the
    step ``step_t`` (a 0-dim int64 device tensor)."""
    _commit[(1,)](verdict.reason, verdict.band, counts, loss, grad_norm, scale, lr, guard.skips, guard.bands,
                  guard.good_steps, guard.consecutive_skips, step_t, guard.history, guard.window)


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


@triton.jit
def _meta_plasticity(loss_ptr, good_ptr, norms_ptr, rates_ptr, fast_ptr, slow_ptr, seen_ptr, m_lr_ptr, m_stdp_ptr,
                     group_block_ptr, group_scale_ptr, blocks, groups, ema_fast, rest_fast, ema_slow, rest_slow,
                     plateau, warmup, band_high, target, tolerance, meta_lr, log_min, log_max,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """``PlasticityController._meta`` and ``group_lr_scale``: the loss's two running means,
    each block's two multipliers moved in log space, and each group's learning-rate
    multiplier (its block's, 1 for a shared group)."""
    loss = tl.load(loss_ptr).to(tl.float32)
    loss_ok = _finite(loss) & (tl.load(good_ptr) != 0)
    seen = tl.load(seen_ptr)
    first = seen == 0
    value = tl.where(_finite(loss), loss, 0.0)
    fast = tl.load(fast_ptr)
    slow = tl.load(slow_ptr)
    fast = tl.where(loss_ok, tl.where(first, value, ema_fast * fast + rest_fast * value), fast)
    slow = tl.where(loss_ok, tl.where(first, value, ema_slow * slow + rest_slow * value), slow)
    seen = seen + loss_ok.to(tl.int64)
    tl.store(fast_ptr, fast)
    tl.store(slow_ptr, slow)
    tl.store(seen_ptr, seen)
    improving = ((slow - fast) > plateau * tl.abs(slow)) | (seen < warmup)
    n = tl.arange(0, BLOCK_N)
    on = n < blocks
    norms = tl.load(norms_ptr + n, mask=on, other=0.0)
    rates = tl.load(rates_ptr + n, mask=on, other=0.0)
    grad_bad = ~_finite(norms) | (norms > band_high)
    rate_bad = ~_finite(rates) | (tl.abs(rates - target) > tolerance)
    m_lr = _move(tl.load(m_lr_ptr + n, mask=on, other=1.0), grad_bad, improving, meta_lr, log_min, log_max)
    tl.store(m_lr_ptr + n, m_lr, mask=on)
    m_stdp = _move(tl.load(m_stdp_ptr + n, mask=on, other=1.0), grad_bad | rate_bad, improving, meta_lr, log_min,
                   log_max)
    tl.store(m_stdp_ptr + n, m_stdp, mask=on)
    # each group's block's multiplier, 1 for a shared group: a one-hot sum, not a gather
    g = tl.arange(0, BLOCK_G)
    block = tl.load(group_block_ptr + g, mask=g < groups, other=blocks)
    mine = (block[:, None] == n[None, :]) & on[None, :]  # (BG BN)
    scale = tl.sum(tl.where(mine, m_lr[None, :], 0.0), axis=1) + (block >= blocks).to(tl.float32)
    tl.store(group_scale_ptr + g, scale, mask=g < groups)


@triton.jit
def _move(m, bad, improving, meta_lr, log_min, log_max):
    log_m = tl.log(m)
    moved = tl.where(bad, log_m - meta_lr, tl.where(improving, log_m * (1 - meta_lr), log_m + meta_lr))
    return tl.exp(tl.minimum(tl.maximum(moved, log_min), log_max))


def meta_plasticity(controller, rates, loss, good, group_scale) -> None:
    """One launch of ``_meta_plasticity`` over ``controller``'s state (a
    ``PlasticityController``), filling ``group_scale`` (g,)."""
    c, n = controller.cfg, controller._n
    groups = group_scale.shape[0]
    _meta_plasticity[(1,)](loss, good, controller.block_norms, rates, controller.loss_fast, controller.loss_slow,
                           controller.loss_seen, controller.m_lr, controller.m_stdp, controller._group_block,
                           group_scale, n, groups, controller.EMA_FAST, 1 - controller.EMA_FAST,
                           controller.EMA_SLOW, 1 - controller.EMA_SLOW, c.meta_plateau,
                           controller.META_WARMUP, controller.guard_cfg.band_high, c.stdp_target_rate,
                           c.meta_rate_tolerance, c.meta_lr, math.log(c.meta_min), math.log(c.meta_max),
                           BLOCK_N=max(2, 1 << (n - 1).bit_length()), BLOCK_G=max(2, 1 << (groups - 1).bit_length()))
