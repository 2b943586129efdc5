"""The step's fused bookkeeping (``stability.step_kernels``, run by Triton's interpreter on
the CPU) against the torch ops, the reference: the guard's verdict, statistics, counters
and history from any state and any step under every policy, and the learning rates."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.ops import triton_support
from stability.config import GuardConfig, TrainConfig
from stability.distributed import Dist
from stability.guard import StepGuard

pytestmark = pytest.mark.skipif(not triton_support.interpreted(),
                                reason="Triton compiles in this process (CUDA present): the gpu tests cover it")

NORMS = st.one_of(st.floats(0, 50, width=32), st.sampled_from([math.inf, -math.inf, math.nan, 0.5, 5.0, 10.0]))
LOSSES = st.one_of(st.none(), st.floats(0, 20, width=32), st.sampled_from([math.inf, math.nan]))
STATE = ("norm_mean", "norm_var", "norm_count", "loss_mean", "loss_var", "loss_count", "spikes_clipped", "skips",
         "bands", "good_steps", "consecutive_skips", "history")
VERDICT = ("skip", "reason", "band", "max_norm", "overflow", "inf")


def _pair(cfg: GuardConfig, clip: float, seed: int) -> tuple[StepGuard, StepGuard]:
    """The torch guard and the fused one, from the same random state."""
    ref = StepGuard(cfg, "cpu", clip, window=4, kernels="torch")
    fused = StepGuard(cfg, "cpu", clip, window=4, kernels="triton")
    g = torch.Generator().manual_seed(seed)
    state = {
        "norm_mean": torch.rand((), generator=g) * 4, "norm_var": torch.rand((), generator=g) - 0.1,
        "norm_count": torch.randint(0, 40, (), generator=g), "loss_mean": torch.rand((), generator=g) * 6,
        "loss_var": torch.rand((), generator=g), "loss_count": torch.randint(0, 80, (), generator=g),
        "spikes_clipped": torch.randint(0, 5, (), generator=g), "skips": torch.randint(0, 5, (6,), generator=g),
        "bands": torch.randint(0, 5, (5,), generator=g), "good_steps": torch.randint(0, 99, (), generator=g),
        "consecutive_skips": torch.randint(0, 3, (), generator=g), "history": torch.randn(4, 6, generator=g),
    }
    state["norm_mean"], state["loss_mean"] = state["norm_mean"].float(), state["loss_mean"].float()
    for guard in (ref, fused):
        for name, value in state.items():
            setattr(guard, name, value.clone())
    return ref, fused


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
    close = torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(a, b) or close, f"{what}: {a} vs {b}"


@settings(deadline=None)
@given(norm=NORMS, loss=LOSSES, loss_ok=st.booleans(), spike=st.sampled_from(["clip", "skip", "off"]),
       loss_spike=st.sampled_from(["skip", "off"]), clip=st.sampled_from([0.0, 1.0, 3.0]),
       warmup=st.integers(1, 40), step=st.integers(0, 9), counts=st.booleans(), seed=st.integers(0, 99))
def test_the_fused_guard_judges_and_counts_as_the_torch_guard(norm, loss, loss_ok, spike, loss_spike, clip, warmup,
                                                               step, counts, seed):
    cfg = GuardConfig(spike_policy=spike, loss_spike_policy=loss_spike, spike_warmup=warmup, loss_spike_warmup=warmup)
    ref, fused = _pair(cfg, clip, seed)
    loss_t = None if loss is None else torch.tensor(loss)
    verdicts = [g.judge(torch.tensor(loss_ok), torch.tensor(norm), loss_t) for g in (ref, fused)]
    for name in VERDICT:
        _same(getattr(verdicts[0], name), getattr(verdicts[1], name), name)
    for guard, verdict in zip((ref, fused), verdicts):
        guard.commit(step, verdict, torch.tensor(2.5), torch.tensor(norm), torch.tensor(1024.0), torch.tensor(3e-4),
                     torch.tensor(counts))
    for name in STATE:
        _same(getattr(ref, name), getattr(fused, name), name)


def test_a_stream_of_steps_leaves_both_guards_in_the_same_state():
    """Warm-up, arming, a spike clipped, a loss spike skipped, an overflow: forty steps."""
    cfg = GuardConfig(spike_warmup=5, loss_spike_warmup=5)
    ref, fused = (StepGuard(cfg, "cpu", 1.0, window=8, kernels=k) for k in ("torch", "triton"))
    norms = [1.0 + 0.1 * (i % 3) for i in range(40)]
    losses = [3.0 - 0.01 * i for i in range(40)]
    norms[20], losses[30], norms[35] = 50.0, 30.0, math.inf
    for step, (norm, loss) in enumerate(zip(norms, losses)):
        verdicts = [g.judge(torch.tensor(True), torch.tensor(norm), torch.tensor(loss)) for g in (ref, fused)]
        for g, v in zip((ref, fused), verdicts):
            g.commit(step, v, torch.tensor(loss), torch.tensor(norm), torch.tensor(1.0), torch.tensor(1e-3),
                     torch.tensor(True))
        assert int(verdicts[0].reason) == int(verdicts[1].reason), f"step {step}"
    for name in STATE:
        _same(getattr(ref, name), getattr(fused, name), name)
    assert ref.read()["skips"] == fused.read()["skips"] and fused.read()["skips"]["overflow"] == 1


def test_auto_keeps_the_torch_ops_on_the_cpu_and_under_torchrun():
    assert not StepGuard(GuardConfig(), "cpu", 1.0, window=4).fused
    assert StepGuard(GuardConfig(), "cpu", 1.0, window=4, kernels="triton").fused
    two_ranks = Dist(mode="ddp", world=2, rank=0)
    with pytest.raises(ValueError, match="one process.*kernels='torch'"):
        StepGuard(GuardConfig(), "cpu", 1.0, window=4, dist=two_ranks, kernels="triton")
    with pytest.raises(ValueError, match="unknown guard kernels 'fast'"):
        StepGuard(GuardConfig(), "cpu", 1.0, window=4, kernels="fast")


@settings(deadline=None)
@given(good=st.integers(0, 300), offset=st.integers(0, 50), factor=st.sampled_from([1.0, 0.5, 0.25]),
       warmup=st.integers(0, 40), total=st.integers(1, 400), min_ratio=st.sampled_from([0.0, 0.1]),
       groups=st.integers(1, 9), seed=st.integers(0, 99))
def test_the_fused_learning_rates_are_the_schedules(good, offset, factor, warmup, total, min_ratio, groups, seed):
    from stability import step_kernels
    from stability.schedule import get_lr

    scale = torch.rand(groups, generator=torch.Generator().manual_seed(seed)) + 0.5
    lrs = torch.zeros(groups)
    g, o, f = torch.tensor(good), torch.tensor(offset), torch.tensor(factor)
    lr = step_kernels.learning_rates(g, o, f, scale, lrs, 3e-4, warmup, total, min_ratio)
    want = get_lr(g - o, 3e-4, warmup, total, min_ratio) * f
    torch.testing.assert_close(lr, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(lrs, want * scale, rtol=1e-6, atol=0)


def test_a_trainer_on_the_fused_kernels_trains_as_the_one_on_torch_ops():
    """Twins from one seed, one with the guard's and the schedule's kernels: the same rates,
    verdicts and counters at every step, through a skipped spike, and the same weights."""
    from stability.faults import FaultInjector, parse_faults
    from stability.trainer import Trainer
    from tests.tiny import batches, tiny_hybrid

    twins = []
    for kernels in ("torch", "triton"):
        model = tiny_hybrid(vocab_size=32)
        injector = FaultInjector(parse_faults("grad:nan@3"), model)
        twins.append(Trainer(model, TrainConfig(learning_rate=1e-2, warmup_steps=2, log_every=4, gradient_clip=1.0),
                             GuardConfig(spike_warmup=2), torch.device("cpu"), total_steps=20, injector=injector,
                             kernels=kernels))
    assert twins[1].guard.fused and not twins[0].guard.fused
    for x, y in batches(6, vocab=32):
        outs = [t.train_step([(x, y)]) for t in twins]
        assert int(outs[0].verdict.reason) == int(outs[1].verdict.reason)
        torch.testing.assert_close(twins[0]._lrs, twins[1]._lrs, rtol=1e-6, atol=0)
    for name in STATE:
        _same(getattr(twins[0].guard, name), getattr(twins[1].guard, name), name)
    assert twins[1].guard.read()["skips"]["nonfinite_grad"] == 1
    for (name, a), b in zip(twins[0].model.named_parameters(), twins[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_fault,healthy", [(None, False), ("loss:nan@3", False), (None, True)])
def test_fused_meta_plasticity_moves_the_multipliers_as_the_torch_ops(loss_fault, healthy):
    """Twins with STDP and meta-plasticity, one on the kernels: the loss's running means, both
    multipliers of every block and every group's rate multiplier agree step by step (a
    skipped step with a NaN loss included), and so do the weights."""
    from stability.config import PlasticityConfig
    from stability.faults import FaultInjector, parse_faults
    from stability.trainer import Trainer
    from tests.tiny import batches, tiny_hybrid

    twins = []
    for kernels in ("torch", "triton"):
        model = tiny_hybrid(vocab_size=32, num_layers=3)
        injector = FaultInjector(parse_faults(loss_fault), model) if loss_fault else None
        # unhealthy: every block slows down; healthy: a plateau speeds them up, past the warm-up
        bands = dict(band_healthy=0.01, band_high=0.05) if not healthy else dict(band_high=1e4, band_critical=1e4)
        meta = dict(meta_lr=0.3, meta_rate_tolerance=0.01 if not healthy else 1.0, meta_plateau=0.01 if not healthy
                    else 0.5)
        twins.append(Trainer(model, TrainConfig(learning_rate=1e-2, warmup_steps=1, log_every=4),
                             GuardConfig(**bands), torch.device("cpu"), total_steps=20, injector=injector,
                             plasticity_cfg=PlasticityConfig(use_stdp=True, use_meta_plasticity=True, **meta),
                             kernels=kernels))
    assert twins[1].plasticity.fused and not twins[0].plasticity.fused
    for x, y in batches(14 if healthy else 6, vocab=32):  # healthy: past the warm-up of 10
        for t in twins:
            t.train_step([(x, y)])
        a, b = (t.plasticity for t in twins)
        for name in ("m_lr", "m_stdp", "loss_fast", "loss_slow", "loss_seen"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(twins[0].group_lr_scale, twins[1].group_lr_scale, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.m_lr, torch.ones_like(a.m_lr)), "the multipliers moved"
    for (name, p), q in zip(twins[0].model.named_parameters(), twins[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
