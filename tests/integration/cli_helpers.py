"""Running ``lsnn`` in-process on small data, for the integration tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sysconfig
from pathlib import Path

import pytest

from stability.cli import main
from stability.trainer import Trainer

TINY_MODEL = ["--hidden-dim", "32", "--num-layers", "1", "--liquid-units", "16", "--spiking-units", "8",
              "--liquid-backbone-units", "16", "--mlp-ratio", "2"]
FAST = ["--tokenizer", "byte", "--batch-size", "4", "--sequence-length", "32", "--eval-batches", "4",
        "--warmup-steps", "5", "--learning-rate", "3e-3", "--no-report"]  # the report has tests of its own


def small_corpus(root: Path, files: int = 24) -> Path:
    """A directory of real text: some of the standard library's own modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in stdlib.glob("*.py"))[:files]
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(stdlib / name, root / name)
    return root


def run_cli(args: list[str]) -> int:
    return main(["train", *args])


def records(out: Path, kind: str | None = None) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    return [r for r in recs if kind is None or r["kind"] == kind]


def ctrl_c_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Press Ctrl-C (SIGINT to this process) as optimizer step ``step`` ends."""
    original = Trainer.train_step

    def train_step(self, batches):
        out = original(self, batches)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
