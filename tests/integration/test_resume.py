"""The run loop's two promises: a rollback re-reads from its snapshot, and a resume
continues exactly where the checkpoint says, however the process ended."""

from __future__ import annotations

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
        saved.append((state["trainer"]["step"], state["position"]["index"]))
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
