"""``lsnn prepare`` and training on a prepared directory through the real run loop: the
flags it was made with, exact resume across shard boundaries, and every way it can be
wrong ending in exit 2 with what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stability.checkpoint import load_checkpoint, save_checkpoint
from stability.cli import main
from stability.prepare import Settings, prepare
from stability.sources import open_source
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli
from tests.integration.test_resume import Crash, _crash_at, _same_run

RUN = [*TINY_MODEL, "--batch-size", "4", "--sequence-length", "32", "--eval-batches", "4", "--warmup-steps", "5",
       "--no-report"]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """The shared corpus prepared with `lsnn prepare` (byte-level, as the other run tests)."""
    out = tmp_path_factory.mktemp("prep") / "corpus"
    assert main(["prepare", str(corpus), str(out), "--tokenizer", "byte", "--workers", "2"]) == 0
    return out


def test_prepare_then_train_takes_the_tokenizer_from_the_directory(prepared, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", str(prepared), *RUN, "--max-steps", "6", "--log-every", "3",
                    "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["tokenizer"] == "byte" and config["tokenizer"] == {"name": "byte", "vocab_size": 256}
    assert config["data"]["prepared"] == str(prepared) and config["corpus"].startswith("prepared:")
    assert json.loads((prepared / "manifest.json").read_text())["timing"]["workers"] == 2  # --workers 2
    assert "preparing" not in capsys.readouterr().out
    # the same data through the cache: another directory, the same fingerprint
    again = tmp_path / "again"
    assert run_cli(["--data", str(corpus), "--tokenizer", "byte", *RUN, "--max-steps", "6", "--log-every", "3",
                    "--output-dir", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["corpus"] == config["corpus"]
    assert [r["loss"] for r in records(again, "step")] == [r["loss"] for r in records(out, "step")]


def _damage_truncate(p):
    shard = p / "train-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return "train-00000.bin is truncated"


def _damage_change(p):
    shard = p / "val-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x20
    shard.write_bytes(bytes(data))
    return "val-00000.bin changed since it was prepared"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_change])
def test_a_damaged_prepared_directory_exits_2_naming_the_file_and_writes_nothing(corpus, tmp_path, capsys, damage):
    path = tmp_path / "p"
    assert main(["prepare", str(corpus), str(path), "--tokenizer", "byte"]) == 0
    needle = damage(path)
    out = tmp_path / "run"
    assert run_cli(["--data", str(path), *RUN, "--max-steps", "2", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and f"prepare it again (lsnn prepare SOURCE {path}" in err
    assert not out.exists()


def test_a_directory_prepared_with_another_tokenizer_exits_2_saying_which_flags(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", str(prepared), "--tokenizer", "bpe", *RUN, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prepared with --tokenizer byte, but this command has --tokenizer bpe; pass --tokenizer byte" in err
    assert not out.exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (lambda c, t: ["prepare", str(c), str(c)], "is not an empty directory"),
    (lambda c, t: ["prepare", str(t / "nowhere"), str(t / "out")], "no such file or directory"),
    (lambda c, t: ["prepare", str(c), str(t / "out"), "--vocab-size", "100"], "--vocab-size 100: byte-level BPE"),
    (lambda c, t: ["prepare", str((t / "bad.jsonl").write_text('{"text": "a"}\n{"body": 1}\n') and t / "bad.jsonl"),
                   str(t / "out"), "--tokenizer", "byte"], "line 2: no field 'text'"),
])
def test_bad_input_to_prepare_exits_2_and_writes_nothing(corpus, tmp_path, capsys, argv, needle):
    assert main(argv(corpus, tmp_path)) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crash_at", [6, 11])
def test_a_crash_resumes_bitwise_equal_on_shards_whose_windows_cross_files(corpus, tmp_path, monkeypatch, crash_at):
    data = prepare(open_source(corpus), tmp_path / "shards", Settings(tokenizer="byte", workers=1, shard_tokens=4099))
    assert len(json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]) > 10
    common = ["--data", str(data), *RUN, "--max-steps", "12", "--log-every", "1", "--checkpoint-every", "3",
              "--rollback-after", "3", "--snapshot-every", "2", "--inject-fault", "param:nan@5"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_cli([*common, "--output-dir", str(straight)]) == 0
    assert records(straight, "rollback"), "the run rolled back and quarantined batches"
    with monkeypatch.context() as m:
        _crash_at(m, crash_at)
        with pytest.raises(Crash):
            run_cli([*common, "--output-dir", str(crashed)])
    assert run_cli([*common, "--output-dir", str(crashed), "--resume"]) == 0
    _same_run(straight, crashed)
    quarantine = [json.loads(line) for line in (crashed / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine and all((corpus / s.rsplit("/", 1)[-1]).exists() for q in quarantine for s in q["sources"])


def test_resuming_a_checkpoint_from_before_prepared_corpora_exits_2_saying_what_to_do(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(corpus), "--tokenizer", "byte", *RUN, "--log-every", "2"]
    assert run_cli([*common, "--max-steps", "2", "--output-dir", str(out)]) == 0
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["run"]["corpus"] = "0f" * 32  # what an lsnn that hashed the text in memory wrote
    save_checkpoint(last, state, state["trainer"]["model"])
    capsys.readouterr()
    assert run_cli([*common, "--max-steps", "4", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "kept its corpus in memory" in err and "start a new run" in err
    assert load_checkpoint(last)["trainer"]["step"] == 2 and torch.equal(
        load_checkpoint(last)["trainer"]["model"]["embedding.weight"], state["trainer"]["model"]["embedding.weight"])


def test_resuming_after_a_source_file_changed_exits_2_naming_the_change(corpus, tmp_path, capsys):
    source = tmp_path / "text"
    shutil.copytree(corpus, source)
    out = tmp_path / "run"
    common = ["--data", str(source), "--tokenizer", "byte", *RUN, "--log-every", "2", "--output-dir", str(out)]
    assert run_cli([*common, "--max-steps", "2"]) == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    victim = sorted(source.iterdir())[0]
    victim.write_text(victim.read_text() + "\n# one more line\n")
    capsys.readouterr()
    assert run_cli([*common, "--max-steps", "4", "--resume"]) == 2
    captured = capsys.readouterr()
    assert "changed since it was last prepared" in captured.out
    assert "the training text changed since the checkpoint" in captured.err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
