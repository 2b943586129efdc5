"""scripts/gpu-check: the dry run end to end on this machine, the refusal without CUDA,
and the summary writer on the reports a real run leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import gpu_check_summary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check"


def gpu_check(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LSNN_MAMBA_SDIST", None)
    env.pop("LSNN_WHEELHOUSE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_lists_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    result = gpu_check("--dry-run", "--output-dir", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    for part in (
        "-m pytest -m gpu",
        "LSNN_BENCH_AMP=bf16",
        "LSNN_BENCH_LOOP_IMPLS=torch,triton",  # the CfC's and the LIF's torch loops beside their kernels
        "LSNN_BENCH_CUDA_GRAPHS=off,on",  # each eager and replayed from a CUDA graph
        f"--benchmark-json={out}/bench-scans.json",
        *(f"benchmarks/test_phases.py::test_paired_ratio --benchmark-only -k test_paired_ratio and [{p}- -q "
          f"-p no:cacheprovider --benchmark-json={out}/bench-phase{p}.json" for p in (1, 2, 3, 4)),
        "train --phase 1 --max-steps 200 --device cuda --output-dir",
        "drill --phase 3 --tiny --device cuda",
    ):
        assert part in plan, f"{part!r} missing from the plan:\n{plan}"
    assert "build-mamba-ssm" not in plan  # only with a local sdist
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["name"] for s in summary["steps"]] == ["gpu-tests", *(f"bench-phase{p}" for p in (1, 2, 3, 4)),
                                                     "bench-scans", "train", "drill"]
    assert {s["status"] for s in summary["steps"]} == {"dry-run"}
    assert summary["environment"]["torch"] == torch.__version__
    assert "dry run: nothing was run" in (out / "summary.md").read_text()


def test_dry_run_with_a_local_sdist_builds_mamba_ssm_from_it_with_no_index(tmp_path):
    sdist = tmp_path / "mamba_ssm-2.2.4.tar.gz"
    result = gpu_check("--dry-run", "--output-dir", str(tmp_path / "o"), "--mamba-sdist", str(sdist),
                       tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    build = [line for line in result.stdout.splitlines() if "[build-mamba-ssm]" in line]
    assert len(build) == 1 and str(sdist) in build[0] and "--no-index" in build[0]
    pips = [line for line in result.stdout.splitlines() if " pip " in line]
    assert pips and all("--no-index" in line for line in pips)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_real_run_refuses_saying_what_to_do(tmp_path):
    result = gpu_check("--output-dir", str(tmp_path / "o"), tmp_path=tmp_path)
    assert result.returncode == 2
    assert "torch.cuda.is_available() is False" in result.stderr and "--dry-run" in result.stderr


def test_unknown_argument_is_rejected(tmp_path):
    result = gpu_check("--fast", tmp_path=tmp_path)
    assert result.returncode == 2 and "unknown argument --fast" in result.stderr


def _fake_run(out: Path) -> None:
    """The files a real run leaves: two steps, a JUnit report, benchmark JSON, metrics."""
    out.mkdir()
    (out / "environment.json").write_text(json.dumps({"torch": "2.13.0", "device": "H200", "triton": "3.7.1"}))
    (out / "steps.tsv").write_text(f"gpu-tests\tfailed\t1\t95\t{out}/gpu-tests.log\n"
                                   f"train\tpassed\t0\t40\t{out}/train.log\n")
    (out / "gpu-tests.cmd").write_text("python -m pytest -m gpu\n")
    (out / "gpu-tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.model.test_ssm" name="test_a"/>'
        '<testcase classname="tests.model.test_ssm" name="test_b"><failure message="x"/></testcase>'
        '</testsuite></testsuites>'
    )
    bench = {"benchmarks": [{"name": "test_paired_ratio[3-triton]", "group": "phase 3, paired, scan triton",
                             "extra_info": {"hybrid_over_transformer_median": 1.42, "quartiles": [1.3, 1.5],
                                            "peak_mb_hybrid": 300.0, "peak_mb_transformer": 250.0,
                                            "peak_memory_ratio": 1.2, "amp": "bf16", "flop_ratio": 1.69}}]}
    (out / "bench-phase3.json").write_text(json.dumps(bench))
    phase1 = {"benchmarks": [{"name": "test_paired_ratio[1-triton]", "extra_info": {}}]}  # a phase written earlier
    (out / "bench-phase1.json").write_text(json.dumps(phase1))
    (out / "train-phase1").mkdir()
    (out / "train-phase1" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 9.0}) + "\n" + json.dumps({"kind": "eval"}) + "\n"
        + json.dumps({"step": 200, "loss": 5.5}) + "\n"
    )


def test_summary_reads_the_reports_a_real_run_leaves(tmp_path):
    out = tmp_path / "check"
    _fake_run(out)
    assert gpu_check_summary.main([str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpu_tests"] | {"failed_tests": None} == {
        "tests": 5, "failures": 1, "errors": 0, "skipped": 1, "passed": 3, "failed_tests": None}
    assert summary["gpu_tests"]["failed_tests"] == ["tests.model.test_ssm::test_b"]
    assert summary["steps"][0] | {"log": None} == {
        "name": "gpu-tests", "status": "failed", "exit_code": 1, "seconds": 95, "log": None,
        "command": "python -m pytest -m gpu"}
    assert [b["name"] for b in summary["benchmarks"]] == ["test_paired_ratio[1-triton]", "test_paired_ratio[3-triton]"]
    assert summary["benchmarks"][1]["hybrid_over_transformer_median"] == 1.42
    assert summary["train"]["first"]["loss"] == 9.0 and summary["train"]["last"]["step"] == 200
    md = (out / "summary.md").read_text()
    for part in ("| gpu-tests | failed | 95 |", "3 passed, 1 failed", "test_paired_ratio[3-triton] | 1.42x | 1.30-1.50 | 1.69x",
                 "| 300 | 250 | 1.20x |", "loss 9.000 at step 1 -> 5.500 at step 200"):
        assert part in md, f"{part!r} missing from:\n{md}"
