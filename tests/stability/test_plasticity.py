"""STDP and meta-plasticity as the trainer applies them: through the guard, after good
steps only, inside their bounds."""

import math

import pytest
import torch

from model.plasticity import RULES
from stability.config import GuardConfig, PlasticityConfig, TrainConfig
from stability.faults import FaultInjector, parse_faults
from stability.trainer import Trainer
from tests.tiny import batches, tiny_hybrid

CPU = torch.device("cpu")


def make(fault=None, guard=None, **plasticity) -> Trainer:
    model = tiny_hybrid(vocab_size=32)
    injector = FaultInjector(parse_faults(fault), model) if fault else None
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, log_every=8)
    return Trainer(model, cfg, GuardConfig(**(guard or {})), CPU, total_steps=50, injector=injector,
                   plasticity_cfg=PlasticityConfig(**plasticity))


def synapses(t: Trainer) -> list[torch.Tensor]:
    return [b.spiking.synapse.weight.detach().clone() for b in t.model.blocks]


def test_stdp_off_and_meta_off_means_no_controller():
    assert make().plasticity is None


@pytest.mark.parametrize("rule", RULES)
def test_stdp_moves_the_synapses_beyond_what_the_optimizer_does(rule):
    with_stdp, without = make(use_stdp=True, stdp_type=rule, stdp_learning_rate=0.05), make()
    for b in batches(3):
        with_stdp.train_step([b])
        without.train_step([b])
    moved = [not torch.allclose(a, b) for a, b in zip(synapses(with_stdp), synapses(without))]
    assert all(moved), "every block's synapse must feel STDP"
    others = {n: p for n, p in with_stdp.model.named_parameters() if "synapse" not in n}
    assert int(with_stdp.plasticity.applied.sum()) == 3 * len(moved)
    assert all(torch.isfinite(p).all() for p in others.values())


def test_stdp_update_equals_the_rule_times_the_rate():
    from model.plasticity import stdp_update

    t = make(use_stdp=True, stdp_learning_rate=0.05)
    out = t.model(batches(1)[0][0], return_aux=True)
    before = synapses(t)
    t.plasticity.after_step(out.blocks, torch.zeros(()), torch.tensor(3.0))
    for i, aux in enumerate(out.blocks):
        dw, _ = stdp_update("classical", aux.spikes.pre, aux.spikes.post, 4.0, 4.0, 0.1)
        assert torch.allclose(synapses(t)[i] - before[i], 0.05 * dw, atol=1e-7)


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_nonfinite_stdp_update_never_reaches_a_weight(kind):
    t = make(f"plasticity:{kind}@2", use_stdp=True)
    t.train_step(batches(1)[0:1])
    before = synapses(t)
    optimizer_only = make(use_stdp=False)
    optimizer_only.load_state_dict(t.state_dict() | {"plasticity": None})
    t.train_step(batches(2)[1:2])
    after = synapses(t)
    assert all(torch.isfinite(w).all() for w in after)
    assert t.plasticity.read()["dropped"] == [1.0, 1.0]
    # the second step changed the synapses by the optimizer alone
    optimizer_only.train_step(batches(2)[1:2])
    assert all(torch.equal(a, b) for a, b in zip(after, synapses(optimizer_only)))
    assert not all(torch.equal(a, b) for a, b in zip(after, before))


def test_oversized_stdp_update_is_clipped_to_the_max_norm():
    t = make("plasticity:spike@1", guard={"plasticity_max_norm": 0.01}, use_stdp=True, stdp_learning_rate=0.05)
    out = t.model(batches(1)[0][0], return_aux=True)
    t.injector.begin_step(1)
    before = synapses(t)
    t.plasticity.after_step(out.blocks, torch.zeros(()), torch.tensor(3.0))
    for b, a in zip(before, synapses(t)):
        assert (a - b).norm().item() == pytest.approx(0.01 * b.norm().item(), rel=1e-4)
    assert t.plasticity.read()["clipped"] == [1.0, 1.0]


def test_no_stdp_on_a_skipped_step():
    t = make("loss:nan@1", use_stdp=True, stdp_learning_rate=0.05)
    before = synapses(t)
    t.train_step(batches(1))
    assert all(torch.equal(a, b) for a, b in zip(before, synapses(t)))
    assert t.plasticity.read()["applied"] == [0.0, 0.0]


# --- meta-plasticity -------------------------------------------------------------------

def meta(**kw):
    t = make(use_meta_plasticity=True, **kw)
    return t, t.plasticity


def drive(p, steps, norms, rates, losses, good=True):
    for i in range(steps):
        p.block_norms = torch.tensor(norms, dtype=torch.float32)
        p._meta(torch.tensor(rates), torch.tensor(losses(i) if callable(losses) else losses), torch.tensor(good))


def test_healthy_block_on_a_plateau_speeds_up_to_the_bound():
    _, p = meta(meta_max=1.5)
    drive(p, 60, [1.0, 1.0], [0.1, 0.1], 4.0)
    assert torch.allclose(p.m_lr, torch.full((2,), 1.5)) and torch.allclose(p.m_stdp, torch.full((2,), 1.5))


def test_high_gradient_norm_slows_that_block_down_to_the_bound():
    _, p = meta(meta_min=0.5)
    drive(p, 60, [50.0, 1.0], [0.1, 0.1], 4.0)
    assert p.m_lr[0].item() == pytest.approx(0.5) and p.m_lr[1].item() > 1.0
    assert p.m_stdp[0].item() == pytest.approx(0.5)


def test_off_target_firing_slows_stdp_not_the_optimizer():
    _, p = meta()
    drive(p, 30, [1.0, 1.0], [0.9, 0.1], 4.0)
    assert p.m_stdp[0] < 1.0 < p.m_stdp[1]
    assert p.m_lr[0] > 1.0


def test_improving_loss_relaxes_multipliers_toward_one():
    _, p = meta()
    p.m_lr = torch.tensor([2.0, 0.5])
    drive(p, 200, [1.0, 1.0], [0.1, 0.1], lambda i: 10.0 * 0.97**i)
    assert torch.allclose(p.m_lr, torch.ones(2), atol=0.05)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_inputs_keep_multipliers_finite_and_in_bounds(bad):
    _, p = meta(meta_min=0.25, meta_max=2.0)
    drive(p, 100, [bad, bad], [bad, 0.1], bad, good=False)
    for m in (p.m_lr, p.m_stdp):
        assert torch.isfinite(m).all() and (m >= 0.25 - 1e-6).all() and (m <= 2.0 + 1e-6).all()
    assert torch.allclose(p.m_lr, torch.full((2,), 0.25))


def test_block_multipliers_reach_the_optimizer_groups_and_shared_groups_stay_at_one():
    t, p = meta()
    p.m_lr = torch.tensor([0.5, 1.5])
    t.group_lr_scale = p.group_lr_scale()
    lr = float(t.current_lr())
    t.train_step(batches(1))
    for group in t.optimizer.param_groups:
        expected = {"blocks.0": 0.5, "blocks.1": 1.5}.get(group["name"], 1.0)
        assert float(group["lr"]) == pytest.approx(lr * expected, rel=1e-5)


def test_meta_plasticity_under_injected_faults_stays_in_bounds():
    t, p = meta(meta_min=0.3, meta_max=1.7)
    t2 = make("loss:nan@2-6,grad:inf@8", use_meta_plasticity=True, meta_min=0.3, meta_max=1.7)
    for b in batches(10):
        t2.train_step([b])
    for m in (t2.plasticity.m_lr, t2.plasticity.m_stdp):
        assert torch.isfinite(m).all() and (m >= 0.3 - 1e-6).all() and (m <= 1.7 + 1e-6).all()
    assert (t2.plasticity.m_lr < 1.0).all(), "six bad steps must slow every block"


def test_state_dict_round_trip_continues_identically():
    a = make(use_stdp=True, stdp_type="bcm", use_meta_plasticity=True)
    for b in batches(3):
        a.train_step([b])
    b_ = make(use_stdp=True, stdp_type="bcm", use_meta_plasticity=True)
    b_.load_state_dict(a.state_dict())
    for batch in batches(2, seed=5):
        a.train_step([batch])
        b_.train_step([batch])
    assert all(torch.equal(x, y) for x, y in zip(synapses(a), synapses(b_)))
    assert torch.equal(a.plasticity.m_lr, b_.plasticity.m_lr)
    assert all(torch.equal(x, y) for x, y in zip(a.plasticity.theta, b_.plasticity.theta))


def test_meta_plasticity_off_leaves_every_group_at_the_scheduled_rate():
    t = make("loss:nan@2", use_stdp=True, use_meta_plasticity=False)
    for b in batches(4):
        t.train_step([b])
    assert torch.equal(t.group_lr_scale, torch.ones_like(t.group_lr_scale))
    assert torch.equal(t.plasticity.m_lr, torch.ones(2))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fault", [None, "plasticity:nan@2"])
def test_all_blocks_at_once_apply_what_block_by_block_applies(rule, fault, monkeypatch):
    """The batched STDP (every block in a few ops) against the block-by-block reference (the
    path of sharded weights): the same synapses, counters and BCM thresholds, a dropped NaN
    change and a clipped oversized one included."""
    from stability.plasticity import PlasticityController

    twins = [make(fault=fault, use_stdp=True, stdp_type=rule, stdp_learning_rate=50.0,
                  guard={"plasticity_max_norm": 0.05}) for _ in range(2)]
    monkeypatch.setattr(twins[1].plasticity, "_stdp_all", twins[1].plasticity._stdp_blockwise)
    for x, y in batches(4, vocab=32):
        for t in twins:
            t.train_step([(x, y)])
    a, b = (t.plasticity for t in twins)
    assert isinstance(b, PlasticityController) and int(a.clipped.sum()) > 0
    for w_a, w_b in zip(synapses(twins[0]), synapses(twins[1])):
        torch.testing.assert_close(w_a, w_b, rtol=1e-5, atol=1e-7)
    for name in ("dropped", "clipped", "applied"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if fault:
        assert int(a.dropped.sum()) == len(a.synapses), "the NaN reached every block's change, and was dropped"
    if rule == "bcm":
        torch.testing.assert_close(torch.stack(a.theta), torch.stack(b.theta))
