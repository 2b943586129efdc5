import os
import random

import pytest
import torch

from stability.checkpoint import (
    CheckpointDir,
    CorruptStateError,
    UnreadableCheckpoint,
    load_checkpoint,
    nonfinite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float = 1.0, step: int = 4):
    weights = {"w": torch.full((3,), value), "step": torch.tensor(step)}
    return {"trainer": {"model": weights, "step": step}, "note": "x"}, weights


def test_round_trip_loads_with_weights_only(tmp_path):
    state, weights = _state()
    save_checkpoint(tmp_path / "c.pt", state, weights)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["trainer"]["model"]["w"], weights["w"]) and loaded["note"] == "x"
    assert load_checkpoint(tmp_path / "c.pt", mmap=True)["trainer"]["step"] == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_never_written(tmp_path, bad):
    path = tmp_path / "c.pt"
    good, weights = _state()
    save_checkpoint(path, good, weights)
    before = path.read_bytes()
    state, weights = _state(bad)
    with pytest.raises(CorruptStateError, match="non-finite weights in w"):
        save_checkpoint(path, state, weights)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "not ours"])
@pytest.mark.parametrize("seed", range(8))  # random bytes fail torch.load in many different ways
def test_a_corrupt_checkpoint_is_reported_by_name(tmp_path, damage, seed):
    path = tmp_path / "last.pt"
    state, weights = _state()
    save_checkpoint(path, state, weights)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(random.Random(seed).randbytes(len(data) if seed % 2 else 64 + seed))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(UnreadableCheckpoint, match="last.pt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def _save(d: CheckpointDir, step: int, keep: bool) -> None:
    state, _ = _state(float(step), step)
    d.save(state, keep=keep)


def test_kept_checkpoints_are_links_to_last_rotated_to_the_newest_k(tmp_path):
    d = CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3, 4):
        _save(d, step, keep=step != 3)
    assert [s for s, _ in d.kept()] == [2, 4]
    assert os.path.samefile(d.last, d.kept_path(4)), "no second copy of the bytes"
    _save(d, 5, keep=False)
    assert float(load_checkpoint(d.kept_path(4))["trainer"]["model"]["w"][0]) == 4.0
    assert load_checkpoint(d.last)["kept"] is False and load_checkpoint(d.kept_path(4))["kept"] is True


def test_a_rollback_drops_the_kept_checkpoints_after_its_target(tmp_path):
    d = CheckpointDir(tmp_path, keep=5)
    for step in (2, 4, 6):
        _save(d, step, keep=True)
    d.drop_after(4)
    assert [s for s, _ in d.kept()] == [2, 4]


def test_a_snapshot_can_be_kept_and_relink_restores_a_missing_link(tmp_path):
    d = CheckpointDir(tmp_path, keep=3)
    state, _ = _state(7.0, 7)
    d.keep_state(state, 7)
    assert load_checkpoint(d.kept_path(7))["trainer"]["step"] == 7
    _save(d, 9, keep=True)
    d.kept_path(9).unlink()  # as if the run died between writing last.pt and linking it
    d.relink()
    assert [s for s, _ in d.kept()] == [7, 9]


def test_best_is_the_last_checkpoint_when_marked(tmp_path):
    d = CheckpointDir(tmp_path, keep=3)
    _save(d, 3, keep=False)
    d.mark_best()
    _save(d, 4, keep=False)
    assert load_checkpoint(d.best)["trainer"]["step"] == 3


def test_nonfinite_tensors_ignores_integer_state():
    assert nonfinite_tensors({"a": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])}) == ["a"]


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
