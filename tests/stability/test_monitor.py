import io
import math

from stability.config import GuardConfig
from stability.monitor import Monitor, Totals
from stability.reporting import Reporter, read_records


def _row(loss, norm, reason=0, band=1):
    return [loss, norm, float(reason), float(band), 1024.0, 1e-3]


def _monitor(tmp_path, window=4, last=0):
    out = io.StringIO()
    return Monitor(Reporter(tmp_path, out), GuardConfig(), 0.5, window, last), out


def test_rows_come_back_oldest_first_across_the_ring_buffer(tmp_path):
    m, _ = _monitor(tmp_path, window=4, last=7)
    history = [_row(9, 1), _row(10, 1), _row(7, 1), _row(8, 1)]  # step s sits at (s - 1) % 4
    rows = m.rows(history, 10)
    assert [r["step"] for r in rows] == [8, 9, 10]
    assert [r["loss"] for r in rows] == [8, 9, 10]
    assert m.last_sync_step == 10


def test_tally_warns_once_per_skip_and_folds_loud_norms_into_one_line(tmp_path):
    m, out = _monitor(tmp_path)
    rows = m.rows([_row(2.0, 1.0), _row(math.nan, math.nan, reason=1, band=4), _row(2.1, 7.0, band=2),
                   _row(2.2, 12.0, band=3)], 4)
    m.tally(rows, epoch=1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "warning: step 2 skipped (nonfinite_loss): loss=nan grad_norm=nan scale=1024"
    assert lines[1].startswith("warning: steps 3-4: gradient norm high on 1, critical on 1 step(s), max 12.000")
    assert len(lines) == 2
    assert m.totals.skips["nonfinite_loss"] == 1 and m.totals.loss_count == 3
    assert m.totals.train_loss == (2.0 + 2.1 + 2.2) / 3
    kinds = [r["kind"] for r in read_records(tmp_path / "metrics.jsonl")]
    assert kinds == ["skip", "band", "band"]


def test_step_line_averages_only_finite_good_steps(tmp_path):
    m, out = _monitor(tmp_path)
    rows = m.rows([_row(2.0, 1.0), _row(math.inf, math.inf, reason=2, band=4), _row(4.0, 3.0), _row(3.0, 2.0)], 4)
    counters = {"skips": {"ok": 3, "overflow": 1}, "spikes_clipped": 0, "good_steps": 3}
    m.step_line(rows, 4, 1, counters)
    assert "step 4: loss=3.0000 grad_norm=2.000" in out.getvalue()
    (rec,) = read_records(tmp_path / "metrics.jsonl")
    assert rec["skipped"] == 1 and rec["skip_reason"]["overflow"] == 1 and rec["skipped_total"] == 1


def test_plasticity_warnings_report_only_new_drops(tmp_path):
    m, out = _monitor(tmp_path)
    m.plasticity(None, {"dropped": [0, 1], "clipped": [0, 0]}, 10)
    m.plasticity({"dropped": [0, 1], "clipped": [0, 0]}, {"dropped": [0, 1], "clipped": [2, 0]}, 20)
    assert out.getvalue().splitlines() == ["warning: step 10: STDP updates dropped by the guard (block 1 x1)",
                                           "warning: step 20: STDP updates clipped by the guard (block 0 x2)"]


def test_totals_round_trip():
    t = Totals(loss_sum=3.0, loss_count=2, steps=5)
    t.skips["spike"] = 1
    again = Totals.from_state(t.state_dict())
    assert again.state_dict() == t.state_dict()


def _synced(tmp_path, steps: int):
    m, _ = _monitor(tmp_path, window=4)
    rows = m.rows([_row(2.0, 1.0), _row(math.nan, math.nan, reason=1, band=4), _row(2.2, 7.0, band=2),
                   _row(2.4, 1.0)], steps)
    m.tally(rows, epoch=1)
    return m


def test_the_monitor_state_round_trips_the_last_sync_point_and_the_epochs_totals(tmp_path):
    m = _synced(tmp_path, 4)
    again, _ = _monitor(tmp_path / "again")
    again.load_state_dict(m.state_dict())
    assert again.last_sync_step == 4 and again.totals.state_dict() == m.totals.state_dict()


def test_a_rollback_rewinds_the_last_sync_point_but_the_epoch_keeps_counting_what_happened(tmp_path):
    m = _synced(tmp_path, 4)
    good = m.state_dict()
    m.rows([_row(2.0, 1.0)] * 4, 8)
    m.tally([{"step": 5, "loss": math.nan, "grad_norm": math.nan, "reason": "nonfinite_loss", "band": "exploded",
              "scale": 1.0, "lr": 1e-3}], epoch=1)
    m.rewind(good)
    assert m.last_sync_step == 4
    assert m.totals.skips["nonfinite_loss"] == 2, "the summary counts the skips that caused the rollback"


def test_an_epochs_end_starts_the_next_totals_from_nothing(tmp_path):
    m = _synced(tmp_path, 4)
    m.add_tokens(64)
    assert m.totals.steps == 4 and m.tokens == 64
    m.end_epoch()
    assert m.totals.state_dict() == Totals().state_dict()
