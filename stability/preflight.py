"""Pre-flight: everything wrong with a run that can be found before anything is built or written.

The device and precision, the fault plan's ranks, the batch's split over processes, whether
the run fits in memory, whether --output-dir can hold it, and whether a --resume continues
the run that is there. Each check raises ``BadInput`` naming the flag or file and what to do
(the CLI exits 2 with it). The sizes come from the configuration alone: the parameter count
from one- and two-block models on the meta device, so a typo such as ``--num-layers 100000``
is refused in milliseconds, not after building 100000 blocks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from model import ModelConfig
from stability.atomic import remove_path, remove_stale_temporaries
from stability.checkpoint import CheckpointDir, recover_dirs
from stability.config import ConfigError, RunSpec, TrainConfig
from stability.distributed import Dist, barrier, broadcast, device_of, main_first
from stability.faults import Fault, parse_faults
from stability.shards import corpus_mismatch

# what a run writes in --output-dir: --overwrite deletes these, and nothing else
RUN_FILES = ("metrics.jsonl", "config.json", "tokenizer.json", "quarantine.jsonl", "report.json", "report.png",
             "report.html", "checkpoints", "tensorboard")
_RESUME_MUST_MATCH = ("batch_size", "sequence_length", "gradient_accumulation_steps", "tokenizer",
                      "vocab_size", "data", "dataset", "val_fraction", "seed", "mixed_precision",
                      "amp_dtype", "task", "log_every")
_FIXED_VOCAB = {"byte": 256, "gpt2": 50257, "o200k": 200019}
_GB = 1e9


class BadInput(ValueError):
    """A problem with the command line or its files, found before anything is written."""


@dataclass(frozen=True)
class Checked:
    """What the checks found, for the run to be built on."""

    device: torch.device  # this rank's
    amp_dtype: torch.dtype | None
    faults: list[Fault]  # this rank's faults of --inject-fault
    checkpoints: CheckpointDir  # in --output-dir, which is rank 0's runs/<timestamp> by default
    used: list[str]  # the RUN_FILES already in --output-dir (--overwrite deletes them)


def check_run(spec: RunSpec, d: Dist) -> Checked:
    """The device, the fault plan, the memory the run needs and --output-dir, checked in
    that order (cheapest first), before the data is read or anything is built or written."""
    t = spec.train
    device = device_of(d, resolve_device(t.device))
    amp_dtype = resolve_amp_dtype(t, device)
    check_cuda_graphs(spec, device, amp_dtype, d)
    faults = check_faults(spec.guard.inject_fault, d)
    out = Path(broadcast(d, default_output_dir(t) if d.main else None))
    checkpoints = CheckpointDir(out / "checkpoints", t.keep_checkpoints, d)
    main_first(d, lambda: check_memory(spec, device, d), (BadInput,), others=False)  # one verdict
    return Checked(device, amp_dtype, faults, checkpoints, check_run_dir(spec, checkpoints, d))


# --- the device ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def resolve_amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None for fp32 training; bf16 where supported under auto, else fp16."""
    if not cfg.mixed_precision:
        return None
    if cfg.amp_dtype == "fp16":
        return torch.float16
    if cfg.amp_dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def check_cuda_graphs(spec: RunSpec, device: torch.device, amp_dtype: torch.dtype | None, d: Dist) -> None:
    """--cuda-graphs where a graph can hold the step: a CUDA device, one process, the guard
    on, and no fp16 loss scaler (``stability.cuda_graphs``); each refusal says why."""
    if not spec.train.cuda_graphs:
        return
    why = None
    if device.type != "cuda":
        why = (f"it captures the training step as a CUDA graph, and this run is on {device} "
               "(no CUDA device here); drop --cuda-graphs, or run with --device cuda on a GPU machine")
    elif d.active:
        why = f"it runs in one process, and torchrun started {d.world}; drop --cuda-graphs under torchrun"
    elif not spec.guard.guard:
        why = "it replays the guarded step, and --no-guard asks for the unguarded one; drop one of the two"
    elif amp_dtype == torch.float16:
        why = ("fp16's loss scaler keeps part of its state on the host between steps; use --amp-dtype bf16, "
               "or train without --mixed-precision")
    if why is not None:
        raise BadInput(f"--cuda-graphs: {why}")


def check_faults(plan: str | None, d: Dist) -> list[Fault]:
    """This rank's faults of --inject-fault, refusing a plan that names a rank this run lacks."""
    ranks = {f.rank for f in parse_faults(plan)} - {None}
    if any(r >= d.world for r in ranks):
        raise BadInput(f"--inject-fault: rank {max(ranks)} named, but this run has {d.world} process(es) "
                       f"(ranks 0-{d.world - 1})")
    return parse_faults(plan, rank=d.rank)


# --- sizes ----------------------------------------------------------------------------------


def estimate_vocab(train_cfg: TrainConfig) -> int:
    """The vocabulary a run will have at most: --vocab-size for bpe, else the tokenizer's."""
    return _FIXED_VOCAB.get(train_cfg.tokenizer, train_cfg.vocab_size)


def count_parameters(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, int]:
    """The model's parameters, ``outside`` the blocks (embedding, final norm, head) and in
    ``a block``, counted on the meta device (nothing is allocated) from a one- and a
    two-block model: every block of a layout is the same size, so the cost does not grow
    with --num-layers (building each block took 7 minutes at --num-layers 100000)."""
    from model import HybridLM

    cfg = replace(model_cfg, vocab_size=estimate_vocab(train_cfg))
    with torch.device("meta"):
        one, two = (sum(p.numel() for p in HybridLM(replace(cfg, num_layers=n)).parameters()) for n in (1, 2))
    return {"outside": 2 * one - two, "a block": two - one}


def total_parameters(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    counts = count_parameters(model_cfg, train_cfg)
    return counts["outside"] + model_cfg.num_layers * counts["a block"]


def checkpoint_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """About what one checkpoint takes on disk: the weights and Adam's two moments, in fp32."""
    return 3 * 4 * total_parameters(model_cfg, train_cfg)


_STATE = "weights, gradients, optimizer state and the rollback snapshot"
BLOCKS, OUTSIDE, LOGITS = f"the blocks' {_STATE}", f"the embedding's and head's {_STATE}", "the logits of a micro-batch"


def estimate_training_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, device_type: str = "cpu"
                            ) -> dict[str, int]:
    """What a training step holds, by part, before anything is allocated, on a ``device_type``
    device (the loss's chunks are larger on CUDA)."""
    from model.loss import chunk_rows

    vocab = estimate_vocab(train_cfg)
    counts = count_parameters(model_cfg, train_cfg)
    fp32 = 4
    tokens = train_cfg.batch_size * train_cfg.sequence_length
    if model_cfg.chunked_loss:
        # a chunk's fp32 logits and their softmax, and the head's gradient buffers (v d), (tokens d)
        rows = min(chunk_rows(vocab, device_type), tokens)
        logits = 2 * fp32 * rows * vocab + fp32 * (vocab + tokens) * model_cfg.hidden_dim
    else:
        logits = 3 * fp32 * tokens * vocab  # fp32 logits, their log-softmax and its gradient
    # weights, gradients, Adam's two moments, and the rollback snapshot of all three
    return {BLOCKS: 7 * fp32 * model_cfg.num_layers * counts["a block"], OUTSIDE: 7 * fp32 * counts["outside"],
            LOGITS: logits}


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device``; None where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(spec: RunSpec, device: torch.device, d: Dist = Dist()) -> None:
    """Refuse, naming the flag, a run that cannot fit in memory (each process holds its
    share of the global batch), before the tokenizer or the model allocate anything (a 10^9
    --vocab-size once asked the BPE trainer for 70 GB)."""
    t, m = spec.train, spec.model
    if t.batch_size % d.world:
        raise BadInput(f"--batch-size {t.batch_size} is the global batch, split over {d.world} processes; "
                       f"make it a multiple of {d.world}")
    t = replace(t, batch_size=t.batch_size // d.world)
    parts = estimate_training_bytes(m, t, device.type)
    free, need = available_memory(device), sum(parts.values())
    if free is None or need <= free:
        return
    flags, fix = _what_to_lower(max(parts, key=parts.get), m, t)
    detail = "; ".join(f"{name}: {size / _GB:.1f} GB" for name, size in parts.items())
    raise BadInput(f"{flags}: training would need about {need / _GB:.1f} GB ({detail}) but {free / _GB:.1f} GB of "
                   f"{device} memory is free; {fix}")


def _what_to_lower(largest: str, m: ModelConfig, t: TrainConfig) -> tuple[str, str]:
    """The flags behind the largest part of the estimate, and what to do about them."""
    vocab = estimate_vocab(t)
    if largest == LOGITS:
        fix = "lower --batch-size, --sequence-length or --vocab-size"
        if not m.chunked_loss:
            fix += ", or drop --no-chunked-loss (the loss then never holds the whole logits)"
        return f"--batch-size {t.batch_size} x --sequence-length {t.sequence_length} x vocabulary {vocab}", fix
    if largest == BLOCKS:
        return (f"--num-layers {m.num_layers} x blocks of --hidden-dim {m.hidden_dim}",
                "lower --num-layers or --hidden-dim (or the units of a block)")
    return f"vocabulary {vocab} x --hidden-dim {m.hidden_dim}", "lower --vocab-size or --hidden-dim"


# --- the output directory -------------------------------------------------------------------


def default_output_dir(train: TrainConfig) -> Path:
    return Path(train.output_dir) if train.output_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def check_output_dir(out: Path, need: int) -> None:
    """Refuse, before training, an --output-dir that cannot hold the run: a file in the way,
    a read-only directory, or a disk with less free space than ``need`` bytes."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"--output-dir {out}: {existing} is a file, not a directory; choose another --output-dir")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the one sure test of writability
            pass
    except OSError as e:
        raise BadInput(f"--output-dir {out}: {existing} is not writable ({e.strerror or e}); "
                       "choose a writable --output-dir") from e
    free = shutil.disk_usage(existing).free
    if free < need:
        raise BadInput(f"--output-dir {out}: {free / 1e6:.1f} MB free on its disk, but a checkpoint and the one "
                       f"it replaces need about {need / 1e6:.1f} MB; free some space or choose another --output-dir")


def check_run_dir(spec: RunSpec, checkpoints: CheckpointDir, d: Dist) -> list[str]:
    """Everything wrong with --output-dir (``checkpoints.root``'s parent), found before
    anything is written; a resume first puts back what a writer killed mid-write left
    behind. Returns the names of RUN_FILES already there."""
    t, out = spec.train, checkpoints.root.parent
    need = 2 * checkpoint_bytes(spec.model, t) + 2**20
    main_first(d, lambda: check_output_dir(out, need), (BadInput,), others=False)
    if t.resume and d.main:
        recover_dirs(checkpoints.root)
        remove_stale_temporaries(out, checkpoints.root)
    barrier(d)
    used = [name for name in RUN_FILES if (out / name).exists()]
    if t.resume and not checkpoints.last.exists():
        raise BadInput(f"--resume: no checkpoint at {checkpoints.last}; start without --resume or fix --output-dir")
    if not t.resume and used and not t.overwrite:
        raise BadInput(f"--output-dir {out} already holds a run ({', '.join(used)}); pass --resume to continue it, "
                       "--overwrite to start over (deleting those files only), or choose another --output-dir")
    return used


def clear_run(out: Path, used: list[str]) -> None:
    """--overwrite: delete the files of the run that was in ``out``, and nothing else."""
    for name in used:
        remove_path(out / name, strict=True)


# --- resuming -----------------------------------------------------------------------------


def check_resume(ckpt: dict[str, Any], spec: RunSpec, fingerprint: str, world: int = 1) -> None:
    """Resuming continues the same run: model, data, plasticity and task flags must be
    those it started with, and so must the number of processes."""
    saved, world_was = ckpt["run"]["config"], len(ckpt["ranks"])
    problems = []
    if world_was != world:
        problems.append(f"torchrun --nproc_per_node: checkpoint was written by {world_was} process(es), "
                        f"this run has {world}")
    pairs = [(n, v, getattr(spec.model, n)) for n, v in ModelConfig.from_dict(saved["model"]).to_dict().items()
             if n != "extra"]
    pairs += [(n, saved["train"].get(n), getattr(spec.train, n)) for n in _RESUME_MUST_MATCH]
    for section in ("plasticity", "continual"):
        pairs += [(n, v, getattr(getattr(spec, section), n)) for n, v in saved[section].items()]
    for name, was, now in pairs:
        if was != now:
            problems.append(f"--{name.replace('_', '-')}: checkpoint has {was!r}, this command {now!r}")
    if not problems and ckpt["run"]["corpus"] != fingerprint:
        problems.append(corpus_mismatch(ckpt["run"]["corpus"]))
    if problems:
        raise BadInput("--resume: this command does not continue the run in --output-dir:\n  - "
                       + "\n  - ".join(problems) + "\nresume with the flags the run started with")
