from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def _cross_attention_pair(d=16, heads=4, device="cpu"):
    """The same weights with recompute on and off."""
    torch.manual_seed(0)
    on = CausalCrossAttention(d, heads=heads, out_std=0.1, recompute=True).to(device)
    off = CausalCrossAttention(d, heads=heads, out_std=0.1, recompute=False).to(device)
    off.load_state_dict(on.state_dict())
    return on, off


def _forward_backward(attn, q, kv):
    q, kv = q.clone().requires_grad_(), kv.clone().requires_grad_()
    attn.zero_grad(set_to_none=True)
    y = attn(q, kv)
    y.square().sum().backward()
    return [y.detach(), q.grad, kv.grad] + [p.grad for p in attn.parameters()]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_recomputed_cross_attention_equals_the_kept_one_bit_for_bit(amp):
    on, off = _cross_attention_pair()
    q, kv = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        got, want = _forward_backward(on, q, kv), _forward_backward(off, q, kv)
    assert len(got) == len(want) == 10  # output, dq, dkv, seven parameters
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {i} differs"


class _OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_reruns_the_norms_and_projections_in_the_backward_not_the_attention(recompute):
    on, off = _cross_attention_pair()
    attn = on if recompute else off
    with _OpCounts() as ops:
        _forward_backward(attn, torch.randn(2, 12, 16), torch.randn(2, 12, 16))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert ops.counts[attention] == 1, "the attention ran in the backward again: its outputs were not kept"
    assert ops.counts[attention + "_backward"] == 1
    # two norms in the forward, and the same two again in the backward when recomputed
    assert ops.counts["native_layer_norm"] == (4 if recompute else 2)


def test_a_forward_hook_on_a_cross_attention_layer_fires_once_per_step():
    on, _ = _cross_attention_pair()
    calls = []
    on.q.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    _forward_backward(on, torch.randn(2, 12, 16), torch.randn(2, 12, 16))
    assert calls == [torch.Size([2, 12, 16])], "the backward's recomputation fired the hook again"


@pytest.mark.gpu
def test_recomputed_cross_attention_on_cuda_keeps_its_attention_kernel_and_tracks_the_kept_path():
    from model.fusion import _ATTENTION_OPS

    on, off = _cross_attention_pair(d=32, heads=2, device="cuda")  # 16 channels a head: a fused kernel
    q, kv = torch.randn(2, 64, 32, device="cuda"), torch.randn(2, 64, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with _OpCounts() as ops:
            got = _forward_backward(on, q, kv)
        want = _forward_backward(off, q, kv)
    kernels = {op.overloadpacket.__name__ for op in _ATTENTION_OPS}
    assert sum(ops.counts[k] for k in kernels) == 1, ops.counts
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype=torch.bfloat16, msg=f"tensor {i}")


def test_cross_attention_with_a_cache_steps_as_the_causal_forward():
    """The cache's keys and values after a prefill of 4 let each later token's query read
    every earlier key: the forward's outputs, and one key and value a token."""
    from model.fusion import KVCache

    torch.manual_seed(3)
    attn = CausalCrossAttention(16, heads=4, out_std=0.1).eval()
    q, kv = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    cache = KVCache()
    with torch.no_grad():
        full, first = attn(q, kv), attn(q[:, :4], kv[:, :4])
        head = attn(q[:, :4], kv[:, :4], cache)
        tail = attn(q[:, 4:], kv[:, 4:], cache)  # a filled cache: token by token
    assert torch.equal(head, first)
    assert_close(tail, full[:, 4:], scale=0.1)
    assert cache.keys.shape == cache.values.shape == (2, 4, 9, 4)
