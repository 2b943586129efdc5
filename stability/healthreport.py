"""The health report of a run: ``RUN_DIR/report.png`` and a self-contained ``report.html``.

Drawn from ``metrics.jsonl`` (and the band edges of ``config.json``), top to bottom:

    summary        steps, final losses, skips by reason, rollbacks, the stop, if any
    loss           training (per logging window) and validation loss, the unigram baseline
    grad norm      log axis; low/healthy/high/critical bands shaded; loud steps and skips
    loss scale     log axis (flat at 1 without fp16 loss scaling)
    events         skipped steps by reason, rollbacks
    blocks         per-block gradient norms and firing rates (``kind: "blocks"`` records)
    tasks          the continual-learning task matrix as a heat map (``kind: "task"``)

The log is read as it is: a run still going (no step record yet), NaN/inf written as the
strings "nan"/"inf", lines that do not parse (counted, not fatal), unknown kinds, fields and
skip reasons. After a rollback {step, to_step} the steps after to_step are trained again:
each series keeps the latest value per step, and the abandoned values are drawn faintly.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stability.atomic import atomic_write
from stability.config import GuardConfig
from stability.guard import REASONS

if TYPE_CHECKING:
    from stability.reporting import Reporter

REPORT_PNG, REPORT_HTML = "report.png", "report.html"
_WIDTH_IN, _DPI = 12.0, 100
_REASON_COLORS = {"nonfinite_loss": "tab:red", "overflow": "tab:purple", "spike": "tab:orange",
                  "peer": "tab:brown", "loss_spike": "tab:pink"}
_BAND_COLORS = (("low", "0.85"), ("healthy", "#b8e6b8"), ("high", "#ffd9a0"), ("critical", "#ffb0b0"))


class ReportError(ValueError):
    """The run directory cannot be reported on (it does not exist)."""


def number(value: Any) -> float:
    """A metric as a float: NaN/inf arrive as strings ("nan", "inf", "-inf"); anything else
    that is not a number (None, a list) is NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


# --- reading the log ------------------------------------------------------------------------


@dataclass
class RunLog:
    """The records of one run, rollbacks resolved: ``steps`` and ``blocks`` keep the latest
    record per step; what a rollback abandoned is in ``abandoned_*``."""

    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    bands: dict[int, dict[str, Any]] = field(default_factory=dict)
    abandoned_steps: list[dict[str, Any]] = field(default_factory=list)
    abandoned_bands: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    skips: list[dict[str, Any]] = field(default_factory=list)  # every skip, abandoned ones too
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # task number -> its latest record
    stop: dict[str, Any] | None = None
    bad_lines: int = 0

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> RunLog:
        log = cls()
        for rec in records:
            log.add(rec)
        return log

    def add(self, rec: dict[str, Any]) -> None:
        kind, step = rec.get("kind"), rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            step = None
        if kind == "rollback" and isinstance(rec.get("to_step"), int):
            self.rollbacks.append(rec)
            self._abandon_after(rec["to_step"])
        elif kind == "step" and step is not None:
            self.steps[step] = rec
        elif kind == "blocks" and step is not None:
            self.blocks[step] = rec
        elif kind == "band" and step is not None:
            self.bands[step] = rec
        elif kind == "skip" and step is not None:
            self.skips.append(rec)
        elif kind == "epoch":
            self.epochs.append(rec)
        elif kind == "task" and isinstance(rec.get("task"), int):
            self.tasks[rec["task"]] = rec
        elif kind == "stop":
            self.stop = rec

    def _abandon_after(self, to_step: int) -> None:
        for series, abandoned in ((self.steps, self.abandoned_steps), (self.bands, self.abandoned_bands),
                                  (self.blocks, None)):
            for s in [s for s in series if s > to_step]:
                rec = series.pop(s)
                if abandoned is not None:
                    abandoned.append(rec)

    def series(self, name: str, kind: str = "step") -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric field of the surviving step (or band) records."""
        recs = self.steps if kind == "step" else self.bands
        steps = sorted(recs)
        return steps, [number(recs[s].get(name)) for s in steps]

    def last_step(self) -> int | None:
        seen = [*self.steps, *self.blocks, *(r["step"] for r in self.skips),
                *(r["step"] for r in self.epochs if isinstance(r.get("step"), int))]
        return max(seen) if seen else None


def read_log(path: Path) -> RunLog:
    """The ``RunLog`` of a metrics.jsonl file; a missing file is an empty log, and lines
    that are not JSON objects (a crash mid-write, an editor) are counted in ``bad_lines``."""
    log = RunLog()
    if not path.exists():
        return log
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            log.add(rec)
        else:
            log.bad_lines += 1
    return log


def band_edges(config: dict[str, Any]) -> tuple[float, float, float]:
    """(healthy, high, critical) from config.json's guard section, else the defaults."""
    guard = config.get("guard") if isinstance(config.get("guard"), dict) else {}
    defaults = GuardConfig()
    edges = []
    for name in ("band_healthy", "band_high", "band_critical"):
        v = number(guard.get(name, getattr(defaults, name)))
        edges.append(v if math.isfinite(v) and v > 0 else getattr(defaults, name))
    return edges[0], edges[1], edges[2]


# --- the summary ------------------------------------------------------------------------------


def summary(log: RunLog) -> list[tuple[str, str]]:
    """(label, value) rows: what a reader wants before the plots."""
    rows: list[tuple[str, str]] = []
    last = log.last_step()
    rows.append(("steps", "no step records yet" if last is None else str(last)))
    train = _finite(log.series("loss")[1])
    rows.append(("final train loss", f"{train[-1]:.4f} (last logging window)" if train else "-"))
    if log.epochs:
        e = log.epochs[-1]
        rows.append(("final validation", f"loss {number(e.get('val_loss')):.4f}, ppl {number(e.get('val_ppl')):.2f}, "
                                         f"accuracy {number(e.get('val_acc')):.4f}"))
        rows.append(("unigram baseline", f"loss {number(e.get('unigram_loss')):.4f}, "
                                         f"accuracy {number(e.get('unigram_acc')):.4f}"))
    else:
        rows.append(("final validation", "no epoch record yet"))
    reasons: dict[str, int] = {}
    for r in log.skips:
        reasons[str(r.get("reason", "unknown"))] = reasons.get(str(r.get("reason", "unknown")), 0) + 1
    rows.append(("skipped steps", ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none"))
    rows.append(("rollbacks", ", ".join(f"step {r['step']} -> {r['to_step']}" for r in log.rollbacks) or "none"))
    loud: dict[str, int] = {}
    for r in log.bands.values():
        loud[str(r.get("band"))] = loud.get(str(r.get("band")), 0) + 1
    rows.append(("loud gradient norms", ", ".join(f"{k} {v}" for k, v in loud.items()) or "none"))
    if log.tasks:
        t = log.tasks[max(log.tasks)]
        rows.append(("continual learning", f"{len(log.tasks)} tasks; average loss "
                                           f"{number(t.get('average_loss')):.4f}, forgetting "
                                           f"{number(t.get('forgetting')):+.4f}"))
    if log.stop is not None:
        rows.append(("stopped", f"step {log.stop.get('step')}: {log.stop.get('reason')} ({log.stop.get('error', '')})"))
    if log.bad_lines:
        rows.append(("unreadable lines", f"{log.bad_lines} line(s) of metrics.jsonl were not JSON and were left out"))
    return rows


# --- the figure -----------------------------------------------------------------------------------


def _mark_rollbacks(ax, log: RunLog) -> None:
    for r in log.rollbacks:
        ax.axvline(r["step"], color="tab:red", linestyle="--", linewidth=1, alpha=0.7)


def _legend(ax) -> None:
    """Outside the plot, on the right, so it never hides a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, borderaxespad=0)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _plot_loss(ax, log: RunLog) -> None:
    steps, loss = log.series("loss")
    if steps:
        ax.plot(steps, loss, color="tab:blue", marker=".", label="train (logging window)")
    gone = [(number(r.get("step")), number(r.get("loss"))) for r in log.abandoned_steps]
    if gone:
        ax.scatter(*zip(*gone), color="0.6", marker="x", label="undone by a rollback")
    val = [(r["step"], number(r.get("val_loss"))) for r in log.epochs if isinstance(r.get("step"), int)]
    if val:
        ax.plot(*zip(*val), color="tab:green", marker="o", linestyle=":", label="validation")
    start = 0
    for i, r in enumerate(e for e in log.epochs if isinstance(e.get("step"), int)):
        base = number(r.get("unigram_loss"))
        if math.isfinite(base):
            ax.hlines(base, start, max(r["step"], start + 1), colors="0.3", linestyles="--",
                      label="unigram baseline" if i == 0 else None)
        start = r["step"]
    _mark_rollbacks(ax, log)
    if not (steps or val):
        _empty(ax, "no step or epoch records yet")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss")
    _legend(ax)


def _plot_grad_norm(ax, log: RunLog, edges: tuple[float, float, float]) -> None:
    healthy, high, critical = edges
    steps, norms = log.series("grad_norm")
    loud = [(s, number(r.get("grad_norm"))) for s, r in sorted(log.bands.items())]
    skips = [(r["step"], number(r.get("grad_norm")), str(r.get("reason"))) for r in log.skips]
    values = _finite([*norms, *(v for _, v in loud), *(v for _, v, _ in skips)])
    values = [v for v in values if v > 0]
    lo = min([*values, healthy]) / 2
    hi = max([*values, critical]) * 2
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    spans = (lo, healthy, high, critical, hi)
    for (name, color), a, b in zip(_BAND_COLORS, spans[:-1], spans[1:]):
        ax.axhspan(a, b, color=color, alpha=0.6, linewidth=0, label=f"{name} band")  # bottom to top
    if steps:
        ax.plot(steps, norms, color="tab:blue", marker=".", label="mean (logging window)")
    if loud:
        ax.scatter(*zip(*loud), color="black", s=10, label="a high/critical step")
    for reason in dict.fromkeys(r for _, _, r in skips):
        pts = [(s, v if math.isfinite(v) and v > 0 else hi / 1.3) for s, v, r in skips if r == reason]
        ax.scatter(*zip(*pts), marker="v", s=40, color=_REASON_COLORS.get(reason, "tab:gray"),
                   label=f"skip: {reason}", zorder=3)
    _mark_rollbacks(ax, log)
    if not (steps or loud or skips):
        _empty(ax, "no step records yet")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradient norm before clipping; health bands shaded; non-finite norms of skipped steps at the top")
    _legend(ax)


def _plot_loss_scale(ax, log: RunLog) -> None:
    steps, scale = log.series("loss_scale")
    pts = [(s, v) for s, v in zip(steps, scale) if math.isfinite(v) and v > 0]
    if pts:
        ax.plot(*zip(*pts), color="tab:purple", marker=".", drawstyle="steps-post", label="loss scale")
        ax.set_yscale("log")
        if len({v for _, v in pts}) == 1:
            ax.text(0.01, 0.9, f"constant {pts[0][1]:g}" + (" (no fp16 loss scaling)" if pts[0][1] == 1 else ""),
                    transform=ax.transAxes, fontsize=8, color="0.3")
    else:
        _empty(ax, "no step records yet")
    _mark_rollbacks(ax, log)
    ax.set_ylabel("loss scale")
    ax.set_title("loss scale")


def _plot_events(ax, log: RunLog) -> None:
    seen = {str(r.get("reason")) for r in log.skips}
    reasons = [*REASONS[1:], *sorted(seen - set(REASONS))]  # every reason a row, seen or not
    rows = [*reasons, "rollback"]
    for y, reason in enumerate(reasons):
        xs = [r["step"] for r in log.skips if str(r.get("reason")) == reason]
        ax.scatter(xs, [y] * len(xs), marker="v", s=40, color=_REASON_COLORS.get(reason, "tab:gray"))
    for r in log.rollbacks:
        y = len(reasons)
        ax.annotate("", xy=(r["to_step"], y), xytext=(r["step"], y),
                    arrowprops=dict(arrowstyle="->", color="tab:red"))
        ax.scatter([r["step"]], [y], marker="X", s=60, color="tab:red")
    if log.stop is not None and isinstance(log.stop.get("step"), int):
        ax.axvline(log.stop["step"], color="black", linewidth=2)
        ax.text(log.stop["step"], len(reasons) + 0.3, " stop", fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    if not (log.skips or log.rollbacks):
        ax.text(0.5, 0.5, "no skipped steps, no rollbacks", transform=ax.transAxes, ha="center", va="center",
                color="tab:green")
    ax.set_title("skipped steps by reason; rollbacks (arrow: back to the step restored)")


def _block_lists(log: RunLog, name: str) -> tuple[list[int], list[list[float]]]:
    """(steps, per-block series) of a list field of the blocks records; blocks missing from
    a record are NaN."""
    steps = sorted(s for s, r in log.blocks.items() if isinstance(r.get(name), list))
    width = max((len(log.blocks[s][name]) for s in steps), default=0)
    per_block = [[number(log.blocks[s][name][i]) if i < len(log.blocks[s][name]) else math.nan for s in steps]
                 for i in range(width)]
    return steps, per_block


def _plot_block_grads(ax, log: RunLog) -> None:
    steps, per_block = _block_lists(log, "grad_norm")
    for i, values in enumerate(per_block):
        ax.plot(steps, [v if v > 0 else math.nan for v in values], marker=".", label=f"block {i}")
    if any(v > 0 for vs in per_block for v in _finite(vs)):
        ax.set_yscale("log")
    _mark_rollbacks(ax, log)
    ax.set_ylabel("gradient norm")
    ax.set_title("per-block gradient norm")
    _legend(ax)


def _plot_firing(ax, log: RunLog) -> None:
    colors = [f"C{i}" for i in range(10)]
    for name, style in (("firing_rate_pre", "--"), ("firing_rate_post", "-")):
        steps, per_block = _block_lists(log, name)
        layer = "LIF 1" if name.endswith("pre") else "LIF 2"
        for i, values in enumerate(per_block):
            ax.plot(steps, values, linestyle=style, color=colors[i % 10], marker=".", label=f"block {i}, {layer}")
    ax.set_title("per-block firing rate (dashed: first LIF layer, solid: second)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("spikes per token")
    _legend(ax)


def _task_matrix(log: RunLog) -> list[list[float]]:
    rows = [log.tasks[t].get("losses") for t in sorted(log.tasks)]
    rows = [[number(v) for v in r] for r in rows if isinstance(r, list)]
    width = max((len(r) for r in rows), default=0)
    return [r + [math.nan] * (width - len(r)) for r in rows]


def _plot_tasks(ax, fig, log: RunLog) -> None:
    matrix = _task_matrix(log)
    image = ax.imshow(matrix, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label="validation loss", pad=0.01)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if math.isfinite(v):  # dark text on the light (low-loss) end of the colour map
                color = "white" if image.norm(v) > 0.5 else "black"
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(matrix[0])), [f"task {j + 1}" for j in range(len(matrix[0]))])
    ax.set_yticks(range(len(matrix)), [f"after task {sorted(log.tasks)[i]}" for i in range(len(matrix))])
    ax.set_title("task matrix: validation loss on each task (columns) after training each task (rows)")


def _plot_summary(ax, rows: list[tuple[str, str]], title: str) -> None:
    ax.axis("off")
    ax.text(0.0, 1.0, title, fontsize=14, fontweight="bold", va="top", transform=ax.transAxes)
    for i, (label, value) in enumerate(rows):
        y = 0.82 - i * 0.82 / max(len(rows), 1)
        ax.text(0.0, y, label, fontsize=10, va="top", transform=ax.transAxes, color="0.3")
        ax.text(0.3, y, value, fontsize=10, va="top", transform=ax.transAxes, family="monospace")


def render(log: RunLog, edges: tuple[float, float, float], title: str):
    """The report as a matplotlib Figure (Agg), one panel per axes, top to bottom."""
    from matplotlib.figure import Figure  # the OO API: no pyplot, no global state, no display

    panels = ["summary", "loss", "grad_norm", "loss_scale", "events"]
    if log.blocks:
        panels += ["block_grads", "firing"]
    if _task_matrix(log):
        panels.append("tasks")
    heights = {"summary": 1.0 + 0.18 * len(summary(log)), "events": 1.6, "tasks": 2.6}
    ratios = [heights.get(p, 2.4) for p in panels]
    fig = Figure(figsize=(_WIDTH_IN, sum(ratios)), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, height_ratios=ratios)
    for name, ax in zip(panels, axes):
        ax.set_gid(name)  # the tests find each panel by name
        if name == "summary":
            _plot_summary(ax, summary(log), title)
        elif name == "loss":
            _plot_loss(ax, log)
        elif name == "grad_norm":
            _plot_grad_norm(ax, log, edges)
        elif name == "loss_scale":
            _plot_loss_scale(ax, log)
        elif name == "events":
            _plot_events(ax, log)
        elif name == "block_grads":
            _plot_block_grads(ax, log)
        elif name == "firing":
            _plot_firing(ax, log)
        elif name == "tasks":
            _plot_tasks(ax, fig, log)
        if name not in ("summary", "tasks"):
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            ax.set_xlim(0, (log.last_step() or 1) * 1.02 + 1)  # the time panels line up
    return fig


# --- the files --------------------------------------------------------------------------------------


def _html(title: str, rows: list[tuple[str, str]], png: bytes, log: RunLog) -> str:
    """One file, no network, no external files: the figure is an inline base64 PNG."""
    esc = html.escape
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    matrix = _task_matrix(log)
    tasks = ""
    if matrix:
        head = "".join(f"<th>task {j + 1}</th>" for j in range(len(matrix[0])))
        body = "\n".join(f"<tr><th>after task {t}</th>" + "".join(f"<td>{v:.4f}</td>" for v in row) + "</tr>"
                         for t, row in zip(sorted(log.tasks), matrix))
        tasks = f"<h2>Task matrix (validation loss)</h2>\n<table id=\"tasks\"><tr><th></th>{head}</tr>\n{body}</table>"
    data = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 12px; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; font-size: 14px; }}
td {{ font-family: monospace; }}
img {{ display: block; width: 1150px; max-width: 100%; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<table id="summary">
{table}
</table>
<img id="report" alt="training health plots: loss, gradient norm, loss scale, events, blocks, tasks"
 src="data:image/png;base64,{data}">
{tasks}
</body></html>
"""


def to_png(fig) -> bytes:
    """The figure as PNG bytes, at the report's resolution (drawing it fixes the layout)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/report.png`` and ``run_dir/report.html``; returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; pass the --output-dir of a `lsnn train` run")
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}  # a run killed before it wrote config.json: default band edges
    config = config if isinstance(config, dict) else {}
    log = read_log(run_dir / "metrics.jsonl")
    title = f"lsnn health report: {run_dir.resolve().name}"
    png = to_png(render(log, band_edges(config), title))
    png_path, html_path = run_dir / REPORT_PNG, run_dir / REPORT_HTML
    atomic_write(png_path, png)
    atomic_write(html_path, _html(title, summary(log), png, log))
    return png_path, html_path


def draw_report(run_dir: Path, report: Reporter) -> None:
    """At the end of a run: write its report, saying where; a failure (a full disk) is a
    warning, never the run's failure (the run itself is saved)."""
    try:
        png, _ = write_report(run_dir)
    except (ReportError, OSError) as e:
        report.warn(f"could not write the health report: {e}")
        return
    report.line(f"health report: {png} and {png.with_suffix('.html').name}")
