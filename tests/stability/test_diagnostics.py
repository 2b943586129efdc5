import math

import pytest
import torch
import torch.nn.functional as F

from model.ops.selective_scan import selective_scan_ref
from stability.diagnostics import FIELDS, BlockProbe
from stability.trainer import lm_loss
from tests.helpers import assert_close
from tests.stability.test_trainer import SyncCounter
from tests.tiny import batches, tiny_hybrid

LAYOUTS = {
    "cfc": {},
    "ltc-gated": dict(liquid_backbone="ltc", use_adaptive_gating=True),
    "mamba-parallel": dict(use_mamba=True, integration_mode="parallel"),
    "mamba-sequential-cross": dict(use_mamba=True, use_cross_attention=True),
    "mamba-bidirectional-everything": dict(use_mamba=True, integration_mode="bidirectional", use_cross_attention=True,
                                           use_adaptive_gating=True, spike_to_mamba_method="temporal"),
}


# --- the oracle: each block's submodules run by hand ----------------------------------------


def mamba_by_hand(m, hidden):
    """Mean delta and mean ||final state|| of Mamba ``m`` on ``hidden`` (b l d), with the
    reference scan."""
    l = hidden.shape[1]
    x, z = m.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :l])
    dt, B, C = m.x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(m.dt_proj(dt)).transpose(1, 2)  # b e l, the bias inside the Linear
    _, last = selective_scan_ref(x, delta, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D,
                                 z=z, return_last_state=True)
    return delta.mean(), torch.stack([s.norm() for s in last]).mean()


def max_logit_by_hand(attn, query_stream, kv_stream):
    b, l, d = query_stream.shape
    h, c = attn.heads, d // attn.heads
    q = attn.q(attn.norm_q(query_stream)).view(b, l, h, c).double()
    k = attn.kv(attn.norm_kv(kv_stream))[..., :d].reshape(b, l, h, c).double()
    logits = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(c)
    causal = torch.ones(l, l, dtype=torch.bool).tril()
    return logits[..., causal].max()


def block_by_hand(block, x):
    """The forward values of one block on its input ``x`` (b l d)."""
    cfg, got = block.cfg, {}
    h = block.norm(x)
    spikes = block.spiking(h)
    feats = spikes.features
    got["membrane_abs"] = spikes.membrane.abs().mean()
    if not cfg.use_mamba:
        liq, _ = block.liquid(torch.cat([h, feats], dim=-1))
        got["liquid_abs"] = liq.abs().mean()
        return got
    mode = cfg.integration_mode
    if mode == "bidirectional":
        m_in = h + block.spike_to_mamba(feats)
        m = block.mamba(m_in)
        liq, _ = block.liquid(torch.cat([h + block.mamba_to_liquid(m), feats], dim=-1))
    else:
        liq, _ = block.liquid(torch.cat([h, feats], dim=-1))
    a = block.stream_out(torch.cat([feats, liq], dim=-1))
    if mode == "sequential":
        m_in = h + a
        m = block.mamba(m_in)
    elif mode == "parallel":
        m_in = h
        m = block.mamba(h)
    got["liquid_abs"] = liq.abs().mean()
    got["mamba_delta"], got["mamba_state"] = mamba_by_hand(block.mamba, m_in)
    if cfg.use_cross_attention:
        logits = [max_logit_by_hand(block.cross_attn, a, m)]
        if mode == "bidirectional":
            logits.append(max_logit_by_hand(block.cross_attn_back, m, a))
        got["cross_attn_max_logit"] = max(logits)
    return got


@torch.no_grad()
def forward_by_hand(model, tokens):
    """Per block, the forward values; firing rates from the model's own HybridOutput."""
    out = model(tokens, return_aux=True)
    x, per_block = model.embedding(tokens), []
    for block, aux in zip(model.blocks, out.blocks):
        got = block_by_hand(block, x)
        got["firing_rate_pre"], got["firing_rate_post"] = aux.spikes.pre.mean(), aux.spikes.post.mean()
        per_block.append(got)
        x, _ = block(x)
    return per_block


def norms_by_hand(model, of):
    return [torch.stack([of(p).double().square().sum() for p in block.parameters() if of(p) is not None]).sum()
            .sqrt() for block in model.blocks]


def armed_step(model, probe, micro_batches):
    """One step as the trainer takes it: forward/backward per micro-batch, the gradient
    norms, an SGD update, then the probe's values."""
    probe.arm()
    for x, y in micro_batches:
        lm_loss(model(x, return_aux=True).logits, y).backward()
    probe.observe_grads()
    grads = norms_by_hand(model, lambda p: p.grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    return probe.take(), grads


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_blocks_record_equals_the_values_computed_from_the_model_by_hand(layout):
    model = tiny_hybrid(**layout)
    x, y = batches(1, vocab=64, b=2, l=12)[0]
    probe = BlockProbe(model)
    expected = forward_by_hand(model, x)
    flat, grads = armed_step(model, probe, [(x, y)])
    assert flat.shape == (probe.size,) and flat.device == x.device
    record = probe.fields(flat.tolist())
    params = norms_by_hand(model, lambda p: p.detach())  # after the update
    cfg = model.cfg
    for name in FIELDS:
        absent = (name.startswith("mamba") and not cfg.use_mamba) or (
            name == "cross_attn_max_logit" and not cfg.use_cross_attention)
        if absent:
            assert record[name] is None, name
            continue
        want = {"grad_norm": grads, "param_norm": params}.get(name) or [e[name] for e in expected]
        assert len(record[name]) == cfg.num_layers
        assert_close(torch.tensor(record[name]), torch.stack(want).float(), msg=name)


def test_mamba_state_is_the_norm_of_the_state_decoding_keeps():
    model = tiny_hybrid(use_mamba=True, integration_mode="bidirectional").eval()
    x, _ = batches(1, vocab=64, b=2, l=12)[0]
    probe = BlockProbe(model)
    probe.arm()
    with torch.no_grad():
        model(x)
    record = probe.fields(probe.take().tolist())
    _, state = model.prefill(x)  # the Mamba's own inference cache, kept by decoding
    decoded = [block.mamba.ssm.flatten(1).norm(dim=1).mean() for block in state.blocks]
    assert_close(torch.tensor(record["mamba_state"]), torch.stack(decoded), msg="mamba_state")


def test_micro_batches_are_averaged_and_the_max_logit_is_their_max():
    model = tiny_hybrid(**LAYOUTS["mamba-sequential-cross"])
    data = batches(2, vocab=64, b=2, l=12)
    expected = [forward_by_hand(model, x) for x, _ in data]
    flat, _ = armed_step(model, BlockProbe(model), data)
    record = BlockProbe(model).fields(flat.tolist())
    for i in range(model.cfg.num_layers):
        a, b = expected[0][i], expected[1][i]
        assert_close(torch.tensor(record["firing_rate_post"][i]), (a["firing_rate_post"] + b["firing_rate_post"]) / 2)
        assert_close(torch.tensor(record["mamba_delta"][i]), (a["mamba_delta"] + b["mamba_delta"]) / 2)
        assert_close(torch.tensor(record["cross_attn_max_logit"][i]),
                     torch.maximum(a["cross_attn_max_logit"], b["cross_attn_max_logit"]).float())


def test_an_unarmed_step_runs_no_hook_and_the_armed_one_changes_no_output():
    model = tiny_hybrid(**LAYOUTS["mamba-bidirectional-everything"])
    x, _ = batches(1, vocab=64, b=2, l=12)[0]
    with torch.no_grad():
        plain = model(x)
        probe = BlockProbe(model)
        probe.arm()
        armed = model(x)
        armed_calls = probe.calls
        probe.take()
        unarmed = model(x)
    per_block = 1 + 1 + 1 + 2  # spiking, liquid, mamba, both cross-attentions
    assert armed_calls == per_block * model.cfg.num_layers
    assert probe.calls == armed_calls, "a hook ran on the unarmed forward"
    assert all(not m._forward_hooks for m in model.modules()), "take() left a hook behind"
    assert torch.equal(plain, armed) and torch.equal(plain, unarmed)
    assert probe.take() is None, "nothing was armed since the last take"


@pytest.mark.parametrize("layout", ["cfc", "mamba-bidirectional-everything"])
def test_an_armed_step_and_its_values_make_no_host_sync(monkeypatch, layout):
    model = tiny_hybrid(**LAYOUTS[layout])
    data = batches(2, vocab=64, b=2, l=12)
    probe = BlockProbe(model)
    armed_step(model, probe, data[:1])  # first use: lazy kernels, numba compilation
    counter = SyncCounter(monkeypatch)
    probe.arm()
    x, y = data[1]
    lm_loss(model(x, return_aux=True).logits, y).backward()
    probe.observe_grads()
    flat = probe.take()
    assert counter.calls == []
    assert flat.isfinite().sum() == probe.size - (0 if model.cfg.use_mamba else 3 * model.cfg.num_layers)


def test_fields_refuses_values_of_another_layout():
    probe = BlockProbe(tiny_hybrid())
    with pytest.raises(ValueError, match=f"expected {probe.size} values"):
        probe.fields([0.0] * (probe.size + 1))


@pytest.mark.gpu
def test_cuda_armed_step_makes_no_sync():
    cuda = torch.device("cuda")
    model = tiny_hybrid(**LAYOUTS["mamba-bidirectional-everything"]).to(cuda)
    data = [(x.to(cuda), y.to(cuda)) for x, y in batches(2, vocab=64, b=2, l=12)]
    probe = BlockProbe(model)
    armed_step(model, probe, data[:1])  # first use: lazy kernels, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        probe.arm()
        lm_loss(model(data[1][0], return_aux=True).logits, data[1][1]).backward()
        probe.observe_grads()
        flat = probe.take()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flat.is_cuda and bool(flat.isfinite().all())
