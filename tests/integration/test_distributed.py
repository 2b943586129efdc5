"""Distributed training through the real run loop: two CPU processes (gloo over loopback),
started as torchrun starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from stability.checkpoint import load_checkpoint
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli
from tests.integration.dist_helpers import free_port, rank_weights, run_ranks

COMMON = [*FAST, *TINY_MODEL, "--log-every", "2", "--max-steps", "8"]


def _args(corpus, out, *extra):
    return ["--data", str(corpus), *COMMON, "--output-dir", str(out), *extra]


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_ranks_end_bitwise_equal_skip_one_ranks_fault_together_and_rank_0_alone_writes(tmp_path, corpus):
    out = tmp_path / "r"
    assert run_ranks(_args(corpus, out, "--inject-fault", "loss:nan@3#1"), tmp_path / "w") == [0, 0]
    assert _equal(rank_weights(tmp_path / "w", 0), rank_weights(tmp_path / "w", 1))
    (skip,) = records(out, "skip")
    assert skip["step"] == 3 and skip["reason"] == "nonfinite_loss"
    steps = records(out, "step")
    assert [r["step"] for r in steps] == [2, 4, 6, 8], "one record per step, not one per rank"
    assert json.loads((out / "config.json").read_text())["distributed"] == {"mode": "ddp", "world": 2}
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert len(state["ranks"]) == 2 and state["trainer"]["step"] == 8


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_plasticity_and_continual_flag_of_phase_4_keeps_the_ranks_bitwise_equal(tmp_path, corpus, mode):
    phase4 = ["--distributed", mode, "--continual-learning", "--num-tasks", "2", "--val-fraction", "0.2", "--use-stdp",
              "--use-meta-plasticity", "--use-replay", "--use-mamba", "--integration-mode", "bidirectional",
              "--spike-to-mamba-method", "temporal", "--mamba-d-state", "4", "--use-adaptive-gating",
              "--num-gate-heads", "2", "--use-cross-attention", "--cross-attn-heads", "2", "--fisher-batches", "2",
              "--max-steps", "5"]
    out = tmp_path / "r"
    assert run_ranks(_args(corpus, out, *phase4), tmp_path / "w") == [0, 0]
    assert _equal(rank_weights(tmp_path / "w", 0), rank_weights(tmp_path / "w", 1))
    assert len(records(out, "task")) == 2
    plast = records(out, "step")[-1]["plasticity"]
    assert sum(plast["applied"]) > 0, "STDP really ran"


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_and_resume_is_exact(tmp_path, corpus):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_ranks(_args(corpus, straight), tmp_path / "w0") == [0, 0]
    # rank 1 alone gets Ctrl-C before step 3: both stop at the next sync point, step 4
    assert run_ranks(_args(corpus, stopped, "--inject-fault", "sigint@3#1"), tmp_path / "w1") == [130, 130]
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["trainer"]["step"] == 4
    assert run_ranks(_args(corpus, stopped, "--resume"), tmp_path / "w2") == [0, 0]

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert strip(records(straight)) == strip(records(stopped))
    assert _equal(rank_weights(tmp_path / "w0", 0), rank_weights(tmp_path / "w2", 0))


def test_a_persistent_fault_on_one_rank_ends_with_exit_3_naming_that_rank(tmp_path, corpus):
    out = tmp_path / "r"
    fault = "param[blocks.0.liquid]:nan@3#1,param[blocks.0.liquid]:nan@5-40#1"
    codes = run_ranks(_args(corpus, out, "--rollback-after", "2", "--snapshot-every", "2", "--max-rollbacks", "1",
                            "--max-steps", "30", "--inject-fault", fault), tmp_path / "w")
    assert codes == [3, 3]
    report = json.loads((out / "report.json").read_text())
    assert report["bad_ranks"] == [1]
    assert "ranks whose own batch went bad: 1" in "\n".join(report["lines"])


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(_args(corpus, one)) == 0
    assert run_ranks(_args(corpus, two), tmp_path / "w") == [0, 0]
    a = load_checkpoint(one / "checkpoints" / "last.pt")["trainer"]["model"]
    b = rank_weights(tmp_path / "w", 0)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [r["loss"] for r in records(one, "step")]
    lb = [r["loss"] for r in records(two, "step")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_a_batch_or_a_fault_rank_that_does_not_fit_the_ranks_is_bad_input_on_every_rank(tmp_path, corpus):
    for extra, needle in ((["--batch-size", "3"], "--batch-size 3 is the global batch"),
                          (["--inject-fault", "loss:nan@3#2"], "--inject-fault: rank 2 named")):
        codes = run_ranks(_args(corpus, tmp_path / "r", *extra), tmp_path / "w")
        assert [c[0] for c in codes] == [2, 2] and all(needle in c[1] for c in codes)
    assert not (tmp_path / "r").exists()


def test_torchrun_runs_the_lsnn_cli(tmp_path, corpus):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "stability", "train", *_args(corpus, out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 8 steps") == 1, "rank 0 alone prints"
    assert [r["step"] for r in records(out, "step")] == [2, 4, 6, 8]


# --- FSDP2 --------------------------------------------------------------------------------

FSDP = ["--distributed", "fsdp"]


def test_fsdp_trains_like_ddp_and_writes_sharded_checkpoints_that_load_anywhere(tmp_path, corpus):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert run_ranks(_args(corpus, ddp), tmp_path / "w0") == [0, 0]
    assert run_ranks(_args(corpus, fsdp, *FSDP), tmp_path / "w1") == [0, 0]
    last = fsdp / "checkpoints" / "last.pt"
    assert last.is_dir() and (last / "state.pt").is_file() and (last / ".metadata").is_file()
    state = load_checkpoint(last)  # in this process, with no process group: the full weights
    assert state["trainer"]["step"] == 8 and len(state["ranks"]) == 2
    full_weights = rank_weights(tmp_path / "w1", 0)
    assert _equal(state["trainer"]["model"], full_weights)
    for k, w in rank_weights(tmp_path / "w0", 0).items():  # the same arithmetic, other reduction orders
        torch.testing.assert_close(full_weights[k], w, rtol=1e-4, atol=1e-5, msg=k)
    assert [r["loss"] for r in records(fsdp, "step")] == pytest.approx([r["loss"] for r in records(ddp, "step")],
                                                                      rel=1e-4)


def test_fsdp_stops_on_a_signal_to_one_rank_and_resumes_exactly_across_a_rollback(tmp_path, corpus):
    extra = [*FSDP, "--log-every", "1", "--rollback-after", "2", "--snapshot-every", "2", "--max-steps", "10"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # rank 1 corrupts its shard of a weight: every rank skips, then rolls its own shards back
    assert run_ranks(_args(corpus, straight, *extra, "--inject-fault", "param:nan@4#1"), tmp_path / "w0") == [0, 0]
    assert len(records(straight, "rollback")) == 1
    assert run_ranks(_args(corpus, stopped, *extra, "--inject-fault", "param:nan@4#1,sigterm@7#1"),
                     tmp_path / "w1") == [143, 143]
    assert run_ranks(_args(corpus, stopped, *extra, "--resume", "--inject-fault", "param:nan@4#1"),
                     tmp_path / "w2") == [0, 0]

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert strip(records(straight)) == strip(records(stopped))
    assert _equal(rank_weights(tmp_path / "w0", 0), rank_weights(tmp_path / "w2", 0))


# --- NCCL on two GPUs ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_over_nccl_stay_in_step_through_a_fault_and_a_resume(tmp_path, corpus, mode):
    cuda = ["--device", "cuda", "--distributed", mode, "--log-every", "1", "--rollback-after", "2",
            "--snapshot-every", "2", "--max-steps", "10"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_ranks(_args(corpus, straight, *cuda, "--inject-fault", "param:nan@4#1"), tmp_path / "w0") == [0, 0]
    assert len(records(straight, "rollback")) == 1
    assert _equal(rank_weights(tmp_path / "w0", 0), rank_weights(tmp_path / "w0", 1))
    assert run_ranks(_args(corpus, stopped, *cuda, "--inject-fault", "param:nan@4#1,sigterm@7#0"),
                     tmp_path / "w1") == [143, 143]
    assert run_ranks(_args(corpus, stopped, *cuda, "--resume", "--inject-fault", "param:nan@4#1"),
                     tmp_path / "w2") == [0, 0]
    assert [r["loss"] for r in records(straight, "step")] == [r["loss"] for r in records(stopped, "step")]
