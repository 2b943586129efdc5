"""The health report: reading a messy log, the PNG read back, the HTML in a real browser."""

import base64
import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="lsnn report draws with matplotlib (a default dependency)")
Image = pytest.importorskip("PIL.Image", reason="the PNG is read back with Pillow (comes with matplotlib)")

from stability.healthreport import (  # noqa: E402
    ReportError,
    RunLog,
    band_edges,
    number,
    read_log,
    render,
    summary,
    to_png,
    write_report,
)

BASE_PANELS = ["summary", "loss", "grad_norm", "loss_scale", "events"]


def synthetic_records(blocks: bool = True, tasks: bool = True, n_blocks: int = 2) -> list[dict]:
    """Every kind of record a run writes: NaN/inf as strings, a rollback that re-trains
    steps, skips of known and unknown reasons, blocks and task records, an unknown kind."""
    rng = random.Random(0)
    recs: list[dict] = []

    def step(s: int, task: int = 1) -> None:
        recs.append({"kind": "step", "step": s, "epoch": 1, "loss": 6 * math.exp(-s / 300) + 2 + rng.random() / 10,
                     "grad_norm": 1 + rng.random(), "lr": 1e-3, "loss_scale": 1024.0 * 2 ** (s // 200),
                     "band": "healthy", "skipped": 0, "skip_reason": {}, "task": task})
        if blocks:
            recs.append({"kind": "blocks", "step": s, "task": task,
                         "grad_norm": [0.5 + rng.random() for _ in range(n_blocks)], "param_norm": [10.0] * n_blocks,
                         "firing_rate_pre": [0.1 + 0.05 * i for i in range(n_blocks)],
                         "firing_rate_post": [0.2 + rng.random() / 50 for _ in range(n_blocks)],
                         "membrane_abs": [0.5] * n_blocks, "liquid_abs": [0.3] * n_blocks, "mamba_delta": None,
                         "mamba_state": None, "cross_attn_max_logit": None})

    for s in range(10, 210, 10):
        step(s)
        if s % 50 == 0:
            recs.append({"kind": "band", "step": s - 3, "band": "high", "grad_norm": 5.5})
    recs += [
        {"kind": "skip", "step": 203, "reason": "nonfinite_loss", "loss": "nan", "grad_norm": "nan", "loss_scale": 1024.0},
        {"kind": "skip", "step": 204, "reason": "overflow", "loss": 3.0, "grad_norm": "inf", "loss_scale": 512.0},
        {"kind": "skip", "step": 205, "reason": "loss_spike", "loss": 30.0, "grad_norm": 20.0, "batches": [{"task": 0}]},
        {"kind": "skip", "step": 206, "reason": "a_reason_from_the_future", "loss": 3.0, "grad_norm": 2.0},
    ]
    step(210)  # trained, then undone by the rollback
    recs.append({"kind": "rollback", "step": 210, "to_step": 200, "reason": "overflow", "source": "memory"})
    for s in range(210, 410, 10):
        step(s)
    recs.append({"kind": "epoch", "task": 1, "epoch": 1, "step": 400, "train_loss": 2.5, "val_loss": 2.7,
                 "val_ppl": 14.9, "val_acc": 0.3, "unigram_loss": 4.5, "unigram_acc": 0.05, "complete": True})
    if tasks:
        recs.append({"kind": "task", "step": 400, "task": 1, "losses": [2.7, 5.1], "average_loss": 2.7,
                     "forgetting": 0.0})
        for s in range(410, 610, 10):
            step(s, task=2)
        recs.append({"kind": "task", "step": 600, "task": 2, "losses": [3.1, 3.0], "average_loss": 3.05,
                     "forgetting": 0.4})
    recs.append({"kind": "a_kind_from_the_future", "step": 1, "payload": [1, 2]})
    return recs


def write_run(root: Path, records: list[dict], garbage: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model": {}, "guard": {"band_healthy": 0.4, "band_high": 4.0,
                                                                          "band_critical": 8.0}}))
    lines = [json.dumps(r) for r in records]
    if garbage:
        lines.insert(3, "{cut short by a crash")
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --- reading ------------------------------------------------------------------------------


def test_number_reads_nan_and_inf_written_as_strings():
    assert math.isnan(number("nan")) and number("inf") == math.inf and number("-inf") == -math.inf
    assert number(3) == 3.0 and math.isnan(number(None)) and math.isnan(number("fast")) and math.isnan(number([1]))


def test_a_rollback_keeps_the_latest_value_per_step_and_sets_the_undone_aside():
    log = RunLog.from_records([
        {"kind": "step", "step": 10, "loss": 5.0}, {"kind": "step", "step": 20, "loss": 4.0},
        {"kind": "step", "step": 30, "loss": "nan"},
        {"kind": "rollback", "step": 30, "to_step": 10},
        {"kind": "step", "step": 20, "loss": 4.5}, {"kind": "step", "step": 30, "loss": 4.2},
    ])
    assert log.series("loss") == ([10, 20, 30], [5.0, 4.5, 4.2])
    assert [(r["step"], r["loss"]) for r in log.abandoned_steps] == [(20, 4.0), (30, "nan")]
    assert len(log.rollbacks) == 1


def test_read_log_counts_lines_that_do_not_parse_and_ignores_unknown_kinds(tmp_path):
    write_run(tmp_path, synthetic_records())
    log = read_log(tmp_path / "metrics.jsonl")
    assert log.bad_lines == 1
    assert len(log.skips) == 4 and sorted(log.tasks) == [1, 2] and len(log.epochs) == 1
    assert read_log(tmp_path / "absent.jsonl").steps == {}


def test_band_edges_come_from_the_config_or_the_defaults():
    assert band_edges({"guard": {"band_healthy": 0.4, "band_high": 4.0, "band_critical": 8.0}}) == (0.4, 4.0, 8.0)
    assert band_edges({}) == (0.5, 5.0, 10.0)
    assert band_edges({"guard": {"band_high": "nan"}})[1] == 5.0


def test_summary_counts_skips_by_reason_and_lists_rollbacks():
    rows = dict(summary(RunLog.from_records(synthetic_records())))
    assert rows["steps"] == "600"
    assert rows["skipped steps"] == "nonfinite_loss 1, overflow 1, loss_spike 1, a_reason_from_the_future 1"
    assert rows["rollbacks"] == "step 210 -> 200"
    assert rows["final validation"].startswith("loss 2.7000")
    assert "forgetting +0.4000" in rows["continual learning"]
    empty = dict(summary(RunLog()))
    assert empty["steps"] == "no step records yet" and empty["final validation"] == "no epoch record yet"


# --- the PNG ------------------------------------------------------------------------------


def _panels(fig) -> dict[str, tuple[int, int, int, int]]:
    """name -> (top, bottom, left, right) pixel rows/columns of each panel in the saved PNG."""
    height = fig.bbox.height
    out = {}
    for ax in fig.axes:
        if ax.get_gid():
            box = ax.get_window_extent()
            out[ax.get_gid()] = (int(height - box.y1), int(height - box.y0), int(box.x0), int(box.x1))
    return out


def _colored_fraction(pixels: np.ndarray) -> float:
    """Share of saturated pixels: data and bands are coloured, axes, grid and text are grey."""
    rgb = pixels[..., :3].astype(int)
    return float(((rgb.max(-1) - rgb.min(-1)) > 40).mean())


def _read_png(data: bytes) -> np.ndarray:
    from io import BytesIO

    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def test_the_png_has_every_panel_drawn(tmp_path):
    write_run(tmp_path, synthetic_records())
    png_path, _ = write_report(tmp_path)
    fig = render(read_log(tmp_path / "metrics.jsonl"), (0.4, 4.0, 8.0), "t")
    image = _read_png(to_png(fig))
    written = np.asarray(Image.open(png_path).convert("RGB"))
    assert written.shape == image.shape
    assert written.shape[1] == 1200 and written.shape[0] == round(fig.get_figheight() * 100)
    panels = _panels(fig)
    assert list(panels) == [*BASE_PANELS, "block_grads", "firing", "tasks"]
    for name, (top, bottom, left, right) in panels.items():
        region = written[top:bottom, left:right]
        if name != "summary":  # the events panel holds a few markers only
            assert _colored_fraction(region) > (0.002 if name == "events" else 0.005), f"panel {name} looks blank"
        assert region.std() > 5, f"panel {name} has no contrast"


def test_without_blocks_or_tasks_their_panels_are_left_out():
    fig = render(RunLog.from_records(synthetic_records(blocks=False, tasks=False)), (0.5, 5.0, 10.0), "t")
    to_png(fig)
    assert list(_panels(fig)) == BASE_PANELS


def test_an_empty_panel_differs_from_a_drawn_one():
    # the check above must bite: a run with no records yet leaves the loss panel uncoloured
    fig = render(RunLog(), (0.5, 5.0, 10.0), "t")
    image = _read_png(to_png(fig))
    top, bottom, left, right = _panels(fig)["loss"]
    assert _colored_fraction(image[top:bottom, left:right]) < 0.001


def test_a_run_without_records_still_gets_a_report(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # started, nothing logged yet
    png, page = write_report(tmp_path)
    assert png.stat().st_size > 0 and "no step records yet" in page.read_text()


def test_a_missing_run_directory_is_named(tmp_path):
    with pytest.raises(ReportError, match="missing: no such run directory"):
        write_report(tmp_path / "missing")


# --- the HTML -----------------------------------------------------------------------------


def test_the_html_is_self_contained(tmp_path):
    write_run(tmp_path, synthetic_records())
    png, page = write_report(tmp_path)
    text = page.read_text()
    assert not re.search(r"(?:src|href)=\"(?!data:)", text), "no external file or URL"
    assert "http://" not in text and "https://" not in text
    data = re.search(r'<img id="report"[^>]*src="data:image/png;base64,([^"]+)"', text)
    assert data and base64.b64decode(data.group(1)) == png.read_bytes()
    assert '<table id="tasks">' in text and "<td>5.1000</td>" in text
    assert "a_reason_from_the_future 1" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2000", *mode, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True)


# The healthy band's colour (#b8e6b8 at alpha 0.6 on white), as the browser paints it.
_HEALTHY = np.array([212, 240, 212])


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_the_html_renders_with_its_plots_in_a_headless_browser(tmp_path):
    run = write_run(tmp_path / "run", synthetic_records())
    _, page = write_report(run)
    dom = _browse(page, tmp_path, "--dump-dom").stdout
    assert re.search(r'<img id="report"[^>]*src="data:image/png;base64,', dom)
    assert "skipped steps" in dom

    def healthy_pixels(html: Path) -> tuple[int, float]:
        shot = tmp_path / f"{html.stem}.png"
        _browse(html, tmp_path, f"--screenshot={shot}")
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        assert pixels.shape[:2] == (2000, 1200)
        near = (np.abs(pixels - _HEALTHY).max(-1) <= 6).sum()
        return int(near), _colored_fraction(pixels)

    drawn, colored = healthy_pixels(page)
    assert drawn > 5000, "the gradient-norm panel's healthy band must be on screen: the image decoded"
    assert colored > 0.05
    broken = tmp_path / "broken.html"  # the control: the same page, its image data cut short
    broken.write_text(re.sub(r"base64,[^\"]+", "base64,AAAA", page.read_text()))
    assert healthy_pixels(broken)[0] < 100, "the check must fail for an image that does not decode"
