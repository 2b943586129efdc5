import itertools
import math

import pytest
import torch

from model import HybridLM, ModelConfig
from model.config import INTEGRATION_MODES, SPIKE_METHODS
from model.hybrid import create_block
from tests.helpers import assert_close
from tests.tiny import tiny_hybrid, tiny_hybrid_config

NO_MAMBA = [dict(use_adaptive_gating=g, spike_to_mamba_method=m)
            for g, m in itertools.product([False, True], SPIKE_METHODS)]
WITH_MAMBA = [dict(use_mamba=True, integration_mode=mode, use_adaptive_gating=g, use_cross_attention=x,
                   spike_to_mamba_method=m)
              for mode, g, x, m in itertools.product(INTEGRATION_MODES, [False, True], [False, True], SPIKE_METHODS)]
EVERY_LAYOUT = NO_MAMBA + WITH_MAMBA


def _id(cfg: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def tokens(b=2, l=16, vocab=64, seed=0):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", EVERY_LAYOUT, ids=_id)
def test_future_tokens_never_change_past_logits(layout):
    model = tiny_hybrid(**layout).eval()
    x = tokens()
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1 + torch.arange(8)) % 64
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert_close(a[:, :8], b[:, :8], scale=0.1, msg="logits at positions <= 7")
    assert not torch.allclose(a[:, 8:], b[:, 8:]), "the changed tokens must matter from position 8 on"


@pytest.mark.parametrize("layout", EVERY_LAYOUT, ids=_id)
def test_first_token_reaches_later_positions(layout):
    # only the recurrences (LIF, liquid, Mamba) and cross-attention carry context
    model = tiny_hybrid(**layout).eval()
    x = tokens()
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 7) % 64
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 10], model(changed)[:, 10])


@pytest.mark.parametrize("layout", NO_MAMBA[:1] + WITH_MAMBA[::5], ids=_id)
def test_initial_loss_is_near_log_vocab(layout):
    model = tiny_hybrid(**{**layout, "vocab_size": 512}, hidden_dim=64)
    x = tokens(b=4, l=32, vocab=512)
    y = tokens(b=4, l=32, vocab=512, seed=1)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(512)) < 0.1


@pytest.mark.parametrize("width", [128, 256, 512])
def test_initial_loss_is_near_log_vocab_at_real_widths(width):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=8192, hidden_dim=width, num_layers=2, use_mamba=True,
                                 integration_mode="bidirectional", use_adaptive_gating=True,
                                 use_cross_attention=True, cross_attn_heads=8, num_gate_heads=8))
    x, y = tokens(b=2, l=32, vocab=8192), tokens(b=2, l=32, vocab=8192, seed=1)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(8192)) < 0.1


BASE_MAMBA = dict(use_mamba=True, integration_mode="bidirectional", use_adaptive_gating=True,
                  use_cross_attention=True)
# (overrides of the base, the flag's new value): each must change the logits
FLAGS = [
    ({}, dict(hidden_dim=16)), ({}, dict(num_layers=1)), ({}, dict(mlp_ratio=0)), ({}, dict(mlp_ratio=3)),
    ({}, dict(tie_embeddings=False)), ({}, dict(spiking_units=12)), ({}, dict(beta=0.5)),
    ({}, dict(spike_threshold=0.5)), ({}, dict(liquid_units=12)), ({}, dict(liquid_backbone="ltc")),
    ({}, dict(liquid_backbone_units=24)), (dict(liquid_backbone="ltc"), dict(ltc_ode_unfolds=2)),
    ({}, dict(use_mamba=True)), (BASE_MAMBA, dict(mamba_d_state=8)), (BASE_MAMBA, dict(mamba_d_conv=2)),
    (BASE_MAMBA, dict(mamba_expand=1)), (BASE_MAMBA, dict(mamba_dt_rank=5)),
    ({}, dict(spike_to_mamba_method="temporal")), ({}, dict(spike_to_mamba_method="potential")),
    ({}, dict(spike_rate_window=3)), (dict(spike_to_mamba_method="temporal"), dict(spike_temporal_tau=9.0)),
    (dict(use_mamba=True), dict(integration_mode="parallel")),
    (dict(use_mamba=True), dict(integration_mode="bidirectional")),
    ({}, dict(use_adaptive_gating=True)), (BASE_MAMBA, dict(num_gate_heads=4)),
    (dict(use_mamba=True), dict(use_cross_attention=True)), (BASE_MAMBA, dict(cross_attn_heads=4)),
]


@pytest.mark.parametrize("base,change", FLAGS, ids=lambda d: _id(d) or "default")
def test_every_flag_changes_the_computation(base, change):
    x = tokens()
    with torch.no_grad():
        a = tiny_hybrid(**base).eval()(x)
        b = tiny_hybrid(**{**base, **change}).eval()(x)
    assert a.shape != b.shape or not torch.allclose(a, b)


@pytest.mark.parametrize("change", [dict(surrogate="fast_sigmoid"), dict(surrogate_scale=7.0)], ids=_id)
def test_surrogate_flags_change_the_gradient(change):
    x, y = tokens(), tokens(seed=1)
    grads = []
    for cfg in ({}, change):
        model = tiny_hybrid(**cfg)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        grads.append(model.blocks[0].spiking.encoder.weight.grad)
    assert not torch.allclose(grads[0], grads[1])


def test_dropout_changes_training_forward_only():
    x = tokens()
    plain, dropped = tiny_hybrid(), tiny_hybrid(dropout=0.5)
    torch.manual_seed(1)
    assert not torch.allclose(plain(x), dropped(x))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))


@pytest.mark.parametrize("impl", ["numba", "parallel", "chunked", "ref"])
def test_scan_implementation_does_not_change_the_result(impl):
    x = tokens()
    with torch.no_grad():
        assert_close(tiny_hybrid(**BASE_MAMBA, scan_impl=impl)(x), tiny_hybrid(**BASE_MAMBA, scan_impl="loop")(x))


@pytest.mark.parametrize("layout", [NO_MAMBA[0], WITH_MAMBA[-1]], ids=_id)
def test_outputs_and_gradients_finite_on_random_and_long_inputs(layout):
    model = tiny_hybrid(**layout)
    for b, l in [(1, 1), (3, 200)]:
        logits = model(tokens(b=b, l=l))
        logits.logsumexp(-1).mean().backward()
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


def test_aux_exposes_spike_trains_membranes_and_gates_without_a_second_pass():
    model = tiny_hybrid(**BASE_MAMBA)
    calls = []
    model.blocks[0].spiking.register_forward_hook(lambda *a: calls.append(1))
    out = model(tokens(b=3, l=10), return_aux=True)
    assert len(calls) == 1
    assert out.logits.shape == (3, 10, 64) and len(out.blocks) == 2
    for aux in out.blocks:
        assert aux.spikes.pre.shape == aux.spikes.post.shape == aux.spikes.membrane.shape == (3, 10, 8)
        assert set(aux.spikes.post.unique().tolist()) <= {0.0, 1.0}
        pre_rate, post_rate = aux.spikes.firing_rates()
        assert pre_rate.shape == (8,) and 0 <= post_rate.min() and post_rate.max() <= 1
        assert aux.gates.shape == (3, 10, 2, 2)


def test_parameter_counts_cover_every_parameter_by_component():
    model = tiny_hybrid(**BASE_MAMBA, tie_embeddings=False)
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert "other" not in counts
    assert {"embedding", "spiking", "liquid", "mamba", "gating", "cross_attention", "fusion", "mlp", "head",
            "norm"} <= counts.keys()
    plain = tiny_hybrid().parameter_counts()
    assert "mamba" not in plain and "cross_attention" not in plain and "head" not in plain  # tied


def test_tokens_of_the_wrong_shape_or_type_are_rejected():
    model = tiny_hybrid()
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(5, dtype=torch.long))


def test_unknown_integration_mode_lists_the_valid_ones():
    cfg = tiny_hybrid_config()
    object.__setattr__(cfg, "integration_mode", "diagonal")
    with pytest.raises(ValueError, match="sequential, parallel, bidirectional"):
        create_block(cfg, 0)


def test_bad_configuration_names_every_flag_at_once():
    with pytest.raises(ValueError) as e:
        ModelConfig(hidden_dim=30, use_adaptive_gating=True, num_gate_heads=4, beta=2.0,
                    integration_mode="parallel")
    text = str(e.value)
    for needle in ("--num-gate-heads 4", "--beta", "--integration-mode parallel", "--use-mamba"):
        assert needle in text


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_mixed_precision_forward_is_finite_and_close(dtype):
    model = tiny_hybrid(**BASE_MAMBA)
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1


@pytest.mark.gpu
def test_cuda_model_matches_cpu_model():
    model = tiny_hybrid(**BASE_MAMBA)
    x = tokens()
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())  # mamba-ssm kernels when installed, else the chunked scan
    assert_close(gpu.cpu(), cpu, scale=10)


def _values_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, x) -> tuple[int, int]:
    """(count, bytes) of the tensors autograd keeps for the backward of one forward."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    return len(saved), sum(t.numel() * t.element_size() for t in saved)


PHASE_4_LAYOUT = dict(use_mamba=True, integration_mode="bidirectional", use_cross_attention=True,
                      use_adaptive_gating=True)  # two cross-attentions a block


@pytest.mark.parametrize("flag,layout,watched", [
    ("recompute_mlp", {}, "mlp.0"),
    ("recompute_mlp", dict(use_mamba=True, scan_impl="loop"), "mlp.0"),
    ("recompute_cross_attention", PHASE_4_LAYOUT, "cross_attn_back.q"),
], ids=["mlp-no-mamba", "mlp-mamba", "cross-attention"])
def test_recomputation_gives_the_same_values_and_gradients_bit_for_bit(flag, layout, watched):
    on = tiny_hybrid(**layout)
    off = tiny_hybrid(**layout, **{flag: False})
    off.load_state_dict(on.state_dict())
    assert on.state_dict().keys() == off.state_dict().keys()
    x = tokens()
    (y_on, g_on), (y_off, g_off) = _values_and_grads(on, x), _values_and_grads(off, x)
    assert torch.equal(y_on, y_off)
    assert g_on.keys() == g_off.keys() and any(watched in n for n in g_on)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), f"d{name} differs"


def test_recompute_cross_attention_reaches_every_cross_attention():
    from model.fusion import CausalCrossAttention

    for flag in (True, False):
        model = tiny_hybrid(**PHASE_4_LAYOUT, recompute_cross_attention=flag)
        attns = [m for m in model.modules() if isinstance(m, CausalCrossAttention)]
        assert len(attns) == 2 * model.cfg.num_layers and all(a.recompute is flag for a in attns)


def test_recompute_mlp_keeps_only_the_mlps_input_for_the_backward():
    on, off = tiny_hybrid(), tiny_hybrid(recompute_mlp=False)
    x = tokens(b=2, l=16)
    (n_on, bytes_on), (n_off, bytes_off) = _saved_bytes(on, x), _saved_bytes(off, x)
    cfg = on.cfg
    hidden = 2 * 16 * cfg.mlp_ratio * cfg.hidden_dim * 4  # one (b l f) fp32 activation
    normed = 2 * 16 * cfg.hidden_dim * 4  # the norm's output (b l d), the first Linear's input
    stats = 2 * (2 * 16 * 4)  # the norm's mean and 1/std (b l 1 each)
    bias = cfg.mlp_ratio * cfg.hidden_dim * 4  # the first Linear's bias (f): kept to recompute its output
    # per block, the normed input, its statistics, the first Linear's output (SiLU's input)
    # and SiLU's output are not kept
    assert bytes_off - bytes_on == (normed + stats + 2 * hidden - bias) * cfg.num_layers, (bytes_off, bytes_on)
    assert n_on < n_off


def test_recompute_mlp_under_bf16_autocast_tracks_the_module_path():
    on, off = tiny_hybrid(), tiny_hybrid(recompute_mlp=False)
    off.load_state_dict(on.state_dict())
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y_on, g_on), (y_off, g_off) = _values_and_grads(on, x), _values_and_grads(off, x)
    assert y_on.dtype == y_off.dtype
    assert_close(y_on, y_off, dtype=torch.bfloat16, msg="logits")
    for name in g_on:
        assert g_on[name].dtype == g_off[name].dtype, name
        assert_close(g_on[name], g_off[name], dtype=torch.bfloat16, msg=f"d{name}")


@pytest.mark.parametrize("layer,width", [("mlp.1", 2), ("mlp_norm", 1)])
def test_a_forward_hook_on_the_mlp_runs_it_as_modules_so_the_hook_fires(layer, width):
    model = tiny_hybrid()
    seen = []
    model.blocks[0].get_submodule(layer).register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    model(tokens())
    assert seen == [torch.Size([2, 16, width * model.cfg.hidden_dim])]
