"""Recurrent decoding (model.generate) against the full-sequence forward, and export/load."""

import itertools
import json

import pytest
import torch

from model import HybridLM
from tests.helpers import assert_close
from tests.model.test_hybrid import EVERY_LAYOUT, NO_MAMBA, WITH_MAMBA, _id, tokens
from tests.tiny import tiny_hybrid

BACKBONES = ("cfc", "ltc")
GRID = [{**layout, "liquid_backbone": bb} for layout, bb in itertools.product(EVERY_LAYOUT, BACKBONES)]
# Every component at least once: each spike method, mode, gating, cross-attention and backbone.
SUBSET = [
    {**NO_MAMBA[0], "liquid_backbone": "cfc"},  # no Mamba, fixed fusion, rate
    {**NO_MAMBA[4], "liquid_backbone": "ltc"},  # no Mamba, adaptive gating, temporal
    *({**layout, "liquid_backbone": bb} for layout, bb in zip(WITH_MAMBA[::5], itertools.cycle(BACKBONES))),
]
# Incremental and full logits differ by float rounding only (fast paths vs each step's own
# formula): ~1e-7 on logits of ~0.5. A spike flipped by a wrong reset would cost ~1e-2.
TIGHT = 0.1  # of the fp32 tolerances: atol 1e-6, rtol 1e-5


def _stepped(model: HybridLM, x: torch.Tensor, state) -> torch.Tensor:
    return torch.stack([model.step(t, state) for t in x.unbind(1)], dim=1)  # b l v


def _check_layout(layout: dict) -> None:
    model = tiny_hybrid(**layout).eval()
    x = tokens(l=20)  # longer than the rate window (8) and the conv (4)
    with torch.no_grad():
        full, aux = model(x), model(x, return_aux=True)
    assert any(b.spikes.post.sum() > 0 for b in aux.blocks), "no spikes: the LIF state would be untested"
    state = model.init_state(2)
    assert_close(_stepped(model, x, state), full, scale=TIGHT, msg=f"token-by-token logits, {_id(layout)}")
    assert state.position == 20


@pytest.mark.parametrize("layout", SUBSET, ids=_id)
def test_incremental_logits_equal_full_sequence(layout):
    _check_layout(layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", GRID, ids=_id)
def test_incremental_logits_equal_full_sequence_every_layout(layout):
    _check_layout(layout)


@pytest.mark.parametrize("layout", SUBSET[::2], ids=_id)
def test_prefill_is_the_forward_and_stepping_continues_it(layout):
    model = tiny_hybrid(**layout).eval()
    x = tokens(l=20)
    with torch.no_grad():
        full = model(x)
    prompt_logits, state = model.prefill(x[:, :11])
    with torch.no_grad():
        assert torch.equal(prompt_logits, model(x[:, :11])), "prefill runs the forward itself"
    assert_close(_stepped(model, x[:, 11:], state), full[:, 11:], scale=TIGHT, msg="after the prefill")


@pytest.mark.parametrize("method", ["rate", "temporal", "potential"])
def test_prefill_longer_than_a_scan_chunk_then_step(method):
    # 70 > the 64-token chunk of the temporal filter's discounted cumsum
    model = tiny_hybrid(spike_to_mamba_method=method, use_mamba=True).eval()
    x = tokens(l=76)
    with torch.no_grad():
        full = model(x)
    _, state = model.prefill(x[:, :70])
    assert_close(_stepped(model, x[:, 70:], state), full[:, 70:], scale=TIGHT, msg=f"{method} after 70 tokens")


@pytest.mark.parametrize("sizes", [
    dict(mamba_d_conv=1, spike_rate_window=1, mlp_ratio=0, num_layers=1),  # no conv history, a 1-token window
    dict(mamba_d_conv=2, spike_rate_window=30, tie_embeddings=False, mamba_expand=1),  # a window past the end
], ids=_id)
def test_edge_sizes_decode_like_the_forward(sizes):
    model = tiny_hybrid(use_mamba=True, use_cross_attention=True, **sizes).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # an untied head starts at zero
    x = tokens(l=12)
    with torch.no_grad():
        full = model(x)
    assert_close(_stepped(model, x, model.init_state(2)), full, scale=TIGHT, msg=_id(sizes))


def test_prefill_from_a_used_state_steps_through_the_tokens():
    model = tiny_hybrid(use_mamba=True, use_cross_attention=True).eval()
    x = tokens(l=12)
    with torch.no_grad():
        full = model(x)
    _, state = model.prefill(x[:, :4])
    more, state = model.prefill(x[:, 4:], state)
    assert_close(more, full[:, 4:], scale=TIGHT, msg="a second prefill continues the first")
    assert state.position == 12


def test_state_does_not_grow_with_length_except_the_kv_cache():
    model = tiny_hybrid(use_mamba=True, use_cross_attention=True, integration_mode="bidirectional").eval()
    x = tokens(l=30)
    state = model.init_state(2)
    shapes = []
    for t in x.unbind(1):
        model.step(t, state)
        shapes.append([tuple(t.shape) for st in state.blocks for t in (
            st.spiking.mem1, st.spiking.mem2, st.spiking.window, st.liquid, st.mamba.conv, st.mamba.ssm)])
    assert all(s == shapes[0] for s in shapes), "the recurrent state must keep its size"
    cache = state.blocks[0].kv["cross_attn_back"]
    assert cache.keys.shape[2] == cache.values.shape[2] == 30, "one cached key and value per token"


def test_sequences_of_a_batch_decode_independently():
    model = tiny_hybrid(use_mamba=True).eval()
    x = tokens(l=10)
    both = _stepped(model, x, model.init_state(2))
    alone = _stepped(model, x[1:], model.init_state(1))
    assert_close(both[1:], alone, scale=TIGHT, msg="row 1 decoded with or without row 0")


def test_decoding_refuses_training_mode_and_a_wrong_batch():
    model = tiny_hybrid()
    with pytest.raises(ValueError, match="eval mode"):
        model.step(torch.zeros(2, dtype=torch.long), model.init_state(2))
    model.eval()
    with pytest.raises(ValueError, match="batch 3.*made for 2"):
        model.step(torch.zeros(3, dtype=torch.long), model.init_state(2))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        model.step(torch.zeros(2, 1, dtype=torch.long), model.init_state(2))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", SUBSET[2::3], ids=_id)
def test_incremental_logits_equal_full_sequence_on_cuda(layout, exact_fp32_cuda):
    # the full forward takes CUDA's scan (mamba-ssm's kernel, or a parallel scan): the
    # recurrent step must still agree with it to float rounding
    model = tiny_hybrid(**layout).eval().cuda()
    x = tokens(l=20).cuda()
    with torch.no_grad():
        full = model(x)
    assert_close(_stepped(model, x, model.init_state(2)), full, scale=TIGHT, msg=f"cuda, {_id(layout)}")


# --- export ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_pretrained_round_trip(tmp_path, tied):
    from safetensors import safe_open

    model = tiny_hybrid(tie_embeddings=tied, use_mamba=True, liquid_backbone="ltc").eval()
    if not tied:  # an untied head starts at zero: give it weights that show up in the logits
        torch.nn.init.normal_(model.head.weight, std=0.1)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert ("head.weight" in saved) is not tied, "a tied head is saved once, as the embedding"
    assert json.loads((tmp_path / "config.json").read_text()) == model.cfg.to_dict()
    loaded = HybridLM.from_pretrained(tmp_path)
    assert not loaded.training
    assert (loaded.head.weight is loaded.embedding.weight) is tied
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.cfg == model.cfg


def test_from_pretrained_names_the_missing_file(tmp_path):
    tiny_hybrid().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: no such file"):
        HybridLM.from_pretrained(tmp_path)


def test_from_pretrained_names_weights_that_do_not_fit_the_config(tmp_path):
    tiny_hybrid().save_pretrained(tmp_path)
    tiny_hybrid(hidden_dim=16).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors does not fit .*config.json"):
        HybridLM.from_pretrained(tmp_path)
