"""The model learns: phase 1 on the embedded corpus, on a smaller budget than the README's
500 steps, ends below the unigram baseline and above its accuracy."""

from tests.integration.cli_helpers import records, run_cli


def test_phase_one_beats_the_unigram_baseline_on_the_embedded_corpus(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--phase", "1", "--max-steps", "400", "--eval-batches", "100", "--output-dir", str(out)]) == 0
    (epoch,) = records(out, "epoch")
    assert epoch["skipped"] == 0
    assert epoch["val_loss"] < epoch["unigram_loss"] - 0.1, "the model must use context"
    assert epoch["val_acc"] > 2 * epoch["unigram_acc"]
    steps = records(out, "step")
    assert steps[0]["lr"] > 0 and steps[-1]["loss"] < steps[0]["loss"] - 2.0
