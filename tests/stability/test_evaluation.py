"""lsnn eval: the metrics equal the trainer's validation, the text read, the baselines."""

import math

import pytest
import torch

from stability.artifacts import open_run
from stability.config import GuardConfig, TrainConfig
from stability.data import DataError, TokenBatches, unigram_loss
from stability.evaluation import eval_documents, evaluate, evaluate_run, format_result, spread
from stability.trainer import Trainer
from tests.stability.test_artifacts import fake_run
from tests.tiny import tiny_hybrid


def test_evaluate_equals_the_trainers_validation():
    model = tiny_hybrid(use_mamba=True).eval()
    stream = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(0))
    batches = TokenBatches(stream, 4, 16, shuffle=False, pad_id=0)  # last window padded: the mask matters
    ours = evaluate(model, batches.iter_epoch(0))
    trainer = Trainer(model, TrainConfig(), GuardConfig(), torch.device("cpu"), total_steps=1)
    theirs = trainer.evaluate(batches.iter_epoch(0))
    assert ours["loss"] == pytest.approx(theirs["val_loss"], rel=1e-12)
    assert ours["accuracy"] == pytest.approx(theirs["val_acc"], rel=1e-12)
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]))
    assert ours["tokens"] == 299


def test_spread_reads_batches_evenly_across_the_split():
    batches = TokenBatches(torch.arange(1000), 2, 10, shuffle=False)  # token i at position i
    firsts = [int(x[0, 0]) for x, _ in spread(batches, 5)]
    expected = [int(batches.get(0, i * len(batches) // 5)[0][0, 0]) for i in range(5)]
    assert firsts == expected and len(set(firsts)) == 5
    assert len(list(spread(batches, None))) == len(batches)
    assert len(list(spread(batches, 10_000))) == len(batches)


def test_eval_documents_reads_all_the_text_of_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    docs = eval_documents(tmp_path)
    assert sorted(d.text for d in docs) == ["first file", "second file"]
    assert [d.text for d in eval_documents(tmp_path / "a.txt")] == ["first file"], "one small file is enough"


@pytest.mark.parametrize("setup,message", [
    (lambda p: p, "--data .*missing: no such file or directory"),
    (lambda p: (p.write_text(""), p)[1], "--data .*: the file is empty"),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00"), p)[1], "--data .*: the file is binary or not UTF-8"),
    (lambda p: (p.mkdir(), p)[1], "--data .*: no text files in the directory"),
])
def test_eval_documents_names_the_data_flag(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        eval_documents(setup(tmp_path / "missing"))


def test_evaluate_run_on_data_reports_metrics_and_unigram_baselines(tmp_path):
    fake_run(tmp_path / "run")
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    result = evaluate_run(open_run(tmp_path / "run"), data=text)
    tokens = torch.tensor(list(text.read_bytes()) + [0])  # the document and its end-of-document token
    assert result["tokens"] == tokens.numel() - 1
    assert result["unigram_loss"] == pytest.approx(unigram_loss(tokens, 256))
    assert math.log(256) - 1 < result["loss"] < math.log(256) + 1, "random weights: about ln(vocab)"
    assert result["data"] == f"--data {text}" and result["step"] == 7
    limited = evaluate_run(open_run(tmp_path / "run"), data=text, eval_batches=2)
    assert limited["batches"] == 2 and limited["tokens"] == 2 * 2 * 16
    assert "unigram baseline" in format_result(result)[2]


def test_evaluate_run_refuses_zero_batches(tmp_path):
    fake_run(tmp_path / "run")
    with pytest.raises(DataError, match="--eval-batches must be a positive integer, got 0"):
        evaluate_run(open_run(tmp_path / "run"), data=tmp_path / "run" / "config.json", eval_batches=0)
