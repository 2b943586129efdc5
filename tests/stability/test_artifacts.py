"""Opening a run directory: config, checkpoint, tokenizer; exporting it."""

import json
from pathlib import Path

import pytest
import torch

from model import HybridLM
from stability.artifacts import ArtifactError, checkpoint_path, export_run, open_run, read_run_config
from stability.checkpoint import save_checkpoint
from stability.tokenizers import ByteTokenizer, load_saved_tokenizer, save_tokenizer
from tests.tiny import tiny_hybrid


def fake_run(root: Path, step: int = 7, which=("best", "last"), **model) -> HybridLM:
    """A run directory as `lsnn train` leaves it (config.json, checkpoints, tokenizer.json),
    without training: a tiny byte-level model at random weights."""
    net = tiny_hybrid(vocab_size=256, **model).eval()
    root.mkdir(parents=True, exist_ok=True)
    config = {"model": net.cfg.to_dict(), "train": {"batch_size": 2, "sequence_length": 16, "eval_batches": None},
              "guard": {}, "tokenizer": {"name": "byte", "vocab_size": 256}}
    (root / "config.json").write_text(json.dumps(config))
    weights = net.state_dict()
    for name in which:
        save_checkpoint(root / "checkpoints" / f"{name}.pt",
                        {"trainer": {"model": weights, "step": step}, "config": config}, weights)
    save_tokenizer(ByteTokenizer(), root)
    return net


def test_open_run_loads_the_checkpoint_model_and_tokenizer(tmp_path):
    net = fake_run(tmp_path, use_mamba=True)
    art = open_run(tmp_path)
    assert art.checkpoint == tmp_path / "checkpoints" / "best.pt"
    assert art.step == 7 and art.tokenizer.name == "byte" and not art.model.training
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(art.model(x), net(x))


@pytest.mark.parametrize("layout", ["format 1", "format 2"])
def test_the_model_configuration_is_the_checkpoints_own_in_either_layout(tmp_path, layout):
    """config.json may have been rewritten since (a resumed run with other flags); the
    checkpoint's own configuration is what its weights fit."""
    net = fake_run(tmp_path, which=())
    config = json.loads((tmp_path / "config.json").read_text())
    weights = net.state_dict()
    saved = {"config": config} if layout == "format 1" else {"format": 2, "run": {"config": config}}
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"trainer": {"model": weights, "step": 3}, **saved}, weights)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "hidden_dim": 48}}))
    art = open_run(tmp_path)
    assert art.model.cfg.hidden_dim == net.cfg.hidden_dim == 32


def test_best_is_the_default_else_last(tmp_path):
    fake_run(tmp_path, which=("last",))
    assert checkpoint_path(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(ArtifactError, match="--checkpoint best: .*best.pt does not exist; pass --checkpoint last"):
        checkpoint_path(tmp_path, "best")


@pytest.mark.parametrize("broken,message", [
    ("no_dir", "RUN_DIR .*: no such directory; pass the --output-dir"),
    ("no_config", "config.json: no such file"),
    ("bad_config", "config.json: cannot read it as JSON"),
    ("no_checkpoint", "no checkpoint \\(best.pt or last.pt\\)"),
    ("garbage_checkpoint", "best.pt is not a readable checkpoint.*pass --checkpoint last"),
    ("no_tokenizer", "tokenizer.json: cannot read the tokenizer"),
])
def test_a_broken_run_directory_names_the_file_and_the_fix(tmp_path, broken, message):
    run = tmp_path / "run"
    if broken != "no_dir":
        fake_run(run)
    if broken == "no_config":
        (run / "config.json").unlink()
    elif broken == "bad_config":
        (run / "config.json").write_text("{")
    elif broken == "no_checkpoint":
        for p in (run / "checkpoints").iterdir():
            p.unlink()
    elif broken == "garbage_checkpoint":
        (run / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    elif broken == "no_tokenizer":
        (run / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=message):
        open_run(run)


def test_a_tokenizer_of_another_size_is_refused(tmp_path, monkeypatch):
    class Wider(ByteTokenizer):
        vocab_size = 300

    fake_run(tmp_path)
    monkeypatch.setattr("stability.artifacts.load_saved_tokenizer", lambda directory: Wider())
    with pytest.raises(ArtifactError, match="has 300 tokens but the model .* has 256; the tokenizer is not the run's"):
        open_run(tmp_path)


def test_read_run_config_refuses_a_file_that_is_not_a_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_dim": 8}))  # an export's config, not a run's
    with pytest.raises(ArtifactError, match='not an lsnn run configuration \\(no "model" section\\)'):
        read_run_config(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_export_is_loadable_with_from_pretrained_and_load_saved_tokenizer(tmp_path, tied):
    net = fake_run(tmp_path / "run", tie_embeddings=tied)
    paths = export_run(open_run(tmp_path / "run"), tmp_path / "out")
    assert [p.name for p in paths] == ["model.safetensors", "config.json", "tokenizer.json"]
    assert all(p.is_file() and p.stat().st_mode & 0o777 == 0o644 for p in paths), "readable by others"
    loaded = HybridLM.from_pretrained(tmp_path / "out")
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    tok = load_saved_tokenizer(tmp_path / "out")
    assert tok.decode(tok.encode("déjà vu")) == "déjà vu"


def test_export_refuses_an_out_that_is_a_file(tmp_path):
    fake_run(tmp_path / "run")
    (tmp_path / "out").write_text("x")
    with pytest.raises(ArtifactError, match="OUT .*out exists and is not a directory"):
        export_run(open_run(tmp_path / "run"), tmp_path / "out")
