"""``FusedAdamW``: torch's fused AdamW step, bit for bit, with the step counts of every group
advanced in one launch; its state dicts are torch's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stability.adamw import FusedAdamW


def _model(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 4), (4,), (2, 6), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params, lrs):
    # three groups with their own rates and decays; the last parameter never gets a gradient
    return [{"params": params[:2], "lr": lrs[0], "weight_decay": 0.1},
            {"params": params[2:4], "lr": lrs[1], "weight_decay": 0.0},
            {"params": params[4:], "lr": lrs[2], "weight_decay": 0.05}]


def _run(cls, skips, seed=0):
    params = _model(1)
    lrs = torch.tensor([1e-2, 3e-3, 5e-2]).unbind(0)
    opt = cls(_groups(params, lrs), lr=torch.zeros(()), fused=True, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    for skip in skips:
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=g)
        opt.found_inf = None if skip is None else torch.tensor(float(skip))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


@pytest.mark.parametrize("skips", [[None, None, None], [0, 1, 0, 0, 1, 1, 0]], ids=["unguarded", "guarded"])
def test_a_step_is_torchs_fused_adamw_bit_for_bit(skips):
    ours, ours_opt = _run(FusedAdamW, skips)
    theirs, theirs_opt = _run(torch.optim.AdamW, skips)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"parameter {i}"
    assert ours_opt.state_dict()["param_groups"] == theirs_opt.state_dict()["param_groups"]
    mine, torchs = ours_opt.state_dict()["state"], theirs_opt.state_dict()["state"]
    assert mine.keys() == torchs.keys() and 5 not in mine  # no gradient: no state, as torch
    for k in torchs:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[k][name], torchs[k][name]), f"{name} of parameter {k}"
    if skips[1] == 1:
        assert mine[0]["step"].item() == skips.count(0), "a skipped step does not count"


def test_a_state_dict_of_either_loads_into_the_other_and_steps_the_same():
    theirs, theirs_opt = _run(torch.optim.AdamW, [0, 0])
    params = [p.detach().clone().requires_grad_() for p in theirs]
    lrs = torch.tensor([1e-2, 3e-3, 5e-2]).unbind(0)
    ours_opt = FusedAdamW(_groups(params, lrs), lr=torch.zeros(()), betas=(0.8, 0.95), eps=1e-6)
    ours_opt.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))  # torch's loads share tensors
    for p, q in zip(params, theirs):
        p.grad = q.grad = torch.full(p.shape, 0.3)
    ours_opt.step()
    theirs_opt.step()
    for p, q in zip(params, theirs):
        assert torch.equal(p, q)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def test_a_guarded_step_launches_one_kernel_a_group_and_two_for_the_counts():
    """torch's fused step: three a group (add to the counts, the kernel, subtract them
    again on a skip). Ours: one a group, and every count's add and subtract at once; no
    host sync (``_local_scalar_dense``) in either."""
    counts = {}
    for cls in (FusedAdamW, torch.optim.AdamW):
        params = _model(2)
        opt = cls(_groups(params, torch.tensor([1e-2, 1e-2, 1e-2]).unbind(0)), lr=torch.zeros(()), fused=True)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.found_inf = torch.tensor(0.0)
        opt.step()  # the lazy state first
        with _Ops() as mode:
            opt.step()
        counts[cls.__name__] = [op for op in mode.ops if op not in ("empty", "empty_strided", "detach")
                                and not op.startswith("_record_function")]
    assert counts["FusedAdamW"].count("_fused_adamw_") == 3 and len(counts["FusedAdamW"]) == 5, counts
    assert len(counts["AdamW"]) == 9, counts


def test_anything_but_the_fused_optimizer_is_refused():
    with pytest.raises(ValueError, match="FusedAdamW is the fused AdamW"):
        FusedAdamW(_model(0), fused=False)
    opt = FusedAdamW(_model(0))
    with pytest.raises(ValueError, match="takes no closure"):
        opt.step(lambda: 0.0)
