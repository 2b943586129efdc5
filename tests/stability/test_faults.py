import math

import pytest
import torch

from stability.faults import SPIKE_FACTOR, Fault, FaultInjector, FaultSpecError, parse_faults
from tests.tiny import TinyLM


def test_parse_the_documented_examples():
    faults = parse_faults("loss:nan@120,grad[blocks.1]:inf@30,activation[blocks.0]:-inf@10,"
                          "param:nan@60,plasticity:spike@40,overflow@5-20,loss:inf@7:1")
    assert faults == [
        Fault("loss", "nan", 120, 120), Fault("grad", "inf", 30, 30, "blocks.1"),
        Fault("activation", "-inf", 10, 10, "blocks.0"), Fault("param", "nan", 60, 60),
        Fault("plasticity", "spike", 40, 40), Fault("overflow", "inf", 5, 20), Fault("loss", "inf", 7, 7, micro=1),
    ]
    assert [str(f) for f in faults][-2:] == ["overflow@5-20", "loss:inf@7:1"]


@pytest.mark.parametrize("spec,message", [
    ("loss:nan", "cannot parse"), ("lost:nan@3", "unknown site"), ("loss:zero@3", "unknown kind"),
    ("loss[x]:nan@3", r"takes no \[target\]"), ("loss:nan@0", "count from 1"), ("grad:inf@9-3", "ranges go up"),
])
def test_malformed_plans_name_the_flag(spec, message):
    with pytest.raises(FaultSpecError, match=message) as e:
        parse_faults(spec)
    assert "--inject-fault" in str(e.value)


def test_unknown_target_is_rejected_with_examples():
    with pytest.raises(FaultSpecError, match="names no module.*blocks"):
        FaultInjector(parse_faults("grad[blocks.7]:nan@1"), TinyLM())


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_loss_fault_fires_only_at_its_step_and_micro_batch(kind):
    inj = FaultInjector(parse_faults(f"loss:{kind}@3:1"), TinyLM())
    seen = []
    for attempt in (2, 3):
        inj.begin_step(attempt)
        seen += [float(inj.on_loss(torch.tensor(2.0), micro)) for micro in (0, 1)]
    assert seen[:3] == [2.0, 2.0, 2.0]
    assert str(seen[3]) == str(float(kind))
    assert [a for a, _ in inj.fired] == [3]


def test_grad_fault_hits_only_the_target_module():
    model = TinyLM()
    model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
    inj = FaultInjector(parse_faults("grad[blocks.1]:nan@1"), model)
    inj.begin_step(1)
    inj.on_grads()
    bad = {n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()}
    assert bad == {"blocks.1.0.weight", "blocks.1.0.bias"}


def test_spike_multiplies_gradients():
    model = TinyLM()
    model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
    before = model.head.weight.grad.clone()
    inj = FaultInjector(parse_faults("grad:spike@1"), model)
    inj.begin_step(1)
    inj.on_grads()
    assert torch.equal(model.head.weight.grad, before * SPIKE_FACTOR)


def test_activation_fault_corrupts_the_module_output_in_training_only():
    model = TinyLM()
    inj = FaultInjector(parse_faults("activation[blocks.0]:inf@1"), model)
    inj.begin_step(1)
    model.eval()
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()
    model.train()
    assert not torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()
    inj.remove()
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()


@pytest.mark.parametrize("return_aux", [False, True])
def test_an_untargeted_activation_fault_corrupts_the_models_logits(return_aux):
    """``activation:KIND@N`` names no module: it corrupts the model's output, the logits,
    whether the model returns them alone or inside its output with the blocks' internals
    (as the trainer asks for), and leaves the rest of that output as it was."""
    model = TinyLM()
    tokens = torch.zeros(1, 3, dtype=torch.long)
    clean = model(tokens, return_aux=return_aux)
    inj = FaultInjector(parse_faults("activation:nan@1"), model)
    inj.begin_step(1)
    out = model(tokens, return_aux=return_aux)
    logits = out.logits if return_aux else out
    assert torch.isnan(logits).any()
    if return_aux:
        assert type(out) is type(clean) and out.blocks == clean.blocks
    inj.remove()
    assert torch.isfinite(model(tokens)).all()


def test_every_untargeted_activation_fault_of_a_plan_fires():
    model = TinyLM()
    inj = FaultInjector(parse_faults("activation:nan@1,activation:inf@2"), model)
    for attempt, check in ((1, torch.isnan), (2, torch.isinf)):
        inj.begin_step(attempt)
        assert check(model(torch.zeros(1, 3, dtype=torch.long))).any(), f"the fault of step {attempt} did not fire"
    assert [(a, f.kind) for a, f in inj.fired] == [(1, "nan"), (2, "inf")]


def test_param_fault_corrupts_a_weight_before_the_step():
    model = TinyLM()
    inj = FaultInjector(parse_faults("param[head]:nan@2"), model)
    inj.begin_step(1)
    assert torch.isfinite(model.head.weight).all()
    inj.begin_step(2)
    assert math.isnan(model.head.weight.view(-1)[0].item())


def test_overflow_storm_covers_its_range():
    model = TinyLM()
    inj = FaultInjector(parse_faults("overflow@2-4"), model)
    fired = []
    for attempt in range(1, 7):
        model.zero_grad()
        model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
        inj.begin_step(attempt)
        inj.on_grads()
        fired.append(not all(torch.isfinite(p.grad).all() for p in model.parameters()))
    assert fired == [False, True, True, True, False, False]


def test_an_activation_target_whose_forward_never_runs_is_refused_naming_the_alternatives():
    """Mamba uses dt_proj's weight and bias directly: a hook on it would never fire, so an
    activation fault there would be accepted and never injected."""
    from model import HybridLM, ModelConfig

    model = HybridLM(ModelConfig(vocab_size=64, hidden_dim=16, liquid_units=8, spiking_units=8, num_layers=1,
                                 use_mamba=True))
    with pytest.raises(FaultSpecError, match=r"blocks\.0\.mamba\.dt_proj.*never runs.*blocks\.0\.mamba"):
        FaultInjector(parse_faults("activation[blocks.0.mamba.dt_proj]:nan@1"), model)
    # its parameters stay targets for the sites that act on parameters and gradients
    FaultInjector(parse_faults("grad[blocks.0.mamba.dt_proj]:nan@1,param[blocks.0.mamba.dt_proj]:nan@1"), model)
