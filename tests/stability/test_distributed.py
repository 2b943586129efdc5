"""Under distributed training every rank takes the same skip decision.

Two CPU processes (gloo, a file store: nothing leaves the machine); only rank 1 sees a
NaN loss at step 2. Both must skip it, record the same reason, and their weights stay
identical. Under DDP the NaN reaches rank 0 through the gradient all-reduce; without
gradient averaging rank 0's own step is clean, and it counts the skip as a peer's.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stability.config import GuardConfig, TrainConfig
from stability.distributed import Dist
from stability.faults import FaultInjector, parse_faults
from stability.trainer import Trainer
from tests.tiny import TinyLM, batches


def _worker(rank: int, store: str, ddp: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyLM()) if ddp else TinyLM()
        injector = FaultInjector(parse_faults("loss:nan@2"), model) if rank == 1 else None
        cfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, log_every=4)
        trainer = Trainer(model, cfg, GuardConfig(), torch.device("cpu"), total_steps=10, injector=injector,
                          dist=Dist(rank=rank, world=2, mode="ddp"), wrapped=model)
        # each rank its own data under DDP (a sharded loader); identical replicas without
        for b in batches(4, seed=10 + rank if ddp else 10):
            trainer.train_step([b])
        counters = trainer.guard.read()
        module = model.module if ddp else model
        results[rank] = ({k: v.clone() for k, v in module.state_dict().items()}, counters["skips"],
                         counters["peer_skips"])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp", [True, False], ids=["ddp", "replicas"])
def test_every_rank_skips_a_step_that_failed_on_one_rank(tmp_path, ddp):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), ddp, results), nprocs=2, join=True)
    (w0, skips0, peer0), (w1, skips1, peer1) = results[0], results[1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
    assert skips0 == skips1 == {**skips1, "ok": 3, "nonfinite_loss": 1}
    assert peer1 == 0 and peer0 == int(not ddp)
