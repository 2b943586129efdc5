import pytest
import torch

from stability.checkpoint import (
    CorruptStateError,
    atomic_write_bytes,
    copy_checkpoint,
    load_checkpoint,
    nonfinite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float = 1.0):
    weights = {"w": torch.full((3,), value), "step": torch.tensor(4)}
    return {"trainer": {"model": weights, "step": 4}, "note": "x"}, weights


def test_round_trip_loads_with_weights_only(tmp_path):
    state, weights = _state()
    save_checkpoint(tmp_path / "c.pt", state, weights)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["trainer"]["model"]["w"], weights["w"]) and loaded["note"] == "x"


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


def test_a_crash_mid_write_leaves_the_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"previous")

    def crash(f):
        f.write(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, crash)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_copy_and_missing_file(tmp_path):
    state, weights = _state()
    save_checkpoint(tmp_path / "a.pt", state, weights)
    copy_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nonfinite_tensors_ignores_integer_state():
    assert nonfinite_tensors({"a": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])}) == ["a"]


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
