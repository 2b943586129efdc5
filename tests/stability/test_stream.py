"""The data stream, the one owner of the data position: the window protocol, the
quarantine, the rewind a rollback makes, and its state across a restart."""

from __future__ import annotations

import pytest
import torch

from stability.continual import ReplayBuffer
from stability.stream import DataStream, Position
from tests.tiny_data import tiny_stream


def _read_all(stream: DataStream) -> list[tuple]:
    """Every window to the end: its positions and the ends it reports."""
    seen = []
    while not stream.finished:
        w = stream.next_window()
        seen.append((w.positions, w.epoch_end, w.task_end))
        stream.advance(w)
    return seen


def test_a_window_moves_nothing_until_it_is_advanced_past():
    s = tiny_stream()
    w = s.next_window()
    assert w.positions == (Position(0, 0, 0), Position(0, 0, 1)) and w.after == Position(0, 0, 2)
    assert s.next_window() == w and s.position == Position(), "reading is not moving"
    s.advance(w)
    assert s.position == w.after


def test_windows_report_each_epoch_and_task_end_once_in_order():
    seen = _read_all(tiny_stream(batches=(5, 3), epochs=2, accumulation=2))
    ends = [(e, t) for _, e, t in seen if e is not None]
    assert ends == [((0, 0), None), ((0, 1), 0), ((1, 0), None), ((1, 1), 1)]
    # 5 batches in windows of 2: the last window of an epoch is short, never crosses into the next
    assert [len(p) for p, _, _ in seen[:3]] == [2, 2, 1]
    assert [p[0] for p, _, _ in seen[3:6]] == [Position(0, 1, 0), Position(0, 1, 2), Position(0, 1, 4)]


def test_quarantined_batches_are_never_read_and_a_window_of_them_is_empty_but_still_ends_its_epoch():
    s = tiny_stream(batches=(5,), epochs=1, accumulation=2)
    s.quarantine([Position(0, 0, 1), Position(0, 0, 3), Position(0, 0, 4)], step=4, reason="nonfinite_loss")
    seen = _read_all(s)
    assert seen[0][0] == (Position(0, 0, 0), Position(0, 0, 2)), "a window fills up past a quarantined batch"
    assert seen[1] == ((), (0, 0), 0), "only quarantined batches left: an empty window, still the task's end"
    assert s.quarantined[Position(0, 0, 3)] == {"step": 4, "reason": "nonfinite_loss"}


def test_a_second_quarantine_of_a_batch_keeps_the_first_reason():
    s = tiny_stream()
    s.quarantine([Position(0, 0, 1)], step=4, reason="nonfinite_loss")
    s.quarantine([Position(0, 0, 1)], step=9, reason="spike")
    assert s.quarantined[Position(0, 0, 1)] == {"step": 4, "reason": "nonfinite_loss"}


def test_a_rollback_rewinds_the_position_and_keeps_what_was_quarantined_since():
    s = tiny_stream()
    s.advance(s.next_window())
    good = s.state_dict()  # the snapshot: the next batch to read is 2
    for _ in range(2):
        s.advance(s.next_window())
    s.quarantine([Position(0, 0, 2), Position(0, 0, 3)], step=4, reason="nonfinite_loss")
    s.rewind(good)
    assert s.position == Position(0, 0, 2)
    assert set(s.quarantined) == {Position(0, 0, 2), Position(0, 0, 3)}, "the quarantine is what the run learnt"
    assert s.next_window().positions == (Position(0, 0, 4),), "the failed batches are not read again"


def test_the_state_round_trip_restores_the_position_and_the_quarantine():
    s = tiny_stream()
    for _ in range(4):
        s.advance(s.next_window())
    s.quarantine([Position(0, 1, 2), Position(1, 0, 0)], step=7, reason="spike")
    again = tiny_stream()
    again.load_state_dict(s.state_dict())
    assert again.position == s.position == Position(0, 1, 2)
    assert again.quarantined == s.quarantined
    assert _read_all(again) == _read_all(s)


def test_a_resume_replaces_the_quarantine_where_a_rollback_keeps_it():
    s = tiny_stream()
    state = s.state_dict()  # nothing quarantined yet
    s.quarantine([Position(0, 0, 3)], step=2, reason="spike")
    s.load_state_dict(state)
    assert s.quarantined == {}, "a resume is the checkpoint, nothing since"


def test_each_ranks_replay_buffer_round_trips_with_its_rank_state():
    def stream() -> DataStream:
        return tiny_stream(replay=ReplayBuffer(capacity=4, strategy="uniform", seed=3))

    s = stream()
    for _ in range(6):  # into task 1, where batches mix in task 0's sequences
        s.advance(s.next_window())
    again = stream()
    again.load_state_dict(s.state_dict())
    again.load_rank_state_dict(s.rank_state_dict())
    w = s.next_window()
    assert w.positions[0].task == 1
    for (x, y), (x2, y2) in zip(s.batches(w), again.batches(again.next_window()), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_its_own_rows_of_the_same_batch(rank):
    whole = tiny_stream()
    mine = DataStream(whole.tasks, 2, 2, rank=rank, world=2)
    x, y = whole.raw(Position(0, 0, 1))
    xr, yr = mine.raw(Position(0, 0, 1))
    assert torch.equal(xr, x[rank::2]) and torch.equal(yr, y[rank::2])
