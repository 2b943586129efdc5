import io
import json
import math
import sys

import numpy as np
import pytest

from stability.config import ConfigError
from stability.reporting import Reporter, read_records


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: a carriage return goes back to column 0 and
    what follows overwrites the line; a newline starts the next one."""
    lines, col = [""], 0
    for ch in text:
        if ch == "\n":
            lines.append("")
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + ch + line[col + 1:]
            col += 1
    shown = [line.rstrip() for line in lines]
    return shown[:-1] if shown[-1] == "" else shown


def test_a_line_on_a_terminal_is_printed_whole_above_the_bar():
    tty = Terminal()
    r = Reporter(None, tty)
    for step in range(1, 6):
        r.progress(step, 10, "task 1 epoch 1")
    r.line("step 5: loss=1")
    shown = screen(tty.getvalue())
    assert shown[0] == "step 5: loss=1", "the bar was cleared before the line"
    assert len(shown) == 2 and shown[1].startswith("task 1 epoch 1:") and " 5/10 " in shown[1]


def test_a_log_that_is_not_a_terminal_gets_each_line_once_and_no_bar():
    log = io.StringIO()
    r = Reporter(None, log)
    for step in range(1, 101):
        r.progress(step, 100, "task 1 epoch 1")
        if step % 50 == 0:
            r.step(step, 1, 2.0, 0.5, 1e-3, 1.0, 100.0, "healthy", 0, {})
    expected = [f"step {s}: loss=2.0000 grad_norm=0.500 lr=1.000e-03 scale=1 tok/s=100 band=healthy"
                for s in (50, 100)]
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == expected


def test_bar_can_be_forced_and_suppressed():
    forced, never = io.StringIO(), Terminal()
    Reporter(None, forced, progress="bar").progress(1, 2)
    Reporter(None, never, progress="lines").progress(1, 2)
    assert "1/2" in forced.getvalue() and never.getvalue() == ""


def test_the_bar_shows_loss_skips_and_tokens_per_second_of_the_last_sync_point():
    tty = Terminal()
    r = Reporter(None, tty)
    r.progress(4, 10, "task 1 epoch 1")
    r.step(4, 1, 2.5, 0.3, 1e-3, 1.0, 1234.0, "healthy", 1, {"overflow": 1}, skipped_total=3)
    bar = screen(tty.getvalue())[-1]
    assert " 4/10 " in bar and "loss=2.5000 skips=3 tok/s=1234" in bar


def test_a_rollback_moves_the_bar_back_and_a_new_task_restarts_it():
    tty = Terminal()
    r = Reporter(None, tty)
    r.progress(8, 10, "task 1 epoch 1")
    r.progress(5, 10, "task 1 epoch 1")  # rolled back to step 5
    r.line("rolled back")
    assert " 5/10 " in screen(tty.getvalue())[-1]
    r.progress(3, 20, "task 2 epoch 1")
    r.line("task 2")
    assert screen(tty.getvalue())[-1].startswith("task 2 epoch 1:") and " 3/20 " in screen(tty.getvalue())[-1]


def test_a_finished_bar_stays_on_screen_and_later_lines_go_below_it():
    tty = Terminal()
    r = Reporter(None, tty)
    for step in range(1, 11):
        r.progress(step, 10, "task 1 epoch 1")
    r.line("done: 10 steps")
    shown = screen(tty.getvalue())
    assert len(shown) == 2 and " 10/10 " in shown[0] and shown[1] == "done: 10 steps"


# --- TensorBoard ------------------------------------------------------------------------


def event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``directory``, by tag, in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            for v in event.summary.value:
                found.setdefault(v.tag, []).append((event.step, v.simple_value))
    return found


def jsonl_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold for metrics.jsonl ``records``: every number of a record
    (in lists and dicts too, by index and key) at the record's step, as float32."""
    want: dict[str, list[tuple[int, float]]] = {}

    def add(tag, value, step):
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            want.setdefault(tag, []).append((step, float(np.float32(value))))
        elif isinstance(value, dict):
            for key, v in value.items():
                add(f"{tag}/{key}", v, step)
        elif isinstance(value, list) and not any(isinstance(v, (dict, str)) for v in value):
            for i, v in enumerate(value):
                add(f"{tag}/{i}", v, step)

    for rec in records:
        for name, value in rec.items():
            if name not in ("kind", "step"):
                add(f"{rec['kind']}/{name}", value, rec["step"])
    return want


def assert_same_scalars(found, want):
    assert sorted(found) == sorted(want)
    for tag in want:
        assert len(found[tag]) == len(want[tag]), tag
        for (s1, v1), (s2, v2) in zip(found[tag], want[tag]):
            assert s1 == s2 and (v1 == v2 or (math.isnan(v1) and math.isnan(v2))), (tag, s1, v1, s2, v2)


def _write_some(r: Reporter) -> None:
    r.step(4, 1, 2.5, 0.25, 1e-3, 1024.0, 900.0, "healthy", 1, {"nonfinite_loss": 1, "overflow": 0},
           skipped_total=1, plasticity={"dropped": [0, 1], "m_lr": [1.0, 0.5]})
    r.record("skip", step=3, epoch=1, reason="nonfinite_loss", loss=math.nan, grad_norm=math.inf,
             loss_scale=1024.0, batches=[{"task": 0, "epoch": 0, "index": 7, "files": ["a.py"]}])
    r.record("blocks", step=4, grad_norm=[0.1, 0.2], firing_rate_pre=[0.125, 0.25], mamba_delta=None)
    r.epoch_summary(1, 1, "epoch 1", step=4, val_loss=2.25, complete=True, task_name="all")


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tmp_path):
    r = Reporter(tmp_path, io.StringIO(), tensorboard=True)
    _write_some(r)
    r.close()
    found = event_scalars(tmp_path / "tensorboard")
    assert_same_scalars(found, jsonl_scalars(read_records(tmp_path / "metrics.jsonl")))
    assert found["blocks/grad_norm/1"] == [(4, float(np.float32(0.2)))]
    assert "blocks/mamba_delta" not in found and "step/band" not in found and "epoch/complete" not in found
    assert math.isnan(found["skip/loss"][0][1]) and found["skip/grad_norm"] == [(3, math.inf)]


def test_a_resume_leaves_tensorboard_with_exactly_the_records_metrics_jsonl_kept(tmp_path):
    r = Reporter(tmp_path, io.StringIO(), tensorboard=True)
    _write_some(r)
    offset = r.offset()
    r.record("step", step=8, loss=1.5)  # written after the checkpoint: the resume drops it
    r.close()
    resumed = Reporter(tmp_path, io.StringIO(), tensorboard=True)
    resumed.truncate_to(offset)
    resumed.record("step", step=8, loss=1.75)
    resumed.close()
    found = event_scalars(tmp_path / "tensorboard")
    assert found["step/loss"] == [(4, 2.5), (8, 1.75)]
    assert_same_scalars(found, jsonl_scalars(read_records(tmp_path / "metrics.jsonl")))


def test_tensorboard_without_the_package_names_the_flag_and_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ConfigError, match=r"--tensorboard .*pip install 'lsnn\[tensorboard\]'"):
        Reporter(tmp_path, io.StringIO(), tensorboard=True)
    assert not (tmp_path / "tensorboard").exists()


def test_a_rank_without_an_output_dir_writes_no_tensorboard_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # never imported: no error
    r = Reporter(None, io.StringIO(), tensorboard=True)
    _write_some(r)
    r.close()
    assert list(tmp_path.iterdir()) == []


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


def test_a_record_the_disk_refuses_is_dropped_whole_with_one_warning(tmp_path, monkeypatch):
    import errno
    import io as _io

    out = _io.StringIO()
    r = Reporter(tmp_path, out)
    r.record("step", step=1)
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def truncate(self, n):
            return self.f.truncate(n)

        def write(self, data):
            self.f.write(bytes(data[:5]))  # part of it reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    r.record("step", step=2)
    r.record("step", step=3)
    monkeypatch.undo()
    r.record("step", step=4)
    assert [x["step"] for x in read_records(tmp_path / "metrics.jsonl")] == [1, 4], "no half line, nothing lost but 2, 3"
    assert out.getvalue().count("could not append") == 1
