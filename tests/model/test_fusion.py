import pytest
import torch

from model.fusion import BranchMixer, CausalCrossAttention
from tests.helpers import assert_close


def test_fixed_mixer_is_the_average_of_the_branches():
    outs = [torch.randn(2, 5, 8) for _ in range(2)]
    mixed, gates = BranchMixer(8, 2, heads=4, adaptive=False)(torch.randn(2, 5, 8), outs)
    assert gates is None
    assert_close(mixed, (outs[0] + outs[1]) / 2)


def test_adaptive_gates_are_a_per_token_per_head_distribution():
    torch.manual_seed(0)
    mixer = BranchMixer(8, 2, heads=4, adaptive=True)
    torch.nn.init.normal_(mixer.gate.weight, std=1.0)
    h = torch.randn(2, 5, 8)
    outs = [torch.randn(2, 5, 8) for _ in range(2)]
    mixed, gates = mixer(h, outs)
    assert gates.shape == (2, 5, 4, 2)
    assert_close(gates.sum(-1), torch.ones(2, 5, 4))
    assert gates.std() > 0.05, "gates must vary across tokens and heads"
    # head 1 of token (0, 3) mixes channels 2..3 with its own weights
    g = gates[0, 3, 1]
    expected = g[0] * outs[0][0, 3, 2:4] + g[1] * outs[1][0, 3, 2:4]
    assert_close(mixed[0, 3, 2:4], expected)


def test_mixer_rejects_a_wrong_number_of_branches():
    with pytest.raises(ValueError, match="expected 2 branches, got 3"):
        BranchMixer(8, 2, 2, False)(torch.randn(1, 2, 8), [torch.randn(1, 2, 8)] * 3)


def test_cross_attention_is_causal():
    torch.manual_seed(0)
    attn = CausalCrossAttention(16, heads=4, out_std=0.1)
    q, kv = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    base = attn(q, kv)
    kv2, q2 = kv.clone(), q.clone()
    kv2[:, 7:] += torch.randn(2, 5, 16)
    q2[:, 7:] += torch.randn(2, 5, 16)
    changed = attn(q2, kv2)
    assert_close(changed[:, :7], base[:, :7])
    assert not torch.allclose(changed[:, 7:], base[:, 7:])


def test_cross_attention_reads_the_other_stream():
    torch.manual_seed(0)
    attn = CausalCrossAttention(16, heads=2, out_std=0.1)
    q, kv = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    assert not torch.allclose(attn(q, kv), attn(q, kv.flip(1)))
