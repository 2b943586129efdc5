"""The chunked LM loss (``model.loss.linear_cross_entropy``) against the plain head and
cross-entropy: values and gradients over chunkings, ignored targets, non-finite inputs,
bf16 autocast; that it never makes a (tokens x vocab) tensor; and the model's and the
trainer's use of it (``--chunked-loss``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from model.loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy, linear_cross_entropy_ref
from tests.helpers import assert_close


def inputs(n: int, d: int, v: int, ignored: float = 0.25, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    return h, w, y


def loss_and_grads(fn, h, w, y, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, y, **kw)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit upstream gradient
    return loss, gh, gw


@pytest.mark.parametrize("n,rows", [(37, 8), (37, 37), (37, 100), (64, 1), (5, 2)])
def test_matches_the_plain_loss_and_its_gradients(n, rows):
    h, w, y = inputs(n, 16, 50)
    expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=rows)
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert a.dtype == e.dtype, what
        assert_close(a, e, msg=what)


@given(n=st.integers(1, 40), d=st.integers(1, 12), v=st.integers(2, 60), rows=st.integers(1, 45),
       ignored=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16))
def test_any_chunking_matches_the_plain_loss(n, d, v, rows, ignored, seed):
    h, w, y = inputs(n, d, v, ignored, seed)
    y[0] = 1  # at least one target counts (all ignored: below)
    expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=rows)
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert_close(a, e, msg=what)


@pytest.mark.parametrize("scale", [30.0, 1e3, 1e5])
def test_logits_far_apart_give_the_plain_loss_where_the_targets_probability_underflows(scale):
    """The loss is max - log(max softmax) - the target's logit, never -log(its probability):
    at these scales the targets' probabilities are 0 in fp32 (the loss runs to thousands),
    and the log-sum-exp must still come out exact."""
    h, w, y = inputs(48, 8, 40, ignored=0.1, seed=3)
    h = h * scale
    expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=16)
    assert torch.isfinite(actual[0]) and expected[0] > 20
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert_close(a, e, msg=what)


def test_fp64_inputs_get_fp64_gradients_at_the_plain_paths_precision():
    h, w, y = inputs(30, 8, 40, dtype=torch.float64)
    expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=7)
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert a.dtype == e.dtype, what
        assert_close(a, e, dtype=torch.float32, msg=what)  # both take the softmax in fp32


def test_every_target_ignored_gives_nan_as_the_plain_mean_does():
    h, w, y = inputs(10, 4, 9, ignored=1.0)
    assert (y == IGNORE_INDEX).all()
    assert torch.isnan(linear_cross_entropy_ref(h, w, y))
    assert torch.isnan(linear_cross_entropy(h, w, y, rows=3))


@pytest.mark.parametrize("grad", [True, False])
def test_no_rows_give_nan_and_zero_gradients_as_the_plain_path(grad):
    """An empty batch is one empty chunk: the sums still start from it."""
    h, w = torch.randn(0, 4, requires_grad=grad), torch.randn(6, 4, requires_grad=grad)
    y = torch.zeros(0, dtype=torch.long)
    loss, hits = linear_cross_entropy(h, w, y, rows=2, return_hits=True)
    assert loss.isnan() and hits.item() == 0
    if grad:
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert gh.shape == (0, 4) and torch.equal(gw, torch.zeros(6, 4))


def test_a_non_finite_hidden_state_poisons_loss_and_gradients_as_in_the_plain_path():
    h, w, y = inputs(12, 6, 20, ignored=0.0)
    h[4, 2] = float("nan")
    expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=5)
    assert torch.isnan(actual[0])
    for a, e, what in zip(actual[1:], expected[1:], ("d h", "d w")):
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), what


def test_under_bf16_autocast_it_follows_the_plain_path_at_bf16_tolerance():
    h, w, y = inputs(48, 32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
        actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=16)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == h.dtype and actual[2].dtype == w.dtype
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert_close(a, e, dtype=torch.bfloat16, msg=what)
    # and it is bf16's answer, not fp32's: the products ran in bf16
    fp32 = loss_and_grads(linear_cross_entropy_ref, h, w, y)
    assert not torch.equal(actual[0], fp32[0])


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_on_cuda_it_follows_the_plain_path(amp):
    """The CUDA products (and, under autocast, their bf16/fp16 inputs), several chunks."""
    h, w, y = (t.cuda() for t in inputs(300, 64, 1000))
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        expected = loss_and_grads(linear_cross_entropy_ref, h, w, y)
        actual = loss_and_grads(linear_cross_entropy, h, w, y, rows=128)
    for a, e, what in zip(actual, expected, ("loss", "d h", "d w")):
        assert a.dtype == e.dtype, what
        assert_close(a, e, dtype=amp or torch.float32, scale=2.0, msg=what)


def test_without_autograd_it_returns_the_loss_and_keeps_nothing():
    h, w, y = inputs(20, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, y, rows=6)
    assert loss.grad_fn is None
    assert_close(loss, linear_cross_entropy_ref(h.detach(), w, y))


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_the_whole_logits_is_ever_made():
    n, d, v, rows = 96, 8, 500, 16
    h, w, y = inputs(n, d, v)
    for fn, kw, bound in ((linear_cross_entropy, {"rows": rows}, rows * v), (linear_cross_entropy_ref, {}, n * v)):
        with LargestTensor() as seen:
            loss_and_grads(fn, h, w, y, **kw)
        assert seen.largest == max(bound, v * d), fn.__name__


def test_chunks_hold_about_two_million_logits_and_at_least_128_rows():
    assert chunk_rows(8192) == 256
    assert chunk_rows(200_019) == 128
    assert chunk_rows(256) == 8192


def test_bad_shapes_and_rows_are_refused():
    h, w, y = inputs(6, 4, 9)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, w[:, :3], y)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="rows must be >= 1"):
        linear_cross_entropy(h, w, y, rows=0)


# --- the model and the trainer ---------------------------------------------------------


def test_the_model_computes_its_loss_without_logits_only_with_chunked_loss():
    from tests.tiny import batches, tiny_hybrid

    x, y = batches(1, vocab=64, b=3, l=10)[0]
    y = y.clone()
    y[0, :4] = IGNORE_INDEX
    results = {}
    for chunked in (True, False):
        model = tiny_hybrid(chunked_loss=chunked)
        out = model(x, targets=y)
        assert (out.logits is None) == chunked
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results[chunked] = (out.loss, grads)
    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert_close(results[False][0], expected)
    assert_close(results[True][0], results[False][0])
    for a, e in zip(results[True][1], results[False][1]):
        assert_close(a, e, scale=4.0)


def test_a_hook_on_the_head_sees_the_logits_even_with_chunked_loss():
    from tests.tiny import batches, tiny_hybrid

    model = tiny_hybrid()
    seen = []
    model.head.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    x, y = batches(1, vocab=64)[0]
    out = model(x, targets=y)
    assert seen == [(*x.shape, 64)] and out.logits is not None


def test_targets_of_another_shape_are_refused():
    from tests.tiny import batches, tiny_hybrid

    x, y = batches(1, vocab=64)[0]
    with pytest.raises(ValueError, match="targets must have the tokens' shape"):
        tiny_hybrid()(x, targets=y[:, :-1])


@pytest.mark.parametrize("chunked", [True, False])
def test_a_training_step_with_chunked_loss_never_makes_the_logits(monkeypatch, chunked):
    """The flag changes what a step allocates (chunks of 16 rows here, against 2 x 40 tokens
    of a 96-token vocabulary; the next largest tensor is the MLP's 2 x 40 x 64) and not what
    it learns: the two runs' losses and updated weights agree."""
    import model.loss
    from stability.config import GuardConfig, TrainConfig
    from stability.trainer import Trainer
    from tests.tiny import batches, tiny_hybrid

    monkeypatch.setitem(model.loss._CHUNK_LOGITS, "cpu", 16 * 96)
    monkeypatch.setattr(model.loss, "_MIN_ROWS", 1)
    data = batches(2, vocab=96, b=2, l=40)

    def run(chunked: bool):
        net = tiny_hybrid(chunked_loss=chunked, vocab_size=96)
        t = Trainer(net, TrainConfig(learning_rate=1e-2, warmup_steps=1), GuardConfig(), torch.device("cpu"),
                    total_steps=10)
        with LargestTensor() as seen:
            losses = [float(t.train_step([b]).loss) for b in data]
        return seen.largest, losses, [p.detach().clone() for p in net.parameters()]

    largest, losses, params = run(chunked)
    assert (largest < 2 * 40 * 96) == chunked, f"largest tensor {largest} elements"
    _, plain_losses, plain_params = run(not chunked)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for a, e in zip(params, plain_params):
        assert_close(a, e, scale=10.0)



def test_hits_count_the_targets_that_are_their_rows_argmax():
    h, w, y = inputs(90, 8, 12, ignored=0.3)  # a small vocabulary: many hits
    expected = ((F.linear(h, w).argmax(1) == y) & (y != IGNORE_INDEX)).sum()
    loss, hits = linear_cross_entropy(h, w, y, rows=16, return_hits=True)
    assert hits.dtype == torch.int64 and int(hits) == int(expected) > 0
    assert_close(loss, linear_cross_entropy_ref(h, w, y))


def test_evaluation_never_makes_the_logits_and_agrees_with_the_plain_path(monkeypatch):
    """Validation with --chunked-loss: the same loss and accuracy as from the whole logits,
    a batch of padding only adding nothing, and no (b l v) tensor (else validation, not
    training, would set a large vocabulary's peak)."""
    import model.loss
    from stability.config import GuardConfig, TrainConfig
    from stability.evaluation import evaluate
    from stability.trainer import Trainer
    from tests.tiny import batches, tiny_hybrid

    monkeypatch.setitem(model.loss._CHUNK_LOGITS, "cpu", 16 * 96)
    monkeypatch.setattr(model.loss, "_MIN_ROWS", 1)
    data = batches(3, vocab=96, b=2, l=40)
    data.append((data[0][0], torch.full_like(data[0][1], IGNORE_INDEX)))  # padding only
    results = {}
    for chunked in (True, False):
        net = tiny_hybrid(chunked_loss=chunked, vocab_size=96)
        t = Trainer(net, TrainConfig(), GuardConfig(), torch.device("cpu"), total_steps=10)
        with LargestTensor() as seen:
            results[chunked] = (t.evaluate(data), evaluate(net, data))
        assert (seen.largest < 2 * 40 * 96) == chunked, f"largest tensor {seen.largest} elements"
    (trainer_c, lsnn_eval_c), (trainer_p, lsnn_eval_p) = results[True], results[False]
    assert trainer_c["val_acc"] == trainer_p["val_acc"] and lsnn_eval_c["accuracy"] == lsnn_eval_p["accuracy"]
    assert trainer_c["val_loss"] == pytest.approx(trainer_p["val_loss"], rel=1e-6)
    assert lsnn_eval_c["loss"] == pytest.approx(trainer_c["val_loss"], rel=1e-6)
    assert lsnn_eval_c["tokens"] == 3 * 2 * 40


def test_a_cuda_chunk_holds_eight_times_the_logits_of_a_cpu_chunk():
    """On CUDA each op of a chunk is a launch: phase 4's 16.7M logits are two chunks there."""
    assert chunk_rows(8192, "cuda") == 8 * chunk_rows(8192, "cpu") == 2048
    assert chunk_rows(200_019, "cuda") == 128  # the least: 2^24 logits are 83 rows of 200k
    assert chunk_rows(8192, "mps") == chunk_rows(8192)  # any other device: the CPU's size
