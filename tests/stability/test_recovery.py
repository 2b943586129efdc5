import contextlib

import pytest
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
    r = Recovery(GuardConfig(snapshot_every=10, rollback_after=3, max_rollbacks=2))
    assert r.due(0)
    state = {"w": torch.ones(2)}
    r.take(state, "pos", {}, good_steps=5)
    state["w"].add_(1)
    assert torch.equal(r.snapshot.state["w"], torch.ones(2)), "a snapshot is a copy"
    assert not r.due(14) and r.due(15)
    assert not r.needs_rollback(2) and r.needs_rollback(3)
    r.rollback(["a"])
    r.rollback(["b"])
    assert r.exhausted() and r.failed_batches == {"a", "b"}


def test_rollback_before_any_snapshot_is_an_error():
    with pytest.raises(RuntimeError, match="before any snapshot"):
        Recovery(GuardConfig()).rollback([])
