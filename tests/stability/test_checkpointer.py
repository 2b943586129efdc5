"""The checkpoint composed from the run's parts: every part restored on resume, all but
recovery and the run's own on rollback, a missing part named, and checkpoints written
before the parts kept their own state (format 1) resumed or refused by name."""

from __future__ import annotations

import io

import pytest
import torch

from stability.checkpoint import CheckpointDir, rng_state
from stability.checkpointer import PARTS, Checkpointer, IncompatibleCheckpoint, load_for_resume, upgrade
from stability.config import GuardConfig
from stability.continual import ReplayBuffer
from stability.distributed import Dist
from stability.monitor import Monitor
from stability.preflight import BadInput
from stability.recovery import Recovery, StepLedger
from stability.reporting import Reporter
from stability.stream import Position
from tests.tiny_data import tiny_stream


class FakeTrainer:
    """The trainer's part of the protocol: weights (checked finite on every write) and counts."""

    def __init__(self):
        self.w, self.step = torch.zeros(3), 0

    def state_dict(self):
        return {"model": {"w": self.w.clone()}, "step": self.step, "attempt": self.step}

    def load_state_dict(self, state):
        self.w, self.step = state["model"]["w"].clone(), state["step"]


class Value:
    """A part that is one value (the tasks, the run)."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _checkpointer(tmp_path) -> Checkpointer:
    report = Reporter(tmp_path, io.StringIO())
    replay = ReplayBuffer(capacity=4, strategy="uniform", seed=0)
    return Checkpointer(CheckpointDir(tmp_path / "checkpoints", keep=3), report, Dist(), trainer=FakeTrainer(),
                        stream=tiny_stream(replay=replay), monitor=Monitor(report, GuardConfig(), 0.5, 4, 0),
                        ledger=StepLedger(horizon=10), recovery=Recovery(GuardConfig()), tasks=Value("task 1"),
                        run=Value("healthy"))


def _train(cp: Checkpointer, steps: int, tag: str) -> None:
    """Move every part on as ``steps`` steps of a run would, each by its own methods."""
    for _ in range(steps):
        window = cp.stream.next_window()
        cp.stream.advance(window)
        cp.trainer.step += 1
        cp.trainer.w = cp.trainer.w + 1
        cp.parts["ledger"].record(cp.trainer.step, window.positions)
    cp.parts["monitor"].rows([[1.0, 1.0, 0.0, 1.0, 1.0, 1e-3]] * 4, cp.trainer.step)
    cp.parts["monitor"].tally([{"step": cp.trainer.step, "loss": 2.0, "grad_norm": 1.0, "reason": "ok",
                               "band": "healthy", "scale": 1.0, "lr": 1e-3}], epoch=1)
    cp.stream.quarantine([Position(1, 1, cp.trainer.step % 3)], cp.trainer.step, tag)
    cp.recovery.rollbacks += 1
    cp.parts["tasks"].value = cp.parts["run"].value = tag


def _seen(cp: Checkpointer) -> dict:
    """What each part holds, comparable."""
    replay = cp.stream.replay.state_dict()
    return {"trainer": (cp.trainer.step, cp.trainer.w.tolist()),
            "stream": (cp.stream.position, dict(cp.stream.quarantined)),
            "replay": (replay["tasks"], replay["rng"]), "monitor": cp.parts["monitor"].state_dict(),
            "ledger": cp.parts["ledger"].state_dict(), "recovery": cp.recovery.state_dict(),
            "tasks": cp.parts["tasks"].value, "run": cp.parts["run"].value}


def test_every_part_is_restored_from_its_own_key_through_a_file(tmp_path):
    cp = _checkpointer(tmp_path)
    _train(cp, 3, "a")
    assert cp.save(keep=False)
    saved = _seen(cp)
    _train(cp, 2, "b")
    assert _seen(cp) != saved
    state, path = load_for_resume(cp.directory, print)
    assert set(PARTS) <= set(state) and state["format"] == 2
    assert "position" not in state, "the data position is the stream's, stored once"
    cp.resume(state, path)
    assert _seen(cp) == saved
    assert cp.saved_step == 3


def test_a_rollback_rewinds_every_part_but_what_recovery_and_the_run_learnt_since(tmp_path):
    cp = _checkpointer(tmp_path)
    _train(cp, 3, "a")
    good = cp.state_dict()
    before = _seen(cp)
    _train(cp, 2, "b")
    after = _seen(cp)
    cp.rewind(good)
    now = _seen(cp)
    for part in ("trainer", "replay", "tasks"):
        assert now[part] == before[part], part
    assert now["stream"] == (before["stream"][0], after["stream"][1]), "the position goes back, the quarantine stays"
    assert now["monitor"]["last_sync_step"] == 3 and now["monitor"]["totals"] == after["monitor"]["totals"]
    assert now["ledger"]["step"] == 3 and [s for s, _, _ in now["ledger"]["steps"]] == [1, 2, 3]
    assert now["recovery"] == after["recovery"] and now["run"] == "b", "what recovery and the run learnt stays"


def test_a_checkpoint_without_a_part_is_refused_naming_it(tmp_path):
    cp = _checkpointer(tmp_path)
    for part in PARTS:
        state = cp.state_dict()
        del state[part]
        with pytest.raises(IncompatibleCheckpoint, match=f"no state for {part};.*start over without --resume"):
            upgrade(state, tmp_path / "last.pt")


def test_resume_refuses_a_checkpoint_of_an_unknown_format_by_name(tmp_path):
    cp = _checkpointer(tmp_path)
    _train(cp, 1, "a")
    cp.directory.save({**cp.state_dict(), "format": 3}, keep=False)
    with pytest.raises(BadInput, match=r"--resume: .*last.pt is a checkpoint of format 3; this version of lsnn "
                                       r"reads formats 1-2.*start over without --resume \(with --overwrite\)"):
        load_for_resume(cp.directory, print)


def test_last_good_hands_out_copies_so_a_snapshot_restores_the_same_state_twice(tmp_path):
    cp = _checkpointer(tmp_path)
    _train(cp, 2, "a")
    cp.recovery.take(cp.state_dict(), cp.trainer.step, good_steps=2)
    first = cp.last_good()
    first.state["trainer"]["model"]["w"].add_(100)  # what loading and training on would do to it
    assert torch.equal(cp.last_good().state["trainer"]["model"]["w"], torch.full((3,), 2.0))
    assert first.source == "the in-memory snapshot of step 2" and not first.on_disk


def test_a_kept_checkpoint_newer_than_the_snapshot_is_the_good_state(tmp_path):
    cp = _checkpointer(tmp_path)
    cp.recovery.take(cp.state_dict(), 0, good_steps=0)
    _train(cp, 2, "a")
    assert cp.save(keep=True)
    good = cp.last_good()
    assert good.state["trainer"]["step"] == 2 and good.on_disk and good.source == "checkpoints/step-00000002.pt"


# --- checkpoints written before each part kept its own state -------------------------------


def _format_1(cp: Checkpointer) -> dict:
    """A checkpoint in the layout lsnn wrote before format 2 (``Run._state`` at d9394dd):
    the monitor's, the ledger's and the run's state under "window", the tasks' under
    "continual" and "best_val", the data position twice, no "format"."""
    monitor, ledger = cp.parts["monitor"].state_dict(), cp.parts["ledger"].state_dict()
    return {
        "trainer": cp.trainer.state_dict(),
        "position": cp.stream.position.as_dict(),
        "stream": cp.stream.state_dict(),
        "ranks": [{"rng": rng_state(), **cp.stream.rank_state_dict()}],
        "best_val": 2.5,
        "window": {"last_sync_step": monitor["last_sync_step"], "totals": monitor["totals"], "healthy": False,
                   "last_pos": ledger["last"], "steps": ledger["steps"]},
        "continual": {"matrix": [[3.0]], "task_start_step": 2, "ewc": None},
        "recovery": cp.recovery.state_dict(),
        "metrics_offset": 17,
        "config": {"model": {}},
        "corpus": "abc",
        "kept": False,
    }


def test_a_format_1_checkpoint_gives_each_part_its_own_state(tmp_path):
    cp = _checkpointer(tmp_path)
    _train(cp, 3, "a")
    old = _format_1(cp)
    before = _seen(cp)
    new = upgrade(old, tmp_path / "last.pt")
    assert new["run"] == {"config": {"model": {}}, "corpus": "abc", "healthy": False, "metrics_offset": 17}
    assert new["tasks"] == {"matrix": [[3.0]], "task_start_step": 2, "ewc": None, "best_val": 2.5}
    assert "position" not in new and new["stream"]["position"] == old["position"]
    _train(cp, 2, "b")
    cp.parts["tasks"], cp.parts["run"] = Value(None), Value(None)  # state dicts of their own shape below
    cp.parts["tasks"].load_state_dict = lambda s: setattr(cp.parts["tasks"], "value", s)
    cp.parts["run"].load_state_dict = lambda s: setattr(cp.parts["run"], "value", s)
    cp.load_state_dict(new)
    now = _seen(cp)
    for part in ("trainer", "stream", "replay", "monitor", "ledger", "recovery"):
        assert now[part] == before[part], part
    assert now["tasks"] == new["tasks"] and now["run"] == new["run"]


def test_a_checkpoint_of_no_known_layout_is_refused(tmp_path):
    with pytest.raises(IncompatibleCheckpoint, match="format None"):
        upgrade({"trainer": {}}, tmp_path / "last.pt")
