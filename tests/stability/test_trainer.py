"""The guarded training step, proved by control-vs-treatment twins.

Both twins start identical. The treatment runs every batch with a fault injected at a
known step; the control runs the same batches but never sees the faulty one. A correct
guard makes the treatment's skipped step leave no trace: parameters, Adam moments and
step counts and the learning rate end bitwise equal to the control's, and the loss scale
follows exact arithmetic (the pattern of PyTorch's grad-scaling tests).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given

from stability.config import GuardConfig, TrainConfig
from stability.faults import FaultInjector, parse_faults
from stability.guard import NONFINITE_LOSS, OVERFLOW
from stability.trainer import Trainer, lm_loss
from tests.strategies import fault_plans
from tests.tiny import TinyLM, batches, tiny_hybrid

CPU = torch.device("cpu")


def make(fault: str | None = None, amp=None, accum: int = 1, hybrid: bool | dict = False, guard: dict | None = None,
         device: torch.device = CPU, **train) -> Trainer:
    torch.manual_seed(0)
    layout = hybrid if isinstance(hybrid, dict) else {}
    model = (tiny_hybrid(vocab_size=32, **layout) if hybrid else TinyLM()).to(device)
    cfg = TrainConfig(**{"learning_rate": 1e-2, "warmup_steps": 2, "log_every": 4, "gradient_clip": 1.0,
                         "gradient_accumulation_steps": accum, **train})
    gcfg = GuardConfig(**{"growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1,
                          "overflow_patience": 100, "max_scale": 2.0**30, **(guard or {})})
    injector = FaultInjector(parse_faults(fault), model) if fault else None
    return Trainer(model, cfg, gcfg, device, total_steps=20, amp_dtype=amp, injector=injector)


def assert_same_state(a: Trainer, b: Trainer, exact: bool = True) -> None:
    """Weights, Adam's moments and step counts, the learning rate and the good steps of two
    trainers are the same: bit for bit, or, ``exact=False``, the weights and moments within
    1e-4 relative and 1e-5 absolute (the counts stay exact). That is for CUDA, whose backward
    kernels add with atomics (the Triton scan's dB and dC, attention's, the embedding's) in
    any order, so twins differ in the last bits; a step that leaked moves the weights by
    about the learning rate (1e-2 here) and adds one to every parameter's step count."""
    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-4, atol=1e-5)

    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert same(pa, pb), f"parameter {name} differs"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert same(sa["state"][k][key], sb["state"][k][key]), f"optimizer {key} of param {k} differs"
        assert torch.equal(sa["state"][k]["step"], sb["state"][k]["step"]), f"optimizer step of param {k} differs"
    assert torch.equal(a.current_lr(), b.current_lr())
    assert int(a.guard.good_steps) == int(b.guard.good_steps)


def test_the_tolerant_state_check_admits_last_bits_but_not_a_leaked_step():
    data = batches(3)
    a, b, short = make(), make(), make()
    for batch in data:
        a.train_step([batch])
        b.train_step([batch])
    for batch in data[:2]:
        short.train_step([batch])
    with torch.no_grad():
        next(b.model.parameters()).mul_(1 + 3e-7)  # the last bits, as CUDA's atomics move them
    assert_same_state(a, b, exact=False)
    with pytest.raises(AssertionError, match="parameter"):
        assert_same_state(a, b)
    with pytest.raises(AssertionError):  # one step fewer: its weights and step counts differ
        assert_same_state(a, short, exact=False)
    with torch.no_grad():
        next(b.model.parameters()).add_(1e-3)  # a tenth of one step's move
    with pytest.raises(AssertionError, match="parameter"):
        assert_same_state(a, b, exact=False)


def run_twins(site: str, kind: str, at: int, n: int = 6, hybrid: bool | dict = False, **kw):
    data = [(x.to(kw.get("device", CPU)), y.to(kw.get("device", CPU))) for x, y in batches(n)]
    treated = make(f"{site}:{kind}@{at}", hybrid=hybrid, **kw)
    control = make(hybrid=hybrid, **kw)
    for i, b in enumerate(data, start=1):
        treated.train_step([b])
        if i != at:
            control.train_step([b])
    return treated, control


# the loss, every gradient group (each block, the shared head), every block's activations and
# the model's output (an untargeted activation fault: the logits)
SITES = ["loss", "grad", "grad[blocks.0]", "grad[blocks.1]", "grad[head]", "activation[blocks.0]",
         "activation[blocks.1]", "activation"]


# a -inf logit is a masked one: the loss and its gradients stay finite (see below)
FAULTS = [(site, kind) for site in SITES for kind in ("nan", "inf", "-inf") if (site, kind) != ("activation", "-inf")]


@pytest.mark.parametrize("site,kind", FAULTS)
@pytest.mark.parametrize("at", [1, 3])
def test_skipped_step_leaves_no_trace_fp32(site, kind, at):
    treated, control = run_twins(site, kind, at)
    assert_same_state(treated, control)
    counters = treated.guard.read()
    assert sum(v for k, v in counters["skips"].items() if k != "ok") == 1
    expected = ("nonfinite_grad" if kind == "nan" else "overflow") if site.startswith("grad") else "nonfinite_loss"
    assert counters["skips"][expected] == 1


def test_a_minus_inf_logit_is_a_step_taken_not_a_fault():
    """``activation:-inf`` on the model's output sets one logit to -inf: softmax gives that
    token probability 0, and the loss and every gradient stay finite (unless it was the
    target), so the guard must take the step rather than skip it."""
    treated, control = run_twins("activation", "-inf", 3)
    assert treated.guard.read()["skips"]["ok"] == 6
    assert treated.guard.read()["good_steps"] == control.guard.read()["good_steps"] + 1
    assert all(torch.isfinite(p).all() for p in treated.model.parameters())


def test_spike_under_skip_policy_leaves_no_trace():
    guard = {"spike_policy": "skip", "spike_warmup": 3, "spike_zscore": 3.0}
    treated, control = run_twins("grad", "spike", 6, n=9, guard=guard)
    assert_same_state(treated, control)
    # short warm-up statistics also flag a natural spike, in both twins alike
    assert treated.guard.read()["skips"]["spike"] == control.guard.read()["skips"]["spike"] + 1


def test_no_fault_control_is_identical_to_itself():
    # the "none" site of the sweep: a clean treatment equals a clean control step for step
    data = batches(5)
    a, b = make(), make()
    for batch in data:
        a.train_step([batch])
        b.train_step([batch])
    assert_same_state(a, b)
    assert a.guard.read()["skips"]["ok"] == 5


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_skipped_step_leaves_no_trace_in_the_hybrid_model(kind):
    treated, control = run_twins("loss", kind, 2, n=4, hybrid=True)
    assert_same_state(treated, control)
    treated, control = run_twins("grad[blocks.1.liquid]", kind, 3, n=4, hybrid=True)
    assert_same_state(treated, control)
    treated, control = run_twins("activation", kind, 2, n=3, hybrid=True)  # HybridLM's output: the logits
    assert_same_state(treated, control)
    assert treated.guard.read()["skips"]["nonfinite_loss"] == 1


def test_unguarded_step_is_corrupted_by_the_same_fault():
    # the guard is what makes the twins equal: without it the weights go non-finite
    treated, _ = run_twins("grad", "nan", 2, guard={"guard": False})
    assert not all(torch.isfinite(p).all() for p in treated.model.parameters())


@pytest.mark.parametrize("micro", [0, 1, 2])
def test_nonfinite_micro_batch_voids_its_whole_accumulation_window(micro):
    data = batches(9)
    windows = [data[i:i + 3] for i in range(0, 9, 3)]
    treated = make(f"loss:nan@2:{micro}", accum=3)
    control = make(accum=3)
    for i, w in enumerate(windows, start=1):
        treated.train_step(w)
        if i != 2:
            control.train_step(w)
    assert_same_state(treated, control)
    assert treated.guard.read()["skips"]["nonfinite_loss"] == 1


def test_fp16_overflow_skips_and_scale_follows_exact_arithmetic():
    n, at = 6, 3
    treated, control = run_twins("grad", "inf", at, n=n, amp=torch.float16, guard={"init_scale": 2.0**8})
    # growth every clean step (interval 1) by 2, backoff 0.5 on the overflow
    assert treated.policy.get_scale() == 2.0**8 * 2.0 ** (n - 1) * 0.5
    assert control.policy.get_scale() == 2.0**8 * 2.0 ** (n - 1)
    # powers of two scale exactly, so the unscaled gradients and the weights are bitwise equal
    assert_same_state(treated, control)
    assert treated.guard.read()["skips"]["overflow"] == 1


def test_fp16_nonfinite_loss_skips_without_backing_off():
    treated, control = run_twins("loss", "nan", 2, n=4, amp=torch.float16, guard={"init_scale": 2.0**8})
    # the skipped step neither grows nor backs off the scale
    assert treated.policy.get_scale() == control.policy.get_scale() == 2.0**8 * 2.0**3
    assert_same_state(treated, control)
    assert treated.guard.read()["skips"]["nonfinite_loss"] == 1


def test_state_dict_round_trip_mid_run_continues_exactly():
    data = batches(8)
    straight = make("loss:nan@6", amp=torch.float16, guard={"init_scale": 2.0**6})
    first = make("loss:nan@6", amp=torch.float16, guard={"init_scale": 2.0**6})
    for b in data[:4]:
        straight.train_step([b])
        first.train_step([b])
    state = copy.deepcopy(first.state_dict())
    resumed = make("loss:nan@6", amp=torch.float16, guard={"init_scale": 2.0**10})
    resumed.load_state_dict(state)
    for b in data[4:]:
        straight.train_step([b])
        resumed.train_step([b])
    assert_same_state(straight, resumed)
    assert straight.policy.get_scale() == resumed.policy.get_scale()
    assert straight.guard.read()["skips"] == resumed.guard.read()["skips"]


def test_a_loaded_state_leaves_the_learning_rates_on_the_trainers_device():
    """A checkpoint read from disk comes in with ``map_location="cpu"``, its parameter
    groups' lr tensors on the CPU. Optimizer.load_state_dict takes those tensors as they are,
    so on a GPU every step's ``lr.copy_`` became a device-to-host copy (a host sync) and
    fused AdamW got a CPU lr. The trainer keeps its own lr tensors, on its device, and only
    their values come from the state; here the state's are on the meta device, so where the
    trainer kept them shows on any machine."""
    data = batches(4)
    t = make()
    t.train_step([data[0]])
    state = copy.deepcopy(t.state_dict())
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = torch.empty((), device="meta")
    own = [g["lr"] for g in t.optimizer.param_groups]
    t.load_state_dict(state)
    assert all(g["lr"] is mine for g, mine in zip(t.optimizer.param_groups, own, strict=True))
    assert all(g["lr"].device == t.device for g in t.optimizer.param_groups)
    t.train_step([data[1]])
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_first_step_learning_rate_is_above_zero():
    t = make(warmup_steps=100)
    t.train_step(batches(1))
    assert 0 < float(t.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2 / 101)


def test_skipped_steps_do_not_advance_the_schedule():
    t = make("loss:nan@1-3", warmup_steps=10)
    for b in batches(4):
        t.train_step([b])
    # three skipped steps, one good one: the lr of the 4th attempt is the first step's
    assert float(t.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2 / 11)


def _norm_seen_by_optimizer(t: Trainer) -> float:
    seen = []
    step = t.optimizer.step

    def spy(*args, **kwargs):
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in t.params])))
        return step(*args, **kwargs)

    t.optimizer.step = spy
    t.train_step(batches(1))
    return seen[0]


def test_gradient_clip_bounds_the_norm_the_optimizer_sees():
    clipped = _norm_seen_by_optimizer(make(gradient_clip=0.01, guard={"spike_policy": "off"}))
    unclipped = _norm_seen_by_optimizer(make(gradient_clip=0.0, guard={"spike_policy": "off"}))
    assert clipped == pytest.approx(0.01, rel=1e-3)
    assert unclipped > 0.05


@pytest.mark.parametrize("reason,fault", [(NONFINITE_LOSS, "loss:nan@1"), (OVERFLOW, "grad:inf@1")])
def test_skip_reason_is_recorded_in_history(reason, fault):
    t = make(fault)
    t.train_step(batches(1))
    row = t.guard.read()["history"][0]
    assert int(row[2]) == reason
    assert not math.isfinite(row[1])


VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
TRANSFERS = ("cpu", "numpy")


# Python data made into a tensor on a device: on a GPU a host-to-device copy from pageable
# memory, which waits for it (``torch.cuda.set_sync_debug_mode("error")`` raises there)
FROM_DATA = ("tensor", "as_tensor")


class SyncCounter:
    """Counts host syncs: any read of a tensor's value into Python, any copy of a device
    tensor to the host (``.numpy()`` of a CPU tensor is a zero-copy view the CPU spiking
    loop uses, and reads nothing), and any tensor made from Python data with a ``device``,
    which the CPU runs too but which on a GPU is a host-to-device copy."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in VALUE_READS + TRANSFERS:
            original = getattr(torch.Tensor, name)

            def wrapper(self_, *args, _name=name, _original=original, **kwargs):
                if _name in VALUE_READS or self_.device.type != "cpu":
                    self.calls.append(_name)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)
        for name in FROM_DATA:
            original = getattr(torch, name)

            def maker(*args, _name=name, _original=original, **kwargs):
                if kwargs.get("device") is not None:
                    self.calls.append(f"torch.{_name}")
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch, name, maker)


@pytest.mark.parametrize("amp", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["tiny", "hybrid"])
def test_guarded_step_makes_no_host_sync(monkeypatch, amp, hybrid):
    t = make(amp=amp, hybrid=hybrid, accum=2)
    data = batches(6)
    t.train_step(data[:2])  # first step: lazy optimizer state
    counter = SyncCounter(monkeypatch)
    t.train_step(data[2:4])
    t.train_step(data[4:6])
    assert counter.calls == []


def test_a_model_with_an_unused_parameter_steps_without_a_host_sync(monkeypatch):
    """A parameter without a gradient keeps its entry in the per-parameter norms (zero),
    placed by an index of the parameters that have one: built once, on the device, not
    from a Python list every step (on a GPU a host-to-device copy that waits)."""
    torch.manual_seed(0)
    model = TinyLM()
    model.unused = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=2, log_every=4, gradient_clip=1.0)
    t = Trainer(model, cfg, GuardConfig(), CPU, total_steps=20)
    data = batches(3)
    t.train_step([data[0]])
    counter = SyncCounter(monkeypatch)
    t.train_step([data[1]])
    t.train_step([data[2]])
    assert counter.calls == []
    assert model.unused.grad is None and int(t.guard.good_steps) == 3
    lm_loss(model(data[0][0]), data[0][1]).backward()  # the norms' layout: zero for the unused one
    norms, total = t._grad_norms([p.grad for p in t.params if p.grad is not None])
    expected = torch.stack([p.grad.norm() if p.grad is not None else torch.zeros(()) for p in t.params])
    assert torch.allclose(norms, expected) and torch.allclose(total, expected.norm())


def test_sync_counter_sees_a_sync():
    # the counter itself must be able to fail the test above
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        counter = SyncCounter(mp)
        x = torch.ones(2)
        bool(x.sum() > 0)
        x.max().item()
        x.numpy()  # a view of CPU memory: not a sync
        torch.tensor([1.0])  # stays on the host
        torch.tensor([1.0], device=x.device)  # on a GPU, a host-to-device copy
        assert counter.calls == ["__bool__", "item", "torch.tensor"]
    finally:
        mp.undo()


def _eval_loss(t: Trainer, batch) -> float:
    with torch.no_grad():
        return float(lm_loss(t.model(batch[0]), batch[1]))


@given(plan=fault_plans(steps=12))
def test_random_transient_fault_plans_are_survived(plan):
    data, probe = batches(12), batches(1, seed=99)[0]
    faulty_steps = {int(item.split("@")[1]) for item in plan.split(",") if item}
    clean, twin, faulty = make(), make(), make(plan or None)
    for i, b in enumerate(data, start=1):
        clean.train_step([b])
        faulty.train_step([b])  # never raises
        if i not in faulty_steps:
            twin.train_step([b])
    assert all(torch.isfinite(p).all() for p in faulty.model.parameters())
    counters = faulty.guard.read()
    skipped = counters["skips"]
    assert skipped["nonfinite_loss"] + skipped["overflow"] + skipped["nonfinite_grad"] == len(faulty_steps)
    assert counters["good_steps"] == 12 - len(faulty_steps)
    # exactly the run that never saw the faulty batches, and close to the clean run
    assert_same_state(faulty, twin)
    assert abs(_eval_loss(faulty, probe) - _eval_loss(clean, probe)) < 0.3


# --- CUDA variants (skipped with a reason where CUDA is absent) -----------------------

CUDA = torch.device("cuda")
MAMBA = dict(use_mamba=True, integration_mode="bidirectional", use_adaptive_gating=True, use_cross_attention=True)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("site", ["loss", "grad", "activation[blocks.0]"])
def test_cuda_autocast_skipped_step_leaves_no_trace(amp, site):
    treated, control = run_twins(site, "nan", 2, n=4, hybrid=MAMBA, amp=amp, device=CUDA,
                                 guard={"init_scale": 2.0**8})
    assert_same_state(treated, control, exact=False)  # CUDA's atomic adds: see assert_same_state
    assert sum(v for k, v in treated.guard.read()["skips"].items() if k != "ok") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_mamba_ssm_kernels_under_injected_faults(kind):
    pytest.importorskip("mamba_ssm", reason="needs the cuda extra: pip install lsnn[cuda]")
    layout = {**MAMBA, "scan_impl": "cuda"}
    treated, control = run_twins("grad[blocks.1.mamba]", kind, 2, n=4, hybrid=layout, device=CUDA)
    assert_same_state(treated, control, exact=False)
    assert treated.guard.read()["skips"]["overflow"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_guarded_step_makes_no_sync(amp):
    t = make(amp=amp, hybrid=MAMBA, accum=2, device=CUDA)
    data = [(x.to(CUDA), y.to(CUDA)) for x, y in batches(6)]
    t.train_step(data[:2])  # first step: lazy optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        outs = [t.train_step(data[2:4]), t.train_step(data[4:6])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.guard.read()["good_steps"] == 3 and all(o.verdict is not None for o in outs)


def test_loading_a_state_never_aliases_it():
    # a rollback snapshot is loaded, trained on, and may be loaded again
    t = make()
    for b in batches(2):
        t.train_step([b])
    snapshot = copy.deepcopy(t.state_dict())
    frozen = copy.deepcopy(snapshot)
    for _ in range(2):
        t.load_state_dict(snapshot)
        for b in batches(3, seed=7):
            t.train_step([b])
    for k, st in snapshot["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], frozen["optimizer"]["state"][k][key]), "training mutated the snapshot"


def test_weight_decay_shrinks_matrices_but_not_biases_or_norms():
    plain, decayed = make(weight_decay=0.0), make(weight_decay=0.5)
    for t in (plain, decayed):
        t.train_step(batches(1))
    w_plain, w_decayed = plain.model.head.weight, decayed.model.head.weight
    assert not torch.equal(w_plain, w_decayed)
    assert torch.equal(plain.model.head.bias, decayed.model.head.bias), "biases are not decayed"


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("hybrid", [False, True])
def test_logits_are_freed_before_the_backward(hybrid, accum):
    """The (b l v) logits are the largest tensor of a step (64 MB at phase 4) and the loss
    does not need them in the backward (log-softmax keeps its own output). The trainer
    kept the model's whole output, logits included, through the backward and the
    optimizer step, and into the next micro-batch's forward: the hybrid step's peak
    memory carried one or two extra copies the Transformer baseline does not."""
    import weakref

    t = make(hybrid=hybrid, accum=accum)
    alive: list[weakref.ref] = []
    seen_in_backward: list[bool] = []
    t.model.head.register_forward_hook(lambda m, i, out: alive.append(weakref.ref(out)))
    # the embedding's gradient is the backward's last: every logits tensor made so far must be gone
    t.model.embedding.weight.register_hook(lambda g: seen_in_backward.append(any(r() is not None for r in alive)))
    t.train_step(batches(accum))
    assert len(alive) == accum and len(seen_in_backward) == accum
    assert not any(seen_in_backward), "a micro-batch's logits were still referenced during a backward"


@pytest.mark.parametrize("micro", [0, 1])
def test_an_activation_fault_fires_in_its_micro_batch_only(micro):
    """``activation[...]:KIND@N:M`` corrupts micro-batch M of step N's window, once: the
    hook must know which micro-batch is running its forward pass."""
    plan = f"activation[blocks.0]:nan@2:{micro}"
    t = make(plan, accum=2)
    data = batches(6)
    for i in range(3):
        t.train_step([data[2 * i], data[2 * i + 1]])
    assert [(attempt, str(f)) for attempt, f in t.injector.fired] == [(2, plan)]
    assert t.guard.read()["skips"]["nonfinite_loss"] == 1
