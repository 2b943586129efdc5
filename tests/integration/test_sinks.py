"""What a run writes beside metrics.jsonl: TensorBoard scalars and the per-block record."""

from __future__ import annotations

import math

import pytest

from stability.diagnostics import FIELDS
from stability.trainer import Trainer
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli
from tests.stability.test_reporting import assert_same_scalars, event_scalars, jsonl_scalars
from tests.stability.test_trainer import SyncCounter


def test_tensorboard_holds_what_metrics_jsonl_holds_across_a_resume(tmp_path, corpus):
    out = tmp_path / "run"
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--log-every", "4",
              "--tensorboard", "--inject-fault", "loss:nan@3"]
    assert run_cli([*common, "--max-steps", "8"]) == 0
    assert run_cli([*common, "--max-steps", "12", "--resume"]) == 0
    found = event_scalars(out / "tensorboard")
    assert_same_scalars(found, jsonl_scalars(records(out)))
    assert [s for s, _ in found["step/loss"]] == [4, 8, 12] and [s for s, _ in found["skip/loss"]] == [3]
    assert [s for s, _ in found["blocks/grad_norm/0"]] == [4, 8, 12]


@pytest.mark.parametrize("layout,absent", [
    ([], {"mamba_delta", "mamba_state", "cross_attn_max_logit"}),
    (["--use-mamba", "--mamba-d-state", "4", "--integration-mode", "bidirectional", "--use-cross-attention",
      "--cross-attn-heads", "2"], set()),
], ids=["spiking-liquid", "mamba-cross-attention"])
def test_every_sync_point_writes_a_blocks_record(tmp_path, corpus, layout, absent):
    out = tmp_path / "run"
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, *layout, "--output-dir", str(out),
                    "--max-steps", "10", "--log-every", "4"]) == 0
    blocks = records(out, "blocks")
    assert [r["step"] for r in blocks] == [r["step"] for r in records(out, "step")] == [4, 8, 10]
    for rec in blocks:
        assert {k for k in FIELDS if rec[k] is None} == absent
        for name in set(FIELDS) - absent:
            assert len(rec[name]) == 1 and math.isfinite(rec[name][0]), (name, rec[name])
        assert 0 <= rec["firing_rate_post"][0] <= 1 and rec["grad_norm"][0] > 0


def test_a_run_makes_no_host_sync_inside_a_step_armed_or_not(tmp_path, corpus, monkeypatch):
    layout = ["--data", str(corpus), *FAST, *TINY_MODEL, "--use-mamba", "--mamba-d-state", "4"]
    assert run_cli([*layout, "--output-dir", str(tmp_path / "warm"), "--max-steps", "1"]) == 0  # numba compiles
    counter = SyncCounter(monkeypatch)
    seen: list[tuple[bool, int, int]] = []  # per step: armed, host syncs, hook calls
    original = Trainer.train_step

    def counted(self, window):
        armed, calls, syncs = self.probe.armed, self.probe.calls, len(counter.calls)
        result = original(self, window)
        seen.append((armed, len(counter.calls) - syncs, self.probe.calls - calls))
        return result

    monkeypatch.setattr(Trainer, "train_step", counted)
    assert run_cli([*layout, "--output-dir", str(tmp_path / "run"), "--max-steps", "9", "--log-every", "3"]) == 0
    assert [armed for armed, _, _ in seen] == [False, False, True] * 3, "armed on the step before each sync point"
    assert all(syncs == 0 for _, syncs, _ in seen), seen
    assert all((calls > 0) == armed for armed, _, calls in seen), "hooks run on armed steps only"
