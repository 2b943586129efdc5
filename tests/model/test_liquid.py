"""Liquid units against ncps (the oracle), the fast paths against their references, and
the properties a recurrent layer must have: memory, causality, finiteness."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.liquid import (
    CfCCell,
    LiquidLayer,
    LTCCell,
    cfc_fusable,
    cfc_sequence,
    cfc_sequence_fused,
    cfc_sequence_ref,
    ltc_sequence,
    ltc_sequence_ref,
)
from tests.helpers import assert_close

# ncps is the oracle, optional where the suite runs without the test extra (the GPU
# machine): the tests that compare against it skip there, the others still run.
HAS_NCPS = importlib.util.find_spec("ncps") is not None
if HAS_NCPS:
    from ncps.torch import LTC as NcpsLTC
    from ncps.torch import CfC as NcpsCfC
    from ncps.torch import CfCCell as NcpsCfCCell
    from ncps.torch import LTCCell as NcpsLTCCell
    from ncps.wirings import FullyConnected
needs_ncps = pytest.mark.skipif(not HAS_NCPS, reason="ncps (the test oracle) not installed: pip install lsnn[test]")

I, Q, K = 6, 5, 8  # input features, liquid units, backbone units of the small cells


def _ncps_sequence(cell: nn.Module, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step an ncps cell over the tokens, as ncps' own CfC/LTC wrappers do."""
    h, ys = h0, []
    for x_t in x.unbind(1):
        y, h = cell(x_t, h, 1.0)
        ys.append(y)
    return torch.stack(ys, 1), h


def _grads(y: torch.Tensor, h: torch.Tensor, gy: torch.Tensor, gh: torch.Tensor, wrt: list[torch.Tensor]):
    return torch.autograd.grad((y * gy).sum() + (h * gh).sum(), wrt)


def _assert_grads_close(ours, theirs, names, dtype=torch.float32, scale=1.0, msg=""):
    for name, a, e in zip(names, ours, theirs, strict=True):
        assert_close(a, e, dtype=dtype, scale=scale, msg=f"{msg} grad {name}")


def _layer_from_ncps_cfc(ncps_cfc: NcpsCfC, mode: str, activation: str, layers: int, **kw) -> LiquidLayer:
    cell = ncps_cfc.rnn_cell
    layer = LiquidLayer(
        cell.input_size, cell.hidden_size, "cfc", K,
        mode=mode, backbone_activation=activation, backbone_layers=layers, **kw,
    )
    layer.cell.load_state_dict(cell.state_dict())
    return layer


# --------------------------------------------------------------------------- CfC vs ncps

CELL_GRID = list(itertools.product(("default", "pure", "no_gate"), ("lecun_tanh", "relu"), (0, 1, 2)))


@needs_ncps
@pytest.mark.parametrize("mode,activation,layers", CELL_GRID)
def test_cfc_cell_loads_ncps_state_dict_and_steps_identically(mode, activation, layers):
    torch.manual_seed(0)
    theirs = NcpsCfCCell(I, Q, mode, activation, K, layers)
    ours = CfCCell(I, Q, mode, activation, K, layers)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict
    x, h = torch.randn(3, I), torch.randn(3, Q)
    for ts in (1.0, 0.5):
        y_ours, h_ours = ours(x, h, ts)
        y_theirs, h_theirs = theirs(x, h, ts)
        assert_close(y_ours, y_theirs, msg=f"{mode}/{activation}/{layers} ts={ts}")
        assert_close(h_ours, h_theirs)


@needs_ncps
@pytest.mark.parametrize("mode,layers", [("default", 1), ("pure", 0), ("no_gate", 2)])
def test_cfc_cell_draws_ncps_initial_weights_under_the_same_seed(mode, layers):
    torch.manual_seed(123)
    theirs = NcpsCfCCell(I, Q, mode, "lecun_tanh", K, layers).state_dict()
    torch.manual_seed(123)
    ours = CfCCell(I, Q, mode, "lecun_tanh", K, layers).state_dict()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


LAYER_CASES = [
    ("default", "lecun_tanh", 1),  # the fused hot path
    ("default", "tanh", 1),  # fused, unit scales
    ("default", "relu", 1),
    ("default", "silu", 0),
    ("pure", "lecun_tanh", 1),
    ("no_gate", "gelu", 2),
]


def _check_layer_against_ncps_cfc(mode, activation, layers, length=9, fused=True):
    torch.manual_seed(1)
    theirs = NcpsCfC(I, Q, return_sequences=True, mode=mode, activation=activation,
                     backbone_units=K, backbone_layers=layers)
    # ncps' CfC adds an output projection only with proj_size; without it fc is the identity,
    # so its readout is the cell's state, like ours.
    assert isinstance(theirs.fc, nn.Identity)
    ours = _layer_from_ncps_cfc(theirs, mode, activation, layers, fused=fused)
    x = torch.randn(3, length, I, requires_grad=True)
    h0 = torch.randn(3, Q, requires_grad=True)
    gy, gh = torch.randn(3, length, Q), torch.randn(3, Q)
    y_ours, h_ours = ours(x, h0)
    y_theirs, h_theirs = theirs(x, h0)
    tag = f"{mode}/{activation}/{layers} fused={fused}"
    assert_close(y_ours, y_theirs, msg=tag)
    assert_close(h_ours, h_theirs, msg=tag)
    names = ["x", "h0", *(n for n, _ in theirs.rnn_cell.named_parameters())]
    g_ours = _grads(y_ours, h_ours, gy, gh, [x, h0, *ours.cell.parameters()])
    g_theirs = _grads(y_theirs, h_theirs, gy, gh, [x, h0, *theirs.rnn_cell.parameters()])
    _assert_grads_close(g_ours, g_theirs, names, scale=4.0, msg=tag)


@needs_ncps
@pytest.mark.parametrize("mode,activation,layers", LAYER_CASES)
def test_cfc_layer_matches_ncps_cfc_in_values_and_gradients(mode, activation, layers):
    _check_layer_against_ncps_cfc(mode, activation, layers)


@needs_ncps
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,activation,layers,fused",
    list(itertools.product(("default", "pure", "no_gate"),
                           ("lecun_tanh", "tanh", "relu", "gelu", "silu"), (0, 1, 2), (True, False))),
)
def test_cfc_layer_matches_ncps_cfc_over_the_whole_grid(mode, activation, layers, fused):
    _check_layer_against_ncps_cfc(mode, activation, layers, length=33, fused=fused)


@needs_ncps
def test_cfc_layer_follows_ncps_after_its_optimiser_step():
    """The heads are fused into one weight per forward call, never cached: after an update
    of the cell's own parameters the layer still equals ncps with the same update."""
    torch.manual_seed(2)
    theirs = NcpsCfCCell(I, Q, backbone_units=K)
    ours = LiquidLayer(I, Q, backbone_units=K)
    ours.cell.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, I)
    for model, seq in ((ours, lambda: ours(x)), (theirs, lambda: _ncps_sequence(theirs, x, torch.zeros(2, Q)))):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        seq()[0].square().sum().backward()
        opt.step()
    assert_close(ours(x)[0], _ncps_sequence(theirs, x, torch.zeros(2, Q))[0], msg="after one SGD step")


# --------------------------------------------------------------------------- LTC vs ncps


@needs_ncps
@pytest.mark.parametrize("implicit", [True, False])
def test_ltc_cell_loads_ncps_state_dict_and_steps_identically(implicit):
    torch.manual_seed(0)
    theirs = NcpsLTCCell(FullyConnected(Q), I, implicit_param_constraints=implicit)
    ours = LTCCell(I, Q, implicit_param_constraints=implicit)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict
    x, h = torch.randn(3, I), torch.randn(3, Q)
    for elapsed in (1.0, 0.3):
        y_ours, h_ours = ours(x, h, elapsed)
        y_theirs, h_theirs = theirs(x, h, elapsed)
        assert_close(y_ours, y_theirs, msg=f"implicit={implicit} elapsed={elapsed}")
        assert_close(h_ours, h_theirs)


@needs_ncps
@pytest.mark.parametrize("implicit,fused", [(True, True), (False, True), (True, False)])
def test_ltc_layer_matches_ncps_ltc_in_values_and_gradients(implicit, fused):
    torch.manual_seed(3)
    theirs = NcpsLTC(I, Q, return_sequences=True, ode_unfolds=4, implicit_param_constraints=implicit)
    ours = LiquidLayer(I, Q, "ltc", ode_unfolds=4, fused=fused)
    ours.cell._implicit_param_constraints = implicit
    ours.cell.load_state_dict(theirs.rnn_cell.state_dict())
    x = torch.randn(3, 8, I, requires_grad=True)
    h0 = torch.randn(3, Q, requires_grad=True)
    gy, gh = torch.randn(3, 8, Q), torch.randn(3, Q)
    y_ours, h_ours = ours(x, h0)
    y_theirs, h_theirs = theirs(x, h0)
    assert_close(y_ours, y_theirs, msg="LTC readout")
    assert_close(h_ours, h_theirs, msg="LTC state")
    trainable = [n for n, p in theirs.rnn_cell.named_parameters() if p.requires_grad]
    ours_params = dict(ours.cell.named_parameters())
    theirs_params = dict(theirs.rnn_cell.named_parameters())
    g_ours = _grads(y_ours, h_ours, gy, gh, [x, h0, *(ours_params[n] for n in trainable)])
    g_theirs = _grads(y_theirs, h_theirs, gy, gh, [x, h0, *(theirs_params[n] for n in trainable)])
    _assert_grads_close(g_ours, g_theirs, ["x", "h0", *trainable], scale=4.0, msg=f"implicit={implicit}")


@needs_ncps
def test_ltc_weight_constraints_clip_like_ncps_only_without_implicit_constraints():
    torch.manual_seed(4)
    theirs = NcpsLTCCell(FullyConnected(Q), I, implicit_param_constraints=False)
    explicit = LTCCell(I, Q, implicit_param_constraints=False)
    implicit = LTCCell(I, Q, implicit_param_constraints=True)
    with torch.no_grad():
        for p in theirs.parameters():
            p.sub_(0.7)
    explicit.load_state_dict(theirs.state_dict())
    implicit.load_state_dict(theirs.state_dict())
    theirs.apply_weight_constraints()
    explicit.apply_weight_constraints()
    implicit.apply_weight_constraints()
    for name, value in theirs.state_dict().items():
        assert torch.equal(explicit.state_dict()[name], value), name
    assert (explicit.w >= 0).all() and (explicit.gleak >= 0).all()
    assert (implicit.w < 0).any(), "softplus-constrained weights must be left alone"


def test_ltc_initialisation_follows_ncps_ranges_and_polarity_from_torch_rng():
    torch.manual_seed(5)
    cell = LTCCell(40, 60)
    for name, (lo, hi) in {"gleak": (0.001, 1.0), "vleak": (-0.2, 0.2), "cm": (0.4, 0.6), "w": (0.001, 1.0),
                           "sigma": (3, 8), "mu": (0.3, 0.8), "sensory_sigma": (3, 8)}.items():
        value = getattr(cell, name)
        assert value.min() >= lo and value.max() <= hi, name
    for erev in (cell.erev, cell.sensory_erev):
        assert set(erev.unique().tolist()) == {-1.0, 1.0}
        assert abs((erev < 0).float().mean().item() - 1 / 3) < 0.05  # ncps' choice([-1, 1, 1])
    assert cell.sparsity_mask.eq(1).all() and cell.sensory_sparsity_mask.eq(1).all()
    assert "sparsity_mask" not in dict(cell.named_parameters())
    torch.manual_seed(5)
    assert torch.equal(LTCCell(40, 60).erev, cell.erev), "polarity must come from torch's RNG"
    torch.manual_seed(6)
    assert not torch.equal(LTCCell(40, 60).erev, cell.erev), "polarity must not come from a fixed seed"


# --------------------------------------------------------------------------- fast vs reference


@pytest.mark.parametrize("backbone", ["cfc", "ltc"])
def test_fast_layer_passes_gradcheck_end_to_end_in_float64(backbone):
    """Inputs, h0 and every parameter, through the weight folding of the fused path."""
    torch.manual_seed(19)
    layer = LiquidLayer(3, 4, backbone, 5, 2).double()
    names, params = zip(*[(n, p.detach().requires_grad_()) for n, p in layer.named_parameters()])
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def run(x, h0, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, h0))

    assert torch.autograd.gradcheck(run, [x, h0, *params])


def _layer_pair(backbone: str, **kw) -> tuple[LiquidLayer, LiquidLayer]:
    fast = LiquidLayer(20, 12, backbone, 24, 3, **kw)
    ref = LiquidLayer(20, 12, backbone, 24, 3, fused=False, **kw)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("backbone,length", [("cfc", 1), ("cfc", 64), ("ltc", 16)])
def test_fast_layer_equals_reference_layer_in_fp32(backbone, length):
    torch.manual_seed(9)
    fast, ref = _layer_pair(backbone)
    assert backbone == "ltc" or cfc_fusable(fast.cell)
    x = torch.randn(4, length, 20, requires_grad=True)
    h0 = torch.randn(4, 12, requires_grad=True)
    gy, gh = torch.randn(4, length, 12), torch.randn(4, 12)
    y_fast, h_fast = fast(x, h0)
    y_ref, h_ref = ref(x, h0)
    assert y_fast.dtype == y_ref.dtype == torch.float32
    assert_close(y_fast, y_ref, msg=f"{backbone} y")
    assert_close(h_fast, h_ref, msg=f"{backbone} h_last")
    names = ["x", "h0", *(n for n, _ in fast.cell.named_parameters())]
    _assert_grads_close(
        _grads(y_fast, h_fast, gy, gh, [x, h0, *fast.cell.parameters()]),
        _grads(y_ref, h_ref, gy, gh, [x, h0, *ref.cell.parameters()]),
        names, scale=4.0, msg=backbone,
    )


@pytest.mark.parametrize("backbone", ["cfc", "ltc"])
def test_bf16_inputs_run_the_recurrence_in_fp32_and_return_bf16(backbone):
    torch.manual_seed(10)
    fast, ref = _layer_pair(backbone)
    x = torch.randn(2, 24, 20)
    y16, h16 = fast(x.bfloat16())
    y32, h32 = ref(x)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert_close(y16, y32, dtype=torch.bfloat16, msg=f"{backbone} bf16 input")
    assert_close(h16, h32, dtype=torch.bfloat16, msg=f"{backbone} bf16 input, state")
    x_grad = x.bfloat16().requires_grad_()
    fast(x_grad)[0].float().sum().backward()
    assert x_grad.grad.dtype == torch.bfloat16 and x_grad.grad.isfinite().all()


@pytest.mark.parametrize("backbone", ["cfc", "ltc"])
def test_autocast_does_not_lower_the_recurrence_precision(backbone):
    torch.manual_seed(11)
    fast, ref = _layer_pair(backbone)
    x = torch.randn(2, 16, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, _ = fast(x)
    assert y_auto.dtype == torch.float32
    assert_close(y_auto, ref(x)[0], msg=f"{backbone} under bf16 autocast")


# --------------------------------------------------------------------------- recurrence

# Every path that a LiquidLayer can take: fused CfC, hoisted CfC, LTC, and the references.
PATHS = [
    pytest.param(dict(backbone="cfc"), id="cfc-fused"),
    pytest.param(dict(backbone="cfc", backbone_activation="relu"), id="cfc-hoisted"),
    pytest.param(dict(backbone="cfc", mode="pure", backbone_layers=0), id="cfc-pure-hoisted"),
    pytest.param(dict(backbone="cfc", fused=False), id="cfc-ref"),
    pytest.param(dict(backbone="ltc"), id="ltc"),
    pytest.param(dict(backbone="ltc", fused=False), id="ltc-ref"),
]


def _layer(**kw) -> LiquidLayer:
    torch.manual_seed(12)
    backbone = kw.pop("backbone")
    return LiquidLayer(10, 8, backbone, 16, 3, **kw)


@pytest.mark.parametrize("kw", PATHS)
def test_token_zero_changes_a_later_output_through_the_state(kw):
    # Pure mode contracts towards A by ~10x a token at this init, so probe it earlier.
    t = 3 if kw.get("mode") == "pure" else 10
    layer = _layer(**kw)
    x = torch.randn(2, 12, 10)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        diff = (layer(x)[0][:, t] - layer(x2)[0][:, t]).abs().max()
        # Control: the cell reset every token (a per-token map, what the old fallback to a
        # plain Linear amounted to) cannot carry token 0 to token t.
        zeros = torch.zeros(2, 8)
        control = [layer.cell(x_t, zeros)[0] for x_t in (x[:, t], x2[:, t])]
    assert diff > 1e-5, f"token 0 left the output at token {t} unchanged (max diff {diff:.2e})"
    assert torch.equal(control[0], control[1])


@pytest.mark.parametrize("kw", PATHS)
def test_output_depends_on_h0_and_differs_from_a_reset_every_token_cell(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 6, 10)
    with torch.no_grad():
        y_zero, _ = layer(x)
        y_h0, _ = layer(x, torch.randn(2, 8))
        per_token = torch.stack([layer.cell(x_t, torch.zeros(2, 8))[0] for x_t in x.unbind(1)], 1)
    assert (y_zero[:, 3] - y_h0[:, 3]).abs().max() > 1e-5, "h0 does not reach token 3"
    assert_close(y_zero[:, 0], per_token[:, 0], msg="first token from a zero state")
    assert (y_zero[:, 1:] - per_token[:, 1:]).abs().max() > 1e-4, "layer behaves as a per-token map"


@pytest.mark.parametrize("kw", PATHS)
def test_inputs_after_t_never_change_outputs_up_to_t(kw):
    layer = _layer(**kw)
    torch.manual_seed(13)
    x = torch.randn(2, 10, 10)
    t = 4
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 10 - t - 1, 10) * 50
    with torch.no_grad():
        y, y2 = layer(x)[0], layer(x2)[0]
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])
    x_grad = x.clone().requires_grad_()
    layer(x_grad)[0][:, t].sum().backward()
    assert x_grad.grad[:, t + 1 :].eq(0).all()
    assert x_grad.grad[:, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("kw", PATHS)
@pytest.mark.parametrize("magnitude", [1.0, 100.0, 1e4])
def test_outputs_and_gradients_stay_finite_for_large_inputs(kw, magnitude):
    layer = _layer(**kw)
    torch.manual_seed(14)
    x = (torch.randn(3, 20, 10) * magnitude).requires_grad_()
    y, h = layer(x, torch.randn(3, 8) * magnitude)
    assert y.isfinite().all() and h.isfinite().all()
    (y.sum() + h.sum()).backward()
    assert x.grad.isfinite().all()
    assert all(p.grad.isfinite().all() for p in layer.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- config


def test_from_config_builds_the_chosen_cell_with_the_configured_sizes():
    cfc = LiquidLayer.from_config(ModelConfig(liquid_units=24, liquid_backbone_units=40), input_size=16)
    assert isinstance(cfc.cell, CfCCell)
    assert cfc.cell.backbone[0].weight.shape == (40, 16 + 24)
    y, h = cfc(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 24) and h.shape == (2, 24)
    ltc = LiquidLayer.from_config(ModelConfig(liquid_backbone="ltc", liquid_units=24, ltc_ode_unfolds=3), 16)
    assert isinstance(ltc.cell, LTCCell) and ltc.cell.ode_unfolds == 3
    assert ltc(torch.randn(2, 5, 16))[0].shape == (2, 5, 24)


def test_backbone_choice_changes_the_computation():
    x = torch.randn(2, 5, 16)
    torch.manual_seed(15)
    cfc = LiquidLayer.from_config(ModelConfig(liquid_backbone="cfc", liquid_units=8), 16)
    torch.manual_seed(15)
    ltc = LiquidLayer.from_config(ModelConfig(liquid_backbone="ltc", liquid_units=8), 16)
    assert set(cfc.state_dict()) != set(ltc.state_dict())
    assert not torch.allclose(cfc(x)[0], ltc(x)[0])


def test_backbone_units_change_the_computation():
    x = torch.randn(2, 5, 16)
    torch.manual_seed(16)
    narrow = LiquidLayer.from_config(ModelConfig(liquid_units=8, liquid_backbone_units=32), 16)
    wide = LiquidLayer.from_config(ModelConfig(liquid_units=8, liquid_backbone_units=64), 16)
    assert narrow.cell.ff1.weight.shape == (8, 32) and wide.cell.ff1.weight.shape == (8, 64)
    # Same leading backbone units, extra units switched off: equal. Switched on: different.
    with torch.no_grad():
        for name, p in wide.cell.named_parameters():
            p.zero_()
            src = narrow.cell.state_dict()[name]
            p[tuple(slice(0, s) for s in src.shape)] = src
    assert_close(wide(x)[0], narrow(x)[0], msg="zero-padded backbone")
    with torch.no_grad():
        wide.cell.backbone[0].weight[32:] = 0.5
        wide.cell.ff1.weight[:, 32:] = 0.5
    assert not torch.allclose(wide(x)[0], narrow(x)[0])


def test_ode_unfolds_change_the_ltc_computation():
    x = torch.randn(2, 5, 16)
    torch.manual_seed(17)
    three = LiquidLayer.from_config(ModelConfig(liquid_backbone="ltc", liquid_units=8, ltc_ode_unfolds=3), 16)
    six = LiquidLayer.from_config(ModelConfig(liquid_backbone="ltc", liquid_units=8, ltc_ode_unfolds=6), 16)
    six.load_state_dict(three.state_dict())
    assert not torch.allclose(three(x)[0], six(x)[0], atol=1e-4)


def test_liquid_units_set_the_state_width():
    for units in (4, 9):
        layer = LiquidLayer.from_config(ModelConfig(liquid_units=units), 16)
        y, h = layer(torch.randn(2, 3, 16))
        assert y.shape == (2, 3, units) and h.shape == (2, units)


# --------------------------------------------------------------------------- errors


def test_unknown_backbone_names_the_valid_ones():
    with pytest.raises(ValueError, match="use one of cfc, ltc"):
        LiquidLayer(4, 4, "gru")


def test_unknown_cfc_mode_and_activation_are_refused():
    with pytest.raises(ValueError, match="default, pure, no_gate"):
        CfCCell(4, 4, mode="fast")
    with pytest.raises(ValueError, match="lecun_tanh"):
        CfCCell(4, 4, backbone_activation="softsign")


def test_wrong_input_width_says_what_was_expected():
    layer = LiquidLayer(4, 3)
    with pytest.raises(ValueError, match=r"\(batch, length, 4\), got \(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"\(2, 3\), got \(2, 4\)"):
        layer(torch.randn(2, 5, 4), torch.randn(2, 4))


def test_sequence_functions_agree_with_layer_dispatch():
    """The layer's fused CfC path is cfc_sequence's math; LTC's is ltc_sequence's."""
    torch.manual_seed(18)
    cfc = LiquidLayer(6, 5, backbone_units=7)
    ltc = LiquidLayer(6, 5, "ltc", ode_unfolds=2)
    x, h0 = torch.randn(2, 9, 6), torch.randn(2, 5)
    with torch.no_grad():
        assert_close(cfc(x, h0)[0], cfc_sequence(cfc.cell, x, h0)[0], msg="cfc")
        assert_close(cfc(x, h0)[0], cfc_sequence_ref(cfc.cell, x, h0)[0], msg="cfc ref")
        assert_close(ltc(x, h0)[0], ltc_sequence(ltc.cell, x, h0)[0], msg="ltc")
        assert_close(ltc(x, h0)[0], ltc_sequence_ref(ltc.cell, x, h0)[0], msg="ltc ref")


@pytest.mark.parametrize("ts", [1.0, 0.37])
@pytest.mark.parametrize("fused", [False, True])
def test_cfc_sequences_take_the_time_step_as_the_cell_does(ts, fused):
    """The time gate's weights are scaled by ``ts`` once for the sequence (skipped at 1):
    the same outputs and gradients as stepping the cell with that ``ts``."""
    torch.manual_seed(19)
    cell = LiquidLayer(6, 5, backbone_units=7).cell
    x, h0 = torch.randn(2, 9, 6), torch.randn(2, 5)
    run = (lambda *a: cfc_sequence_fused(*a, impl="torch")) if fused else cfc_sequence
    y, h = run(cell, x, h0, ts)
    grads = torch.autograd.grad((y.square().sum() + h.sum()), list(cell.parameters()))
    y_ref, h_ref = cfc_sequence_ref(cell, x, h0, ts)
    ref = torch.autograd.grad((y_ref.square().sum() + h_ref.sum()), list(cell.parameters()))
    assert_close(y, y_ref, msg="h sequence")
    assert_close(h, h_ref, msg="last h")
    for (name, _), g, r in zip(cell.named_parameters(), grads, ref):
        assert_close(g, r, msg=f"d {name}")


@pytest.mark.parametrize("impl,loops", [("torch", "torch_loop"), ("numba", "numba_kernel"),
                                        ("triton", "triton_kernel")])
def test_cfc_impl_picks_where_the_layers_loops_run(impl, loops, monkeypatch):
    """--cfc-impl reaches the scan: the asked implementation's loops run, forward and backward."""
    fns = ("cfc_scan_forward", "cfc_scan_backward") if impl == "triton" else ("cfc_forward", "cfc_backward")
    from model.ops import numba_support, triton_support

    if impl == "numba" and not numba_support.available():
        pytest.skip("numba not installed")
    if impl == "triton" and not triton_support.interpreted():
        pytest.skip("Triton compiles in this process: the gpu tests cover it")
    module = importlib.import_module(f"model.ops.cfc.{loops}")
    calls = []
    for fn in fns:
        monkeypatch.setattr(module, fn, lambda *a, real=getattr(module, fn), fn=fn: calls.append(fn) or real(*a))
    layer = LiquidLayer.from_config(ModelConfig(liquid_units=8, liquid_backbone_units=16, cfc_impl=impl), 6)
    assert layer.cfc_impl == impl
    y, _ = layer(torch.randn(2, 5, 6))
    y.sum().backward()
    assert calls == list(fns)


def test_unknown_cfc_impl_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown CfC implementation 'gpu'; use one of auto, numba, torch, triton"):
        LiquidLayer(4, 4, cfc_impl="gpu")
