"""The run loop's two promises: a rollback re-reads from its snapshot, and a resume
continues exactly where the checkpoint says, however the process ended."""

from __future__ import annotations

import json

import pytest
import torch

from stability.checkpoint import CheckpointDir, load_checkpoint
from stability.cli import build_parser, resolve
from stability.stream import prepare_data
from stability.trainer import Trainer
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli

SYNC_EVERY_STEP = ["--log-every", "1", "--rollback-after", "3", "--snapshot-every", "2"]


class Crash(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, nothing is saved."""


def _record_batches(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = Trainer.train_step

    def spy(self, batches):
        seen.extend(x.clone() for x, _ in batches)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", spy)
    return seen


def _train_batches(args: list[str]):
    """The training split's batches of epoch 0, as the run would build them."""
    spec = resolve(build_parser().parse_args(["train", *args]))
    _, _, tasks = prepare_data(spec)
    return tasks


def _index_of(batch: torch.Tensor, task) -> int:
    matches = [i for i in range(len(task.train)) if torch.equal(task.train.get(0, i)[0], batch)]
    assert len(matches) == 1
    return matches[0]


def test_after_a_rollback_the_next_batches_are_the_snapshots_position_onwards_minus_the_failed(
        tmp_path, corpus, monkeypatch):
    args = ["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--output-dir", str(tmp_path / "r"),
            "--max-steps", "12", "--inject-fault", "param:nan@6"]
    seen = _record_batches(monkeypatch)
    assert run_cli(args) == 0
    (rollback,) = records(tmp_path / "r", "rollback")
    assert rollback["step"] == 8 and rollback["to_step"] == 4
    task = _train_batches(args)[0]
    order = [_index_of(x, task) for x in seen]
    # steps 1-8 read batches 0-7; steps 6-8 (batches 5-7) failed; the rollback goes back to
    # step 4, whose next batch is 4, then skips 5-7
    assert order[:8] == list(range(8))
    assert order[8:] == [4, 8, 9, 10, 11, 12, 13, 14]


def test_a_rollback_early_in_task_2_leaves_one_row_and_one_summary_per_task(tmp_path, corpus, capsys):
    out = tmp_path / "r"
    code = run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--output-dir", str(out),
                    "--continual-learning", "--num-tasks", "2", "--val-fraction", "0.2",
                    "--max-steps", "8", "--inject-fault", "param:nan@10"])
    assert code == 0
    assert len(records(out, "rollback")) == 1
    printed = capsys.readouterr().out
    assert printed.count("task 1/2 done") == 1 and printed.count("task 2/2 done") == 1
    tasks = records(out, "task")
    assert [t["task"] for t in tasks] == [1, 2] and len(tasks[-1]["losses"]) == 2
    epochs = records(out, "epoch")
    assert [e["task"] for e in epochs] == [1, 2]


def test_each_periodic_checkpoint_records_the_next_batch_to_read(tmp_path, corpus, monkeypatch):
    saved = []
    original = CheckpointDir.save

    def spy(self, state, keep):
        saved.append((state["trainer"]["step"], state["stream"]["position"]["index"]))
        return original(self, state, keep)

    monkeypatch.setattr(CheckpointDir, "save", spy)
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(tmp_path / "r"),
                    "--max-steps", "6", "--checkpoint-every", "2", "--log-every", "3"]) == 0
    assert all(index == step for step, index in saved), saved


def _crash_at(monkeypatch, step: int) -> None:
    original = Trainer.train_step

    def crashing(self, batches):
        if self.step + 1 == step:
            raise Crash
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crashing)


def _same_run(a, b) -> None:
    def strip(recs):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert strip(records(a)) == strip(records(b))
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["trainer"]["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["trainer"]["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("crash_at", [7, 9])
def test_a_crash_after_a_periodic_checkpoint_resumes_bitwise_equal(tmp_path, corpus, monkeypatch, crash_at):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "12", "--log-every", "2",
              "--checkpoint-every", "3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_cli([*common, "--output-dir", str(straight)]) == 0
    with monkeypatch.context() as m:
        _crash_at(m, crash_at)
        with pytest.raises(Crash):
            run_cli([*common, "--output-dir", str(crashed)])
    assert run_cli([*common, "--output-dir", str(crashed), "--resume"]) == 0
    _same_run(straight, crashed)


# --- the process dies: SIGKILL, SIGTERM, in-process crashes at any step ---------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from hypothesis import given, settings  # noqa: E402

import stability.faults  # noqa: E402
from tests.strategies import crash_plans  # noqa: E402

CRASHY = [*SYNC_EVERY_STEP[:1], "2", "--rollback-after", "3", "--snapshot-every", "2", "--checkpoint-every", "3"]


def _in_process_crashes(monkeypatch) -> None:
    def crash():
        raise Crash

    monkeypatch.setattr(stability.faults, "kill_self", crash)


def _without_crash(plan: str) -> list[str]:
    rest = ",".join(item for item in plan.split(",") if item and not item.startswith("crash@"))
    return ["--inject-fault", rest] if rest else []


@settings(max_examples=6)
@given(case=crash_plans(steps=14, first_checkpoint=3))
def test_any_crash_after_a_checkpoint_resumes_bitwise_equal_to_the_uninterrupted_run(
        tmp_path_factory, corpus, case):
    plan, crash = case
    tmp = tmp_path_factory.mktemp("crash")
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, *CRASHY, "--max-steps", "14"]
    straight, crashed = tmp / "straight", tmp / "crashed"
    code = run_cli([*common, "--output-dir", str(straight), *_without_crash(plan)])
    with pytest.MonkeyPatch.context() as m:
        _in_process_crashes(m)
        try:
            first = run_cli([*common, "--output-dir", str(crashed), "--inject-fault",
                             ",".join(filter(None, [plan, f"crash@{crash}"]))])
        except Crash:
            first = None
    if first is not None:  # it ended (done or exit 3) before the crash point: nothing to resume
        assert first == code
        return
    if not (crashed / "checkpoints" / "last.pt").exists():  # every checkpoint so far had NaN weights
        assert run_cli([*common, "--output-dir", str(crashed), "--resume"]) == 2
        return
    assert run_cli([*common, "--output-dir", str(crashed), "--resume", *_without_crash(plan)]) == code
    _same_run(straight, crashed)


def test_a_real_sigkill_mid_run_resumes_bitwise_equal(tmp_path, corpus):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, *CRASHY, "--max-steps", "12"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli([*common, "--output-dir", str(straight), "--inject-fault", "param:nan@5"]) == 0
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "stability", "train", *common, "--output-dir", str(killed),
                           "--inject-fault", "param:nan@5,crash@10"], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert run_cli([*common, "--output-dir", str(killed), "--resume", "--inject-fault", "param:nan@5"]) == 0
    _same_run(straight, killed)


def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, corpus, capsys):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "10", "--log-every", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli([*common, "--output-dir", str(straight)]) == 0
    assert run_cli([*common, "--output-dir", str(stopped), "--inject-fault", "sigterm@5"]) == 143
    assert "SIGTERM at step 5" in capsys.readouterr().out
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["trainer"]["step"] == 5
    assert run_cli([*common, "--output-dir", str(stopped), "--resume"]) == 0
    _same_run(straight, stopped)


def test_after_a_restart_a_rollback_goes_back_to_the_kept_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    # snapshot and kept checkpoint at step 6; the crash at 8 takes the in-memory snapshot with it
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--log-every", "2", "--rollback-after", "3",
              "--snapshot-every", "6", "--checkpoint-every", "6", "--max-steps", "14"]
    out = tmp_path / "r"
    _in_process_crashes(monkeypatch)
    with pytest.raises(Crash):
        run_cli([*common, "--output-dir", str(out), "--inject-fault", "crash@8"])
    assert [p.name for p in (out / "checkpoints").glob("step-*.pt")] == ["step-00000006.pt"]
    capsys.readouterr()
    assert run_cli([*common, "--output-dir", str(out), "--resume", "--inject-fault", "param:nan@9"]) == 0
    (rollback,) = records(out, "rollback")
    assert rollback["to_step"] == 6
    assert "rolled back to step 6 from checkpoints/step-00000006.pt" in capsys.readouterr().out


def test_a_resumed_run_keeps_its_rollback_budget_and_never_rereads_a_quarantined_batch(
        tmp_path, corpus, monkeypatch):
    args = ["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--max-rollbacks", "2", "--max-steps", "16"]
    out = tmp_path / "r"
    assert run_cli([*args, "--output-dir", str(out), "--inject-fault", "param:nan@6,sigterm@11"]) == 143
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["recovery"]["rollbacks"] == 1 and len(state["stream"]["quarantined"]) == 3
    quarantined = [(q[0], q[1], q[2]) for q in state["stream"]["quarantined"]]
    seen = _record_batches(monkeypatch)
    # one more rollback is allowed, not two: the budget came back with the checkpoint
    code = run_cli([*args, "--output-dir", str(out), "--resume", "--inject-fault", "param:nan@13,param:nan@20"])
    assert code == 3
    assert len(records(out, "rollback")) == 2
    task = _train_batches(["--data", str(corpus), *FAST, *TINY_MODEL])[0]
    read = {_index_of(x, task) for x in seen}
    assert not read & {i for _, _, i in quarantined}


def test_skips_and_rollbacks_name_their_batches_and_quarantine_jsonl_lists_them(tmp_path, corpus):
    out = tmp_path / "r"
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, *SYNC_EVERY_STEP, "--output-dir", str(out),
                    "--max-steps", "12", "--inject-fault", "param:nan@6"]) == 0
    skip = records(out, "skip")[0]
    (batch,) = skip["batches"]
    assert batch["index"] == 5 and batch["sources"] and all(s.startswith(str(corpus)) for s in batch["sources"])
    assert all((corpus / s).exists() for s in batch["sources"])
    (rollback,) = records(out, "rollback")
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["index"] for q in quarantine] == [5, 6, 7] == [b["index"] for b in rollback["batches"]]
    assert all(q["step"] == 8 and q["reason"] == "nonfinite_loss" and q["sources"] for q in quarantine)


def test_temporaries_left_by_a_killed_save_are_removed_on_resume(tmp_path, corpus):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "2", "--output-dir", str(tmp_path / "r")]
    assert run_cli(common) == 0
    orphan = tmp_path / "r" / "checkpoints" / ".last.pt.tmp-4242-deadbeef"
    orphan.write_bytes(b"half a checkpoint")
    assert run_cli([*common, "--max-steps", "3", "--resume"]) == 0
    assert not orphan.exists()


# --- checkpoints written before each part of the run kept its own state ---------------------

from stability.atomic import atomic_write  # noqa: E402
from stability.checkpoint import serialize  # noqa: E402


def as_format_1(state: dict) -> dict:
    """A checkpoint in the layout lsnn wrote before format 2 (``Run._state`` at d9394dd)."""
    run, monitor, ledger, tasks = state["run"], state["monitor"], state["ledger"], state["tasks"]
    return {
        "trainer": state["trainer"],
        "position": state["stream"]["position"],
        "stream": state["stream"],
        "ranks": [{"rng": r["rng"], "replay": r["stream"]["replay"]} for r in state["ranks"]],
        "best_val": tasks["best_val"],
        "window": {"last_sync_step": monitor["last_sync_step"], "totals": monitor["totals"],
                   "healthy": run["healthy"], "last_pos": ledger["last"], "steps": ledger["steps"]},
        "continual": {"matrix": tasks["matrix"], "task_start_step": tasks["task_start_step"], "ewc": tasks["ewc"]},
        "recovery": state["recovery"],
        "metrics_offset": run["metrics_offset"],
        "config": run["config"],
        "corpus": run["corpus"],
        "kept": state["kept"],
    }


def test_a_run_checkpointed_in_the_earlier_layout_resumes_bitwise_equal_and_rolls_back_to_its_kept_state(
        tmp_path, corpus):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--log-every", "2", "--rollback-after", "3",
              "--snapshot-every", "6", "--checkpoint-every", "6", "--max-steps", "14"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli([*common, "--output-dir", str(straight), "--inject-fault", "param:nan@9"]) == 0
    assert run_cli([*common, "--output-dir", str(stopped), "--inject-fault", "sigterm@8"]) == 143
    kept = stopped / "checkpoints" / "step-00000006.pt"
    for path in (stopped / "checkpoints").glob("*.pt"):  # a new file each: kept ones are links to an old last.pt
        atomic_write(path, serialize(as_format_1(load_checkpoint(path))))
    assert "window" in load_checkpoint(kept) and "format" not in load_checkpoint(kept)
    # after the restart the snapshot is gone: the rollback's good state is the kept step-6, in the old layout
    assert run_cli([*common, "--output-dir", str(stopped), "--resume", "--inject-fault", "param:nan@9"]) == 0
    (rollback,) = records(stopped, "rollback")
    assert rollback["to_step"] == 6
    _same_run(straight, stopped)
