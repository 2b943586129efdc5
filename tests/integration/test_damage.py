"""No silent damage: bad disks, corrupt checkpoints, double interrupts, NaN weights at the
end, stale output directories, NaN gradients under fp16, long silences."""

from __future__ import annotations

import os
import signal

import pytest

from stability.checkpoint import CheckpointDir, load_checkpoint
from stability.trainer import Trainer
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli


def _args(corpus, out, *extra):
    return ["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), *extra]


# --- the output directory and the disk -----------------------------------------------------


def test_an_output_dir_that_is_a_file_or_under_one_is_bad_input(tmp_path, corpus, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "run"):
        assert run_cli(_args(corpus, out, "--max-steps", "2")) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {out}" in err and "not a directory" in err
    assert blocker.read_text() == "not a directory"


def test_a_read_only_output_dir_is_bad_input_before_training(read_only_dir, corpus, capsys):
    assert run_cli(_args(corpus, read_only_dir / "run", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "not writable" in err
    assert list(read_only_dir.iterdir()) == []


def test_a_disk_too_small_for_one_checkpoint_is_bad_input_before_training(small_disk, corpus, capsys):
    assert run_cli(_args(corpus, small_disk / "run", "--hidden-dim", "96", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "free" in err and "MB" in err


def test_a_disk_that_fills_up_keeps_the_previous_checkpoint_warns_and_retries(small_disk, corpus, monkeypatch, capsys):
    out = small_disk / "run"
    ballast = small_disk / "ballast"
    original = Trainer.train_step

    def fill_then_free(self, batches):
        result = original(self, batches)
        if self.step == 4:  # after the checkpoint of step 3: fill the disk
            with open(ballast, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
        if self.step == 8:  # and free it again before the save of step 9
            ballast.unlink()
        return result

    monkeypatch.setattr(Trainer, "train_step", fill_then_free)
    code = run_cli(_args(corpus, out, "--max-steps", "9", "--checkpoint-every", "3", "--log-every", "3"))
    printed = capsys.readouterr().out
    assert code == 0
    assert "could not write" in printed and "step 6" in printed, "the save of step 6 failed, and said so"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["step"] == 9, "the retry succeeded"
    assert [r["step"] for r in records(out, "step")] == [3, 6, 9]


# --- corrupt checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, corpus, capsys, damage):
    out = tmp_path / "run"
    common = _args(corpus, out, "--log-every", "2", "--checkpoint-every", "4")
    assert run_cli([*common, "--max-steps", "10"]) == 0
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()  # last.pt is a hard link to a kept checkpoint: damage it alone
    last.write_bytes({"truncated": data[: len(data) // 3], "random": os.urandom(4096), "empty": b""}[damage])
    capsys.readouterr()
    assert run_cli([*common, "--max-steps", "12", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"{last} is not a readable checkpoint" in printed
    assert "resuming from checkpoints/step-00000010.pt (step 10)" in printed
    assert load_checkpoint(last)["trainer"]["step"] == 12


def test_with_every_checkpoint_corrupt_resume_is_bad_input_naming_them(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli(_args(corpus, out, "--max-steps", "2")) == 0
    for path in CheckpointDir(out / "checkpoints", 3).kept() + [(0, out / "checkpoints" / "best.pt"),
                                                                (0, out / "checkpoints" / "last.pt")]:
        path[1].unlink()
        path[1].write_bytes(b"garbage")
    assert run_cli(_args(corpus, out, "--max-steps", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "last.pt is not a readable checkpoint" in err and "no intact checkpoint" in err


# --- interrupts ------------------------------------------------------------------------------


def test_a_second_ctrl_c_during_the_save_lets_it_finish_and_exits_130(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "run"
    original = CheckpointDir.save

    def impatient(self, state, keep):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while it saves
        return original(self, state, keep)

    monkeypatch.setattr(CheckpointDir, "save", impatient)
    assert run_cli(_args(corpus, out, "--max-steps", "20", "--inject-fault", "sigint@5")) == 130
    assert "still saving" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["step"] == 5


def test_a_second_ctrl_c_during_a_step_stops_at_once_keeping_the_last_checkpoint(tmp_path, corpus, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "run"
    original = Trainer.train_step

    def twice(self, batches):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", twice)
    code = run_cli(_args(corpus, out, "--max-steps", "20", "--checkpoint-every", "4"))
    assert code == 130
    assert "interrupted twice" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["step"] == 4


# --- what a run leaves behind ----------------------------------------------------------------


def test_a_run_whose_weights_end_non_finite_does_not_exit_0(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = run_cli(_args(corpus, out, "--no-guard", "--max-steps", "6", "--inject-fault", "param:nan@3"))
    assert code == 3
    printed = capsys.readouterr().out
    assert "done" not in printed and "not finite" in printed


def test_a_new_run_in_a_used_output_dir_is_refused_unless_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')  # a run that died early
    (out / "notes.txt").write_text("mine")
    assert run_cli(_args(corpus, out, "--max-steps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(_args(corpus, out, "--max-steps", "2", "--overwrite")) == 0
    assert [r["step"] for r in records(out, "step")] == [2] if records(out, "step") else True
    assert all(r.get("step") != 1 for r in records(out)), "the old records are gone"
    assert (out / "notes.txt").read_text() == "mine", "files that are not the run's are left alone"


# --- NaN gradients are not fp16 overflow -------------------------------------------------------


def test_nan_gradients_under_fp16_roll_back_and_are_attributed_not_blamed_on_fp16(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = run_cli(_args(corpus, out, "--mixed-precision", "--amp-dtype", "fp16", "--log-every", "1",
                         "--rollback-after", "3", "--snapshot-every", "2", "--max-rollbacks", "1",
                         "--max-steps", "40", "--inject-fault", "grad[blocks.0.liquid]:nan@5-40"))
    assert code == 3
    printed = capsys.readouterr().out
    assert len(records(out, "rollback")) == 1, "NaN gradients take a rollback: the loss scale cannot fix them"
    assert "fp16" not in printed.split("error:")[-1].split("\n")[0]
    assert {r["reason"] for r in records(out, "skip")} == {"nonfinite_grad"}
    assert "gradients went non-finite in: blocks.0.liquid" in printed


# --- long silences ---------------------------------------------------------------------------


def test_the_end_of_run_validation_is_capped_and_long_phases_report_progress(tmp_path, corpus, capsys):
    from stability.cli import build_parser, resolve

    spec = resolve(build_parser().parse_args(["train", "--data", str(corpus)]))
    assert spec.train.eval_batches and spec.train.eval_batches <= 256, "validation is capped by default"
    out = tmp_path / "run"
    assert run_cli(["--data", str(corpus), "--tokenizer", "byte", "--batch-size", "4", "--sequence-length", "32",
                    *TINY_MODEL, "--output-dir", str(out), "--max-steps", "2", "--eval-batches", "0",
                    "--val-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "validating" in printed, "a validation of the whole split says how far it got"
    (epoch,) = records(out, "epoch")
    assert epoch["val_batches"] > spec.train.eval_batches


def test_a_resumed_run_and_a_tokenizer_in_training_say_so(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--batch-size", "4",
            "--sequence-length", "32", *TINY_MODEL, "--eval-batches", "2", "--output-dir", str(out)]
    assert run_cli([*args, "--max-steps", "2"]) == 0
    assert "training the bpe tokenizer" in capsys.readouterr().out
    assert run_cli([*args, "--max-steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
