import contextlib

import torch

from stability.config import GuardConfig
from stability.recovery import Recovery, diagnose
from stability.trainer import lm_loss
from tests.tiny import TinyLM, batches


def test_diagnosis_names_the_corrupt_weight_and_the_first_module_it_poisons():
    model = TinyLM()
    with torch.no_grad():
        model.blocks[1][0].weight[0, 0] = float("nan")
    d = diagnose(model, batches(1)[0], lm_loss, contextlib.nullcontext)
    assert d.nonfinite_weights == ["blocks.1.0.weight"]
    assert d.nonfinite_activations[0] == "blocks.1.0", "blocks.0 is still finite"
    assert "blocks.0.0.weight" in d.nonfinite_grads and d.loss != d.loss
    assert "non-finite weights: blocks.1.0.weight" in d.lines()


def test_diagnosis_of_a_healthy_model_finds_nothing_and_leaves_no_grads():
    model = TinyLM()
    d = diagnose(model, batches(1)[0], lm_loss, contextlib.nullcontext)
    assert d.nonfinite_weights == d.nonfinite_activations == d.nonfinite_grads == []
    assert all(p.grad is None for p in model.parameters())


def test_snapshots_are_due_every_n_good_steps_and_rollbacks_are_bounded():
    r = Recovery(GuardConfig(snapshot_every=10, rollback_after=3, max_rollbacks=2, rollback_lr_factor=0.5))
    assert r.due(0)
    r.take({"w": torch.ones(2)}, step=6, good_steps=5)
    assert not r.due(14) and r.due(15)
    assert not r.needs_rollback(2) and r.needs_rollback(3)
    assert not r.exhausted() and r.lr_factor == 1.0
    r.rollbacks = 2
    assert r.exhausted() and r.lr_factor == 0.25


def test_recovery_state_survives_a_restart_without_its_snapshot():
    r = Recovery(GuardConfig(snapshot_every=10))
    r.take({"w": torch.ones(2)}, step=6, good_steps=5)
    r.rollbacks = 1
    again = Recovery(GuardConfig(snapshot_every=10))
    again.load_state_dict(r.state_dict())
    assert again.snapshot is None, "the state itself is on disk, not in the checkpoint twice"
    assert again.rollbacks == 1 and not again.due(14) and again.due(15)
