"""Using what a run trained: lsnn sample, eval, export and report on a real (tiny) run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import HybridLM
from stability.artifacts import open_run
from stability.cli import main
from stability.tokenizers import load_saved_tokenizer
from tests.integration.cli_helpers import FAST, TINY_MODEL, records, run_cli


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny byte-level run with Mamba, trained for 30 steps on real text."""
    out = tmp_path_factory.mktemp("use") / "run"
    code = run_cli([*TINY_MODEL, *FAST, "--use-mamba", "--data", str(corpus), "--max-steps", "30",
                    "--log-every", "10", "--output-dir", str(out)])
    assert code == 0
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_streams_a_continuation_and_a_seed_repeats_it(trained, capsys):
    code, out, _ = _run(capsys, "sample", str(trained), "--prompt", "def ", "--max-new-tokens", "40",
                        "--seed", "3", "--temperature", "1.0")
    assert code == 0
    assert out.startswith("def ") and len(out) > len("def \n")
    assert _run(capsys, "sample", str(trained), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "3",
                "--temperature", "1.0")[1] == out
    greedy = _run(capsys, "sample", str(trained), "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0")
    assert greedy[0] == 0 and greedy[1].startswith("def ")


def test_eval_reproduces_the_runs_own_validation(trained, capsys):
    code, out, _ = _run(capsys, "eval", str(trained), "--json")
    assert code == 0
    result = json.loads(out)
    epoch = records(trained, "epoch")[-1]
    # same checkpoint (the run's only epoch end is its best), same --eval-batches, both fp32
    assert result["loss"] == pytest.approx(epoch["val_loss"], rel=1e-6)
    assert result["accuracy"] == pytest.approx(epoch["val_acc"], rel=1e-6)
    assert result["unigram_loss"] == pytest.approx(epoch["unigram_loss"], rel=1e-9)
    assert result["unigram_acc"] == pytest.approx(epoch["unigram_acc"], rel=1e-9)
    assert result["step"] == 30 and result["batches"] == 4
    code, text, _ = _run(capsys, "eval", str(trained), "--eval-batches", "2", "--checkpoint", "last")
    assert code == 0 and "perplexity" in text and "in 2 batches" in text


def test_eval_on_a_prepared_directory_reads_its_validation_split(trained, corpus, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(corpus), str(prepared), "--tokenizer", "byte"]) == 0
    capsys.readouterr()
    own = json.loads(_run(capsys, "eval", str(trained), "--json")[1])
    code, out, _ = _run(capsys, "eval", str(trained), "--data", str(prepared), "--json")
    result = json.loads(out)
    assert code == 0 and result["data"] == f"validation split of --data {prepared}"
    assert result["loss"] == own["loss"] and result["documents"] == own["documents"]
    other = tmp_path / "other"
    assert main(["prepare", str(corpus), str(other), "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "eval", str(trained), "--data", str(other))
    assert code == 2 and "prepared with another tokenizer than the run's" in err


def test_export_loads_with_from_pretrained(trained, tmp_path, capsys):
    code, out, _ = _run(capsys, "export", str(trained), str(tmp_path / "export"))
    assert code == 0 and "model.safetensors" in out
    loaded = HybridLM.from_pretrained(tmp_path / "export")
    original = open_run(trained).model
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert load_saved_tokenizer(tmp_path / "export").name == "byte"


def test_report_writes_the_png_and_the_html(trained, capsys):
    code, out, _ = _run(capsys, "report", str(trained))
    assert code == 0
    assert (trained / "report.png").stat().st_size > 10_000
    page = (trained / "report.html").read_text()
    assert "data:image/png;base64," in page and "final validation" in page


@pytest.mark.parametrize("argv,needle", [
    (["sample", "{missing}"], "RUN_DIR {missing}: no such directory"),
    (["eval", "{run}", "--data", "{missing}"], "--data {missing}: no such file or directory"),
    (["export", "{run}", "{run}/config.json"], "exists and is not a directory"),
    (["report", "{missing}"], "no such run directory"),
])
def test_bad_input_exits_2_with_a_message(trained, tmp_path, capsys, argv, needle):
    fill = dict(run=trained, missing=tmp_path / "nowhere")
    code, out, err = _run(capsys, *(a.format(**fill) for a in argv))
    assert code == 2
    assert needle.format(**fill) in err and "Traceback" not in err


def test_a_run_without_the_chosen_checkpoint_names_the_flag(trained, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    code, _, err = _run(capsys, "sample", str(copy), "--checkpoint", "best")
    assert code == 2 and "--checkpoint best" in err and "pass --checkpoint last" in err


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "-3"),
                                        ("--max-new-tokens", "0"), ("--max-new-tokens", "many")])
def test_bad_flag_values_exit_2_naming_the_flag(trained, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["sample", str(trained), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
