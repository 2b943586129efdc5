"""The step guard: classify every optimizer step on the device, without a host sync.

A step is one of

    OK               finite loss, finite gradients
    NONFINITE_LOSS   a micro-batch loss was NaN/inf: the whole accumulation window is void
    OVERFLOW         the loss was finite but the gradient norm is inf (fp16 overflow)
    NONFINITE_GRAD   the loss was finite but the gradient norm is NaN: no loss scale makes
                     that, the model or the data did (it counts toward a rollback)
    SPIKE            the gradient norm is a z-score outlier and --spike-policy is skip
    LOSS_SPIKE       the loss is finite but a z-score outlier above its running statistics
                     and --loss-spike-policy is skip (a bad batch, or the start of a divergence)

and every non-OK step is skipped: the skip flag goes to the fused optimizer as its
``found_inf`` (the protocol GradScaler itself uses with fused optimizers), so parameters,
Adam moments and step counts stay bit-for-bit untouched. The learning-rate schedule
reads ``good_steps``, which a skipped step does not advance.

Spikes (ZClip-style): a running mean and variance of the finite gradient norms gives a
threshold mean + z * std; under ``clip`` a norm above it is clipped to it, under ``skip``
the step is skipped. Non-finite norms never enter the statistics.

Loss spikes: the same running mean and variance, of the finite losses of good steps; a
loss above mean + max(z * std, --loss-spike-min-rise * |mean|) is a spike. The relative
floor keeps a run whose loss has become very steady from skipping every slightly harder
batch. The statistics restart with each continual-learning task (a new domain starts
higher).

Counters (skips by reason, grad-norm bands, consecutive skips) and a per-step history of
the last ``window`` steps live on the device; the trainer reads them every --log-every
steps with one sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stability.config import GuardConfig
from stability.distributed import Dist, all_reduce_

OK, NONFINITE_LOSS, OVERFLOW, SPIKE, LOSS_SPIKE, NONFINITE_GRAD = 0, 1, 2, 3, 4, 5
REASONS = ("ok", "nonfinite_loss", "overflow", "spike", "loss_spike", "nonfinite_grad")
BANDS = ("low", "healthy", "high", "critical", "exploded")
# columns of the history buffer
H_LOSS, H_NORM, H_REASON, H_BAND, H_SCALE, H_LR = range(6)


@dataclass
class Verdict:
    """The guard's decision for one step; every field is a device tensor."""

    skip: torch.Tensor  # float 0/1, the optimizer's found_inf
    reason: torch.Tensor  # int64, index into REASONS
    band: torch.Tensor  # int64, index into BANDS
    max_norm: torch.Tensor  # clip threshold for this step (inf: no clipping)
    overflow: torch.Tensor  # bool: the gradients are not finite (and the loss is)
    loss_ok: torch.Tensor  # bool
    inf: torch.Tensor | None = None  # bool: ... and their norm is inf, not NaN
    loss: torch.Tensor | None = None  # the mean loss over every rank
    peer: torch.Tensor | None = None  # bool: skipped for another rank; this rank's own step was clean


def _fused(kernels: str, device: torch.device, dist: Dist) -> bool:
    """Whether the guard's arithmetic runs as ``stability.step_kernels``' two launches."""
    from model.ops import triton_support

    if kernels not in GUARD_KERNELS:
        raise ValueError(f"unknown guard kernels {kernels!r}; use one of {', '.join(GUARD_KERNELS)}")
    if kernels == "torch":
        return False
    if kernels == "auto":
        return device.type == "cuda" and not dist.active and triton_support.can_run(torch.empty(0, device=device))
    if dist.active:
        raise ValueError("the guard's Triton kernels run in one process; under torchrun the guard's all-reduce "
                         "sits inside its judgement, so use kernels='torch' there")
    problem = triton_support.device_problem(torch.empty(0, device=device))
    if problem is not None:
        raise ValueError(f"the guard's Triton kernels cannot run: {problem}")
    return True


def band_edges(cfg: GuardConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([cfg.band_healthy, cfg.band_high, cfg.band_critical], device=device)


def band_of(norm: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Index into BANDS of a gradient norm (device op), as the write-up draws them:
    low < 0.5 <= healthy <= 5 < high <= 10 < critical; exploded when non-finite."""
    n = norm.float()
    band = (n >= edges[0]).long() + (n > edges[1]).long() + (n > edges[2]).long()
    return torch.where(torch.isfinite(n), band, len(BANDS) - 1)


def band_name(norm: float, cfg: GuardConfig) -> str:
    return BANDS[int(band_of(torch.tensor(norm), band_edges(cfg)))]


GUARD_KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


class StepGuard:
    """The guard's state on the device and its decisions. ``kernels``: where its arithmetic
    runs. ``torch``: torch ops on 0-dim tensors, about 150 a step (the reference, the CPU's
    path); ``triton``: two fused kernels (``stability.step_kernels``), one launch each;
    ``auto``: triton on CUDA where Triton imports and the run is one process, else torch."""

    def __init__(self, cfg: GuardConfig, device: torch.device | str, gradient_clip: float, window: int,
                 dist: Dist = Dist(), kernels: str = "auto"):
        self.cfg, self.dist = cfg, dist
        # the one clip decision: --gradient-clip's bound (inf: none) and, under --spike-policy
        # clip, a spike's threshold below it; the trainer clips when ``clips`` says so
        self.clip_norm = gradient_clip if gradient_clip > 0 else math.inf
        self.clips = self.clip_norm < math.inf or cfg.spike_policy == "clip"
        self.window = window
        dev = torch.device(device)
        z = lambda dtype=torch.int64: torch.zeros((), dtype=dtype, device=dev)  # noqa: E731
        self.good_steps = z()
        self.consecutive_skips = z()
        self.skips = torch.zeros(len(REASONS), dtype=torch.int64, device=dev)
        self.bands = torch.zeros(len(BANDS), dtype=torch.int64, device=dev)
        self.spikes_clipped = z()
        self.peer_skips = z()  # steps skipped for another rank's bad batch
        self.bad_params: torch.Tensor | None = None  # (p,) bool, see observe_param_norms
        self.norm_mean = z(torch.float32)
        self.norm_var = z(torch.float32)
        self.norm_count = z()
        self.loss_mean = z(torch.float32)
        self.loss_var = z(torch.float32)
        self.loss_count = z()
        self.history = torch.full((window, 6), float("nan"), device=dev)
        self._one = torch.ones((), device=dev)
        self._edges = band_edges(cfg, dev)
        self.fused = _fused(kernels, dev, dist)


    def judge(self, loss_ok: torch.Tensor, grad_norm: torch.Tensor, loss: torch.Tensor | None = None) -> Verdict:
        """Classify a step from the AND of its micro-batch finite flags, its total
        (pre-clip) gradient norm and its mean loss.

        Under distributed training one all-reduce (no host sync) makes the flags and the
        loss global, so every rank records the same verdict, the same statistics and the
        same history, and takes the same rollback decisions; ``peer`` marks a rank whose
        own step was clean.
        """
        if self.fused:
            return self._judge_fused(loss_ok, grad_norm, loss)
        c = self.cfg
        norm = grad_norm.float()
        grads_ok = torch.isfinite(norm)
        nan_grads = torch.isnan(norm)
        peer = torch.zeros_like(loss_ok)
        if self.dist.active:
            local_bad = ~loss_ok | ~grads_ok
            value = loss.float() if loss is not None else torch.zeros((), device=norm.device)
            packed = all_reduce_(self.dist, torch.stack([(~loss_ok).float(), (~grads_ok).float(),
                                                         nan_grads.float(), value]))
            loss_ok, grads_ok, nan_grads = packed[0] == 0, grads_ok & (packed[1] == 0), packed[2] > 0
            loss = packed[3] / self.dist.world if loss is not None else None
            peer = ~local_bad & ~(loss_ok & grads_ok)
        loss_spike = self._loss_spike(loss_ok, loss)
        threshold = self.norm_mean + c.spike_zscore * self.norm_var.clamp(min=0).sqrt()
        armed = self.norm_count >= c.spike_warmup
        spike = grads_ok & armed & (norm > threshold) & (c.spike_policy != "off")
        skip_spike = spike & (c.spike_policy == "skip")
        reason = torch.where(skip_spike, SPIKE, OK)
        reason = torch.where(loss_spike, LOSS_SPIKE, reason)
        reason = torch.where(~grads_ok, torch.where(nan_grads, NONFINITE_GRAD, OVERFLOW), reason)
        reason = torch.where(~loss_ok, NONFINITE_LOSS, reason)
        skip = (reason != OK).float()
        max_norm = torch.full_like(norm, self.clip_norm)
        if c.spike_policy == "clip":
            max_norm = torch.where(spike, torch.minimum(max_norm, threshold), max_norm)
            self.spikes_clipped += spike.long()
        band = band_of(norm, self._edges)
        # a clipped spike enters the statistics at its clipped value; a skipped step, like a
        # non-finite one, never happened and stays out
        good = reason == OK
        self._update_norm_stats(norm, good, torch.where(spike, threshold, norm))
        if loss is not None:
            self._update_loss_stats(loss.float(), good)
        return Verdict(skip=skip, reason=reason, band=band, max_norm=max_norm, overflow=loss_ok & ~grads_ok,
                       loss_ok=loss_ok, inf=loss_ok & ~grads_ok & ~nan_grads, loss=loss, peer=peer)

    def _judge_fused(self, loss_ok: torch.Tensor, grad_norm: torch.Tensor, loss: torch.Tensor | None) -> Verdict:
        from stability import step_kernels

        skip, max_norm = grad_norm.new_empty((), dtype=torch.float32), grad_norm.new_empty((), dtype=torch.float32)
        reason, band = (grad_norm.new_empty((), dtype=torch.int64) for _ in range(2))
        overflow, inf = (grad_norm.new_empty((), dtype=torch.bool) for _ in range(2))
        step_kernels.judge(self, loss_ok, grad_norm, loss, (skip, reason, band, max_norm, overflow, inf))
        return Verdict(skip=skip, reason=reason, band=band, max_norm=max_norm, overflow=overflow, loss_ok=loss_ok,
                       inf=inf, loss=loss, peer=None)

    def observe_param_norms(self, norms: torch.Tensor) -> None:
        """Remember which parameters had non-finite gradients since the last sync point
        (``norms``: each parameter's gradient norm, (p,)), to name them when it matters."""
        if self.bad_params is None or self.bad_params.shape != norms.shape:
            self.bad_params = torch.zeros(norms.shape, dtype=torch.bool, device=norms.device)
        self.bad_params |= ~torch.isfinite(norms)



    def _loss_spike(self, loss_ok: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
        """Whether a finite loss is far above the running statistics of good steps' losses."""
        c = self.cfg
        if loss is None or c.loss_spike_policy == "off":
            return torch.zeros_like(loss_ok)
        value = loss.float()
        rise = torch.maximum(c.loss_spike_zscore * self.loss_var.clamp(min=0).sqrt(),
                             c.loss_spike_min_rise * self.loss_mean.abs())
        armed = self.loss_count >= c.loss_spike_warmup
        return loss_ok & torch.isfinite(value) & armed & (value > self.loss_mean + rise)

    def _ema(self, mean, var, count, value, include, decay):
        """One step of a running mean and variance: a plain mean while warming up, an EMA
        after; values not ``include``d (non-finite, skipped) leave them untouched."""
        alpha = torch.maximum(1.0 / (count + 1).float(), self._one * (1 - decay))
        alpha = torch.where(include, alpha, 0.0)
        value = torch.where(include, value, 0.0)
        delta = value - mean
        return mean + alpha * delta, (1 - alpha) * (var + alpha * delta * delta), count + include.long()

    def _update_norm_stats(self, norm: torch.Tensor, include: torch.Tensor, value: torch.Tensor) -> None:
        self.norm_mean, self.norm_var, self.norm_count = self._ema(
            self.norm_mean, self.norm_var, self.norm_count, value, include & torch.isfinite(norm), self.cfg.spike_ema)

    def _update_loss_stats(self, loss: torch.Tensor, include: torch.Tensor) -> None:
        self.loss_mean, self.loss_var, self.loss_count = self._ema(
            self.loss_mean, self.loss_var, self.loss_count, loss, include & torch.isfinite(loss), self.cfg.spike_ema)

    def reset_loss_stats(self) -> None:
        """A new continual-learning task: its domain starts at another loss level."""
        self.loss_mean = torch.zeros_like(self.loss_mean)
        self.loss_var = torch.zeros_like(self.loss_var)
        self.loss_count = torch.zeros_like(self.loss_count)

    def commit(self, step: int, verdict: Verdict, loss: torch.Tensor, grad_norm: torch.Tensor,
               scale: torch.Tensor, lr: torch.Tensor, counts_toward_rollback: torch.Tensor,
               step_t: torch.Tensor | None = None) -> None:
        """Record a judged step in the counters and the history (device ops only). The fused
        kernels take the history's row from ``step_t`` (the step as a device counter) where
        it is given, so a replayed CUDA graph writes each step's own row."""
        if self.fused and verdict.peer is None:
            from stability import step_kernels

            if step_t is None:
                step_t = torch.full((), step, dtype=torch.int64, device=self.history.device)
            return step_kernels.commit(self, step_t, verdict, loss, grad_norm, scale, lr, counts_toward_rollback)
        skipped = verdict.reason != OK
        self.skips += F.one_hot(verdict.reason, len(REASONS))  # sync-free on every device
        if verdict.peer is not None:
            self.peer_skips += verdict.peer.long()
        self.bands += F.one_hot(verdict.band, len(BANDS))
        self.good_steps += (~skipped).long()
        rollback_skip = skipped & counts_toward_rollback
        self.consecutive_skips = torch.where(rollback_skip, self.consecutive_skips + 1,
                                             torch.where(skipped, self.consecutive_skips, 0))
        row = torch.stack([loss.float(), grad_norm.float(), verdict.reason.float(),
                           verdict.band.float(), scale.float(), lr.float()])
        self.history[step % self.window].copy_(row)

    def record_unguarded(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scale: torch.Tensor,
                         lr: torch.Tensor) -> None:
        """Record a step taken with --no-guard: never skipped, whatever its values, so the
        run still logs it (and a drill can show what the guard would have prevented)."""
        band = band_of(grad_norm, self._edges)
        self.bands += F.one_hot(band, len(BANDS))
        self.skips[OK] += 1
        self.good_steps += 1
        row = torch.stack([loss.float(), grad_norm.float(), torch.zeros_like(loss).float(), band.float(),
                           scale.float(), lr.float()])
        self.history[step % self.window].copy_(row)

    def read(self, extra: torch.Tensor | None = None) -> dict[str, Any]:
        """Every counter, the history window and the parameters whose gradients went
        non-finite since the last read, as Python values: one host sync. ``extra`` (a flat
        device tensor, the BlockProbe's values) rides in the same transfer and comes back as
        ``"extra"``, a list of floats (None without it)."""
        bad = self.bad_params if self.bad_params is not None else self.skips.new_zeros(0, dtype=torch.bool)
        riders = [bad.double()] if extra is None else [bad.double(), extra.double().flatten()]
        flat = torch.cat([
            self.skips.double(), self.bands.double(),
            torch.stack([self.good_steps, self.consecutive_skips, self.spikes_clipped, self.peer_skips]).double(),
            self.history.double().flatten(), *riders,
        ]).tolist()  # host sync
        n_r, n_b = len(REASONS), len(BANDS)
        end = n_r + n_b + 4 + self.window * 6
        n_bad = bad.numel()
        history, bad_flags, extra_values = flat[n_r + n_b + 4:end], flat[end:end + n_bad], flat[end + n_bad:]
        if self.bad_params is not None:
            self.bad_params.zero_()
        return {
            "bad_params": [i for i, b in enumerate(bad_flags) if b],
            "extra": extra_values if extra is not None else None,
            "skips": dict(zip(REASONS, map(int, flat[:n_r]))),
            "bands": dict(zip(BANDS, map(int, flat[n_r:n_r + n_b]))),
            "good_steps": int(flat[n_r + n_b]),
            "consecutive_skips": int(flat[n_r + n_b + 1]),
            "spikes_clipped": int(flat[n_r + n_b + 2]),
            "peer_skips": int(flat[n_r + n_b + 3]),
            "history": [history[i * 6:(i + 1) * 6] for i in range(self.window)],
        }

    _STATE = ("good_steps", "consecutive_skips", "skips", "bands", "spikes_clipped", "peer_skips",
              "norm_mean", "norm_var", "norm_count", "loss_mean", "loss_var", "loss_count", "history")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self._STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._STATE:
            setattr(self, name, state[name].to(getattr(self, name).device).clone())
        if self.history.shape[0] != self.window:
            raise ValueError(f"guard state has a history of {self.history.shape[0]} steps, this run logs every "
                             f"{self.window}; resume with the same --log-every")
