"""Open what a run left behind: its config.json, a checkpoint's model, its tokenizer.

``open_run(RUN_DIR)`` is what ``lsnn sample``, ``eval`` and ``export`` start from. Every
problem with the directory is an ``ArtifactError`` that names the file and what to do, so
the CLI exits 2 with it instead of a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model import HybridLM, ModelConfig
from stability.atomic import atomic_write
from stability.checkpoint import UnreadableCheckpoint, load_checkpoint
from stability.config import RunSpec
from stability.data import DataError
from stability.tokenizers import TOKENIZER_FILE, Tokenizer, load_saved_tokenizer, save_tokenizer

CheckpointChoice = Literal["best", "last"]
CHECKPOINTS: tuple[str, ...] = ("best", "last")


class ArtifactError(ValueError):
    """A run directory, checkpoint or tokenizer that cannot be used, with the fix."""


@dataclass
class RunArtifacts:
    run_dir: Path
    config: dict[str, Any]  # the run's config.json
    checkpoint: Path
    step: int  # optimizer steps the checkpoint had taken
    model: HybridLM  # in eval mode
    tokenizer: Tokenizer


def write_run_config(run_dir: Path, spec: RunSpec, **facts: Any) -> None:
    """``run_dir/config.json``, which ``read_run_config`` reads back: every setting of
    ``spec`` by section, what else the run was trained with (``facts``: the tokenizer, the
    corpus fingerprint, the device...), and the torch version."""
    config = {**spec.to_dict(), **facts, "torch": torch.__version__}
    atomic_write(Path(run_dir) / "config.json", json.dumps(config, indent=2, default=str))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json``; ArtifactError if the directory or the file is not there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"RUN_DIR {run_dir}: no such directory; pass the --output-dir of a `lsnn train` run")
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such file; is {run_dir} the --output-dir of a `lsnn train` run?") from e
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read it as JSON ({e}); the run directory is damaged") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ArtifactError(f"{path}: not an lsnn run configuration (no \"model\" section)")
    return config


def checkpoint_path(run_dir: Path, choice: CheckpointChoice | None = None) -> Path:
    """``checkpoints/best.pt`` else ``last.pt``, or the one ``--checkpoint`` names."""
    root = Path(run_dir) / "checkpoints"
    if choice is not None and choice not in CHECKPOINTS:
        raise ArtifactError(f"--checkpoint {choice}: choose one of {', '.join(CHECKPOINTS)}")
    candidates = [root / f"{choice}.pt"] if choice else [root / "best.pt", root / "last.pt"]
    for path in candidates:
        if path.is_file():
            return path
    if choice:
        other = "last" if choice == "best" else "best"
        raise ArtifactError(f"--checkpoint {choice}: {candidates[0]} does not exist; "
                            f"pass --checkpoint {other} or train the run further")
    raise ArtifactError(f"{root}: no checkpoint (best.pt or last.pt); the run has not saved one yet, "
                        "train it until its first epoch end or --checkpoint-every")


def load_model(path: Path, config: dict[str, Any], device: torch.device | str = "cpu") -> tuple[HybridLM, int]:
    """The model of a checkpoint (eval mode) and its step."""
    try:
        ckpt = load_checkpoint(path)
    except UnreadableCheckpoint as e:
        raise ArtifactError(f"{e}; pass --checkpoint {'last' if path.stem == 'best' else 'best'} or retrain") from e
    saved = ckpt["run"]["config"] if "run" in ckpt else ckpt.get("config", {})  # format 2, else 1
    cfg_dict = saved.get("model", config["model"])
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except ValueError as e:
        raise ArtifactError(f"{path}: its model configuration is invalid: {e}") from e
    model = HybridLM(cfg)
    try:
        model.load_state_dict(ckpt["trainer"]["model"])
    except (KeyError, RuntimeError) as e:
        raise ArtifactError(f"{path}: the weights do not fit its model configuration ({e})") from e
    return model.to(device).eval(), int(ckpt["trainer"].get("step", 0))


def open_run(run_dir: Path, checkpoint: CheckpointChoice | None = None,
             device: torch.device | str = "cpu") -> RunArtifacts:
    """A run's configuration, model (from ``checkpoint``: best, else last) and tokenizer."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    try:
        tokenizer = load_saved_tokenizer(run_dir)
    except DataError as e:
        raise ArtifactError(f"{e}; a run trained before lsnn saved its tokenizer has none: retrain it, "
                            "or copy tokenizer.json from a run with the same --tokenizer and data") from e
    model, step = load_model(path, config, device)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ArtifactError(f"{run_dir / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model in "
                            f"{path} has {model.cfg.vocab_size}; the tokenizer is not the run's")
    return RunArtifacts(run_dir, config, path, step, model, tokenizer)


def export_run(art: RunArtifacts, out: Path) -> list[Path]:
    """``lsnn export``: ``out/model.safetensors``, ``out/config.json`` (the model's
    configuration) and ``out/tokenizer.json``, loadable with ``HybridLM.from_pretrained(out)``
    and ``stability.tokenizers.load_saved_tokenizer(out)``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"OUT {out} exists and is not a directory; pass a new or existing directory")
    art.model.save_pretrained(out)
    save_tokenizer(art.tokenizer, out)
    paths = [out / HybridLM.WEIGHTS_FILE, out / HybridLM.CONFIG_FILE, out / TOKENIZER_FILE]
    for path in paths:
        path.chmod(0o644)  # an export is meant to be shared; the atomic writers create 0600 temporaries
    return paths
