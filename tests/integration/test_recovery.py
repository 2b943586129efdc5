"""Recovery escalation through the real run loop: rollback, then the exit-3 diagnosis."""

import json
import math

import torch

from stability.checkpoint import load_checkpoint
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli

SYNC_EVERY_STEP = ["--log-every", "1", "--rollback-after", "3", "--snapshot-every", "2"]


def _finite(path) -> bool:
    weights = load_checkpoint(path)["trainer"]["model"]
    return all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_corrupted_weights_roll_back_and_training_recovers(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--output-dir", str(out),
                    "--max-steps", "14", "--inject-fault", "param:nan@6"])
    assert code == 0
    (rollback,) = records(out, "rollback")
    assert rollback["step"] == 8 and rollback["to_step"] == 4 and rollback["failed_batches"] == 3
    skips = records(out, "skip")
    assert [s["step"] for s in skips] == [6, 7, 8] and {s["reason"] for s in skips} == {"nonfinite_loss"}
    assert _finite(out / "checkpoints" / "last.pt")
    steps = records(out, "step")
    assert steps[-1]["step"] == 14 and math.isfinite(steps[-1]["loss"])
    assert steps[-1]["lr"] < steps[3]["lr"], "the learning rate is lowered after a rollback"
    printed = capsys.readouterr().out
    assert "rolled back to step 4" in printed and "step 6 skipped (nonfinite_loss)" in printed


def test_persistent_failure_stops_with_exit_3_a_diagnosis_and_the_last_good_state(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--max-rollbacks", "2",
                    "--output-dir", str(out), "--max-steps", "40",
                    "--inject-fault", "param[blocks.0.liquid]:nan@5,param[blocks.0.liquid]:nan@9-40"])
    assert code == 3
    report = json.loads((out / "report.json").read_text())
    assert report["reason"] == "nonfinite_loss"
    assert report["nonfinite_weights"] and all(n.startswith("blocks.0.liquid") for n in report["nonfinite_weights"])
    assert report["nonfinite_activations"][0].startswith("blocks.0.liquid")
    assert len(records(out, "rollback")) == 2
    assert _finite(out / "checkpoints" / "last.pt")
    assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["step"] == report["last_good_step"]
    printed = capsys.readouterr().out
    assert f"error: training stopped at step {report['step']}" in printed
    assert "non-finite weights: blocks.0.liquid" in printed and "last good state" in printed


def test_overflow_at_the_minimum_scale_stops_with_the_cause(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--log-every", "2", "--mixed-precision",
                    "--amp-dtype", "fp16", "--init-scale", "4", "--overflow-limit", "3",
                    "--output-dir", str(out), "--max-steps", "30", "--inject-fault", "overflow@3-30"])
    assert code == 3
    printed = capsys.readouterr().out
    assert "minimum loss scale 1" in printed and "--amp-dtype bf16" in printed
    assert records(out, "stop")[0]["reason"] == "overflow"


def test_fp16_overflow_storm_backs_off_and_does_not_roll_back(tmp_path, corpus):
    out = tmp_path / "run"
    code = run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--log-every", "2", "--mixed-precision",
                    "--amp-dtype", "fp16", "--output-dir", str(out), "--max-steps", "16",
                    "--inject-fault", "overflow@3-8"])
    assert code == 0
    assert records(out, "rollback") == []
    skips = records(out, "skip")
    assert [s["step"] for s in skips] == [3, 4, 5, 6, 7, 8] and {s["reason"] for s in skips} == {"overflow"}
    scales = [s["loss_scale"] for s in skips]
    assert scales[0] == 1024.0 and scales[-1] < scales[0] * 0.5**5
