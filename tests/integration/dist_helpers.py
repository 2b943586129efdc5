"""Running lsnn on several CPU processes (gloo over loopback), as torchrun would start them."""

from __future__ import annotations

import faulthandler
import gc
import io
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], dump: str, codes) -> None:
    # a rank that dies on a signal (a SIGABRT from a C++ thread, say) prints every thread's
    # Python stack: the spawned process has none of pytest's faulthandler
    faulthandler.enable(all_threads=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from stability.cli import build_parser, resolve
    from stability.distributed import setup, teardown

    spec = resolve(build_parser().parse_args(["train", *argv]))
    d = setup(spec.train.distributed, spec.train.device)
    try:
        codes[rank] = _train(spec, d, rank, dump)
    finally:
        teardown(d)
        gc.collect()  # the run's cycles, as lsnn's main frees them: not left to the exit


def _train(spec, d, rank: int, dump: str):
    from stability.distributed import full
    from stability.run import EXIT_BAD_INPUT, BadInput, Run

    job = Run(spec, io.StringIO(), dist=d)
    try:
        job.setup()
    except BadInput as e:  # as lsnn's main() reports it
        return (EXIT_BAD_INPUT, str(e))
    code = job.fit()
    weights = {k: full(v).detach().cpu().clone() for k, v in job.model.state_dict().items()}
    torch.save(weights, Path(dump) / f"rank{rank}.pt")
    return code


def run_ranks(argv: list[str], dump: Path, world: int = 2) -> list[int]:
    """Train ``argv`` on ``world`` processes; each rank's final (full) weights go to
    ``dump/rank{r}.pt``; returns the exit codes in rank order."""
    dump.mkdir(parents=True, exist_ok=True)
    codes = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), argv, str(dump), codes), nprocs=world, join=True)
    return [codes[r] for r in range(world)]


def rank_weights(dump: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(dump / f"rank{rank}.pt", weights_only=True)
