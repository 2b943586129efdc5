import io
import json
import math

from stability.reporting import Reporter, read_records


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    plain, tty = io.StringIO(), Terminal()
    for stream in (plain, tty):
        r = Reporter(None, stream)
        r.progress(5, 10)
        r.line("step 5: loss=1")
    assert "\r" not in plain.getvalue() and "[" not in plain.getvalue()
    assert "[###############...............] 5/10" in tty.getvalue()
    assert tty.getvalue().endswith("\r\033[Kstep 5: loss=1\n"), "a line clears the bar first"


def test_bar_can_be_forced_and_suppressed():
    forced, never = io.StringIO(), Terminal()
    Reporter(None, forced, progress="bar").progress(1, 2)
    Reporter(None, never, progress="lines").progress(1, 2)
    assert "1/2" in forced.getvalue() and never.getvalue() == ""


def test_epoch_summary_is_printed_and_recorded_once_per_task_epoch(tmp_path):
    out = io.StringIO()
    r = Reporter(tmp_path, out)
    assert r.epoch_summary(1, 1, "epoch 1/2: ...", val_loss=2.0)
    assert not r.epoch_summary(1, 1, "epoch 1/2: ...", val_loss=2.0)
    assert r.epoch_summary(2, 1, "task 2 epoch 1/2: ...", val_loss=2.0)
    assert out.getvalue().splitlines() == ["epoch 1/2: ...", "task 2 epoch 1/2: ..."]
    assert [(x["task"], x["epoch"]) for x in read_records(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 1)]


def test_nonfinite_values_stay_parseable_json(tmp_path):
    Reporter(tmp_path, io.StringIO()).record("skip", loss=math.nan, grad_norm=math.inf, nested=[-math.inf])
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(raw) == {"kind": "skip", "loss": "nan", "grad_norm": "inf", "nested": ["-inf"]}


def test_truncate_to_a_checkpoints_offset_keeps_what_was_written_before_it(tmp_path):
    r = Reporter(tmp_path, io.StringIO())
    for step in (2, 4):
        r.record("step", step=step)
    r.epoch_summary(1, 1, "epoch 1", step=4)
    r.record("task", step=4, task=1)
    offset = r.offset()
    r.record("step", step=6)
    r.record("step", step=3)  # re-trained after a rollback: a lower step number, later in the file
    resumed = Reporter(tmp_path, io.StringIO())
    resumed.truncate_to(offset)
    assert [x.get("step") for x in read_records(tmp_path / "metrics.jsonl")] == [2, 4, 4, 4]
    assert not resumed.epoch_summary(1, 1, "epoch 1", step=4), "already reported before the stop"
    assert not resumed.once(("task", 1)) and resumed.once(("task", 2))


def test_a_last_line_cut_short_by_a_crash_is_left_out_when_reading(tmp_path):
    Reporter(tmp_path, io.StringIO()).record("step", step=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')
    assert read_records(tmp_path / "metrics.jsonl") == [{"kind": "step", "step": 2}]


def test_a_partial_summary_at_max_steps_does_not_hide_the_epochs_real_end(tmp_path):
    r = Reporter(tmp_path, io.StringIO())
    assert r.epoch_summary(1, 1, "epoch 1 (stopped)", step=4, complete=False)
    assert not r.epoch_summary(1, 1, "epoch 1 (stopped)", step=4, complete=False)
    assert r.epoch_summary(1, 1, "epoch 1", step=9, complete=True)
    assert not r.epoch_summary(1, 1, "epoch 1", step=9, complete=True)
