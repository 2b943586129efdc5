import collections
import contextlib

import pytest
import torch

from stability.continual import EWC, ReplayBuffer, format_matrix, per_sequence_loss, transfer, windows_per_pass
from stability.trainer import lm_loss, model_loss
from tests.tiny import TinyLM, batches


def _fisher(model, data):
    """The diagonal Fisher as EWC defines it, computed the plain way."""
    squares = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in data:
        model.zero_grad()
        lm_loss(model(x), y).backward()
        for s, p in zip(squares, model.parameters()):
            s += p.grad.square()
    return [s / len(data) for s in squares]


def test_ewc_penalty_is_the_sum_of_each_tasks_quadratic():
    torch.manual_seed(0)
    model = TinyLM()
    ewc = EWC(model, strength=50.0)
    assert not ewc.active and ewc.penalty(model) is None, "nothing to add before the first task ends"
    per_task = []
    for seed in (1, 2):
        data = batches(3, seed=seed)
        per_task.append((_fisher(model, data), [p.detach().clone() for p in model.parameters()]))
        assert ewc.consolidate(model, data, model_loss, contextlib.nullcontext) == 3
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # "train" on the next task
    expected = sum(0.5 * 50.0 * (f * (p - a).square()).sum()
                   for fisher, anchor in per_task for f, a, p in zip(fisher, anchor, model.parameters()))
    assert ewc.active and ewc.tasks == 2
    assert ewc.penalty(model).item() == pytest.approx(expected.item(), rel=1e-4)


def test_ewc_penalty_is_zero_at_the_anchor_and_pulls_back_toward_it():
    model = TinyLM()
    ewc = EWC(model, strength=10.0)
    ewc.consolidate(model, batches(2), model_loss, contextlib.nullcontext)
    assert abs(ewc.penalty(model).item()) < 1e-6
    with torch.no_grad():
        model.head.bias.add_(1.0)
    model.zero_grad()
    ewc.penalty(model).backward()
    assert (model.head.bias.grad >= 0).all() and model.head.bias.grad.sum() > 0


def test_consolidation_leaves_out_nonfinite_batches():
    model = TinyLM()
    ewc = EWC(model, strength=1.0)
    x, y = batches(1)[0]
    with torch.no_grad():
        model.embedding.weight[x[0, 0]] = float("nan")
    used = ewc.consolidate(model, [(x, y)] + batches(2, seed=3), model_loss, contextlib.nullcontext)
    assert used == 2
    assert all(torch.isfinite(a).all() for a in ewc.A)


@pytest.mark.parametrize("chunked", [True, False])
def test_the_hybrids_fisher_is_the_plain_one_with_or_without_the_chunked_loss(chunked):
    """EWC's Fisher pass takes the model's own loss (``model_loss``): with --chunked-loss no
    (b l v) logits at a task boundary, and the same Fisher as from the logits."""
    from tests.tiny import tiny_hybrid

    model = tiny_hybrid(chunked_loss=chunked, vocab_size=32)
    data = batches(2)
    expected = _fisher(model, data)
    ewc = EWC(model, strength=1.0)
    assert ewc.consolidate(model, data, model_loss, contextlib.nullcontext) == 2
    for a, e in zip(ewc.A, expected):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-10)


def test_replay_scoring_in_small_passes_gives_the_same_importances():
    torch.manual_seed(0)
    model = TinyLM()
    scored = []
    sizes = []
    model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    for per_pass in (64, 3, 1):
        sizes.clear()
        buf = ReplayBuffer(capacity=20, strategy="importance", seed=0)
        buf.offer(torch.randint(0, 32, (10, 9), generator=torch.Generator().manual_seed(0)), task=0)
        buf.score(model, 0, per_sequence_loss, torch.device("cpu"), per_pass=per_pass)
        assert sizes == [min(per_pass, 10 - i) for i in range(0, 10, per_pass)]
        scored.append(buf.importance)
    assert scored[1] == pytest.approx(scored[0], rel=1e-6)
    assert scored[2] == pytest.approx(scored[0], rel=1e-6)
    assert len(set(scored[0])) > 1


def test_replay_passes_keep_their_logits_within_the_budget():
    assert windows_per_pass(256, 8192) == 8  # 8 x 256 x 8192 = 2^24 logits
    assert windows_per_pass(64, 256) == 64  # capped
    assert windows_per_pass(4096, 200_019) == 1  # never none


def _windows(n, task, length=5):
    return torch.full((n, length), task) + torch.arange(n)[:, None] * 10


def test_reservoir_keeps_capacity_and_samples_only_earlier_tasks():
    buf = ReplayBuffer(capacity=50, strategy="uniform", seed=0)
    buf.offer(_windows(200, task=0), task=0)
    assert len(buf.windows) == 50
    assert buf.sample(4, task=0) is None, "task 0 has nothing earlier to replay"
    buf.offer(_windows(200, task=1), task=1)
    assert len(buf.windows) == 50
    sample = buf.sample(100, task=1)
    assert sample.shape == (100, 5) and (sample % 10 == 0).all(), "only task-0 sequences"


def test_reservoir_sampling_is_uniform_over_the_stream():
    counts = collections.Counter()
    for seed in range(200):
        buf = ReplayBuffer(capacity=10, strategy="uniform", seed=seed)
        buf.offer(torch.arange(100)[:, None].repeat(1, 3), task=0)
        counts.update(int(w[0]) // 10 for w in buf.windows)
    # each decile of the stream should hold ~10% of the kept items (2000 in all)
    assert all(150 < counts[d] < 250 for d in range(10)), counts


def test_balanced_keeps_tasks_equal():
    buf = ReplayBuffer(capacity=30, strategy="balanced", seed=0)
    for task in range(3):
        buf.offer(_windows(100, task), task=task)
    per_task = collections.Counter(buf.tasks)
    assert sorted(per_task.values()) == [10, 10, 10]
    drawn = collections.Counter(int(w[0]) % 10 for w in buf.sample(3000, task=3))
    assert all(900 < drawn[t] < 1100 for t in range(3)), drawn


def test_importance_favours_high_loss_sequences():
    buf = ReplayBuffer(capacity=10, strategy="importance", seed=0)
    buf.offer(_windows(10, task=0), task=0)
    buf.importance = [9.0] + [1.0] * 9
    drawn = collections.Counter(int(w[0]) for w in buf.sample(1800, task=1))
    assert drawn[0] > 3 * drawn[10]


def test_state_dict_round_trip_reproduces_samples():
    a = ReplayBuffer(capacity=8, strategy="uniform", seed=3)
    a.offer(_windows(30, 0), 0)
    b = ReplayBuffer(capacity=8, strategy="uniform", seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(5, task=1), b.sample(5, task=1))


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="uniform, importance, balanced"):
        ReplayBuffer(4, "newest", 0)


def test_per_sequence_loss_ignores_padding():
    logits = torch.zeros(2, 3, 4)
    targets = torch.tensor([[1, 2, -100], [0, -100, -100]])
    assert torch.allclose(per_sequence_loss(logits, targets), torch.full((2,), torch.log(torch.tensor(4.0))))


def test_transfer_by_hand():
    matrix = [[2.0, 5.0, 6.0], [2.5, 3.0, 5.5], [3.0, 3.2, 2.8]]
    stats = transfer(matrix)
    assert stats["average_loss"] == pytest.approx((3.0 + 3.2 + 2.8) / 3)
    assert stats["forgetting"] == pytest.approx(((3.0 - 2.0) + (3.2 - 3.0)) / 2)
    assert stats["backward_transfer"] == pytest.approx(-stats["forgetting"])
    assert transfer([[4.0, 5.0]]) == {"average_loss": 4.0, "forgetting": 0.0, "backward_transfer": 0.0}


def test_matrix_lines():
    lines = format_matrix([[1.0, 2.0], [1.5, 0.5]], ["a", "b"])
    assert lines[0].split() == ["after", "task", "task", "1", "task", "2"]
    assert lines[2].split() == ["2", "1.5000", "0.5000"]
