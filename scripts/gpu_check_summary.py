"""Write summary.json and summary.md for a ``scripts/gpu-check`` output directory.

    python scripts/gpu_check_summary.py DIR [--dry-run]

Reads what the check left in DIR: environment.json, steps.tsv (one line a step: name,
status, exit code, seconds, log), the pytest JUnit XML of the GPU tests, the benchmark
JSON of each phase and the training run's metrics.jsonl. Anything missing is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, seconds, log = line.split("\t")
        cmd = out / f"{name}.cmd"
        steps.append({
            "name": name, "status": status, "exit_code": int(rc) if rc else None,
            "seconds": int(seconds), "log": log, "command": cmd.read_text().strip() if cmd.exists() else None,
        })
    return steps


def _tests(out: Path) -> dict | None:
    path = out / "gpu-tests.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     "failed_tests": failed}


def _benchmarks(out: Path) -> list[dict] | None:
    """The rows of every phase's benchmark JSON (bench-phaseN.json), in phase order; None
    where no phase wrote one."""
    paths = sorted(out.glob("bench-phase*.json")) + sorted(out.glob("bench-scans.json"))
    if not paths:
        return None
    rows = []
    for b in (b for path in paths for b in json.loads(path.read_text())["benchmarks"]):
        info = b.get("extra_info", {})
        rows.append({
            "name": b["name"], "group": b.get("group"),
            "hybrid_over_transformer_median": info.get("hybrid_over_transformer_median"),
            "quartiles": info.get("quartiles"),
            "peak_mb_hybrid": info.get("peak_mb_hybrid"), "peak_mb_transformer": info.get("peak_mb_transformer"),
            "peak_memory_ratio": info.get("peak_memory_ratio"), "amp": info.get("amp"),
            "flop_ratio": info.get("flop_ratio"), "scan_impl": info.get("scan_impl"),
            "loop_impl": info.get("loop_impl"), "cuda_graphs": info.get("cuda_graphs"),
        })
    return rows


def _train(out: Path) -> dict | None:
    path = out / "train-phase1" / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    return {"records": len(records), "first": steps[0] if steps else None, "last": steps[-1] if steps else None}


def _fmt(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        "# GPU check" + (" (dry run: nothing was run)" if summary["dry_run"] else ""),
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), device {env.get('device', 'none')}, "
        f"triton {env.get('triton')}, mamba-ssm {env.get('mamba_ssm')}, numba {env.get('numba')}",
        "",
        "| step | status | seconds | command |",
        "|---|---|---|---|",
    ]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | `{s['command']}` |")
    tests = summary["gpu_tests"]
    lines += ["", "## pytest -m gpu", ""]
    if tests is None:
        lines.append("no JUnit report")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
        lines += [f"- failed: `{name}`" for name in tests["failed_tests"]]
    lines += ["", "## Phase benchmarks (paired rounds, hybrid / Transformer)", ""]
    if summary["benchmarks"] is None:
        lines.append("no benchmark JSON")
    else:
        lines += ["| benchmark | time ratio (median) | quartiles | FLOP ratio | peak MB hybrid | peak MB Transformer "
                  "| memory ratio |",
                  "|---|---|---|---|---|---|---|"]
        for b in summary["benchmarks"]:
            q = b["quartiles"] or [None, None]
            lines.append(
                f"| {b['name']} | {_fmt(b['hybrid_over_transformer_median'])}x | {_fmt(q[0])}-{_fmt(q[1])} | "
                f"{_fmt(b['flop_ratio'])}x | {_fmt(b['peak_mb_hybrid'], '.0f')} | {_fmt(b['peak_mb_transformer'], '.0f')} | "
                f"{_fmt(b['peak_memory_ratio'])}x |"
            )
    train = summary["train"]
    lines += ["", "## 200-step phase-1 run", ""]
    if train is None or train["last"] is None:
        lines.append("no metrics.jsonl with a loss")
    else:
        lines.append(f"loss {train['first'].get('loss'):.3f} at step {train['first'].get('step')} -> "
                     f"{train['last'].get('loss'):.3f} at step {train['last'].get('step')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    env_path = args.out / "environment.json"
    summary = {
        "dry_run": args.dry_run,
        "environment": json.loads(env_path.read_text()) if env_path.exists() else {},
        "steps": _steps(args.out),
        "gpu_tests": _tests(args.out),
        "benchmarks": _benchmarks(args.out),
        "train": _train(args.out),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "summary.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
