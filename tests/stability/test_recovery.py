import contextlib

import torch

from stability.config import GuardConfig, TrainConfig
from stability.recovery import GoodState, Recovery, StepLedger, culprit_modules, diagnose
from stability.stream import Position
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


# --- the snapshot is a copy ------------------------------------------------------------------


def test_a_snapshot_is_a_copy_the_live_weights_and_moments_moving_on_leave_it_as_it_was():
    """A snapshot sharing storage with the live weights once made a two-process test hang
    until the suite's time limit: the rollback restored the weights it was meant to undo."""
    from stability.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(TinyLM(), TrainConfig(learning_rate=1e-2, warmup_steps=1), GuardConfig(), torch.device("cpu"),
                      total_steps=10)
    data = batches(3)
    trainer.train_step([data[0]])  # Adam's moments exist
    live = trainer.state_dict()
    kept = {k: v.clone() for k, v in live["model"].items()}
    moments = {k: v["exp_avg"].clone() for k, v in live["optimizer"]["state"].items()}
    r = Recovery(GuardConfig())
    r.take(live, step=1, good_steps=1)
    for batch in data[1:]:
        trainer.train_step([batch])  # in place: parameters and moments
    snap = r.snapshot.state
    assert all(torch.equal(snap["model"][k], kept[k]) for k in kept)
    assert all(torch.equal(snap["optimizer"]["state"][k]["exp_avg"], moments[k]) for k in moments)
    assert not any(torch.equal(trainer.model.state_dict()[k], kept[k]) for k in kept), "the live weights moved"


# --- the step ledger -------------------------------------------------------------------------

P = [Position(0, 0, i) for i in range(20)]


def _ledger(steps: int, horizon: int = 50) -> StepLedger:
    ledger = StepLedger(horizon)
    for s in range(1, steps + 1):
        ledger.record(s, (P[s - 1],))
    return ledger


def _rows(reasons: dict[int, str]) -> list[dict]:
    return [{"step": s, "reason": r} for s, r in reasons.items()]


def test_the_ledger_keeps_what_each_step_read_until_a_rollback_could_no_longer_look_back_on_it():
    ledger = _ledger(12, horizon=5)
    assert sorted(ledger.entries) == [8, 9, 10, 11, 12]
    assert ledger.read(9) == [P[8]] and ledger.read(3) == [] and ledger.last == P[11]
    assert ledger.reason(9) == "unknown", "not synced yet"
    ledger.settle(_rows({9: "spike"}))
    assert ledger.reason(9) == "spike"


def test_the_failed_steps_are_the_streak_before_the_sync_point_without_fp16_overflows():
    ledger = _ledger(8)
    ledger.settle(_rows({4: "ok", 5: "nonfinite_loss", 6: "overflow", 7: "nonfinite_grad", 8: "nonfinite_loss"}))
    assert ledger.failed_steps(3, 8, scaled=True) == [5, 7, 8], "the loss scale's overflows do not count"
    assert ledger.failed_steps(3, 8, scaled=False) == [6, 7, 8]
    assert ledger.failed_steps(9, 8, scaled=False) == [5, 6, 7, 8], "the streak ends at a good step"


def test_a_rollback_forgets_the_steps_after_its_target_and_keeps_what_was_learnt_of_those_before():
    ledger = _ledger(4)
    good = ledger.state_dict()
    for s in range(5, 9):
        ledger.record(s, (P[s - 1],))
    ledger.settle(_rows({3: "ok", 4: "spike", 5: "nonfinite_loss"}))
    ledger.rewind(good)
    assert sorted(ledger.entries) == [1, 2, 3, 4] and ledger.step == 4 and ledger.last == P[3]
    assert ledger.reason(4) == "spike", "settled after the snapshot, and still true"


def test_the_ledger_state_round_trips_with_reasons_and_the_last_batch():
    ledger = _ledger(6, horizon=4)
    ledger.settle(_rows({5: "spike", 6: "ok"}))
    again = StepLedger(4)
    again.load_state_dict(ledger.state_dict())
    assert again.entries == ledger.entries and again.last == ledger.last and again.step == 6


def test_nonfinite_parameters_are_remembered_until_the_run_is_healthy_again():
    ledger = StepLedger(4)
    ledger.observe(False, [3])
    ledger.observe(False, [1])
    assert culprit_modules(["a.w", "b.w", "b.bias", "c.w"], ledger.nonfinite) == ["b", "c"]
    ledger.observe(True, [])
    assert ledger.nonfinite == set()


# --- the rollback, decided -------------------------------------------------------------------


def _good() -> GoodState:
    return GoodState({"trainer": {"step": 4}}, "the in-memory snapshot of step 4", on_disk=False)


def test_a_rollback_quarantines_the_failed_steps_batches_and_counts_itself():
    r = Recovery(GuardConfig(rollback_after=2, max_rollbacks=2, rollback_lr_factor=0.5))
    ledger = _ledger(6)
    ledger.settle(_rows({4: "ok", 5: "nonfinite_loss", 6: "nonfinite_loss"}))
    plan = r.rollback(2, 6, ledger, scaled=False, target=_good())
    assert plan.target is not None and plan.failed == [P[4], P[5]] and plan.reason == "nonfinite_loss"
    assert r.rollbacks == 1 and r.lr_factor == 0.5
    assert "rolled back to step 4 from the in-memory snapshot of step 4 (rollback 1/2)" in plan.warning(
        4, r.rollbacks, r.cfg, "")


def test_a_rollback_without_a_good_state_or_budget_is_a_stop_and_counts_nothing():
    r = Recovery(GuardConfig(max_rollbacks=1))
    ledger = _ledger(3)
    ledger.settle(_rows({3: "spike"}))
    plan = r.rollback(3, 3, ledger, scaled=False, target=None)
    assert plan.target is None and plan.stop == "3 consecutive skipped steps (last: spike) and no good state"
    r.rollbacks = 1
    plan = r.rollback(3, 3, ledger, scaled=False, target=_good())
    assert plan.target is None and plan.stop.endswith("after 1 rollbacks") and r.rollbacks == 1
