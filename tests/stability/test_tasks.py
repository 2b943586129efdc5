"""The tasks part: each task's schedule, the --max-steps budget, and its own state."""

from __future__ import annotations

import math

import pytest

from stability.config import ContinualConfig, RunSpec, TrainConfig
from stability.tasks import Tasks, horizon
from tests.tiny_data import tiny_task
from tests.tiny import tiny_hybrid_config

DATA = [tiny_task("a", 10, 0), tiny_task("b", 4, 1)]


def _spec(continual: bool, **train) -> RunSpec:
    return RunSpec(tiny_hybrid_config(), TrainConfig(**{"epochs": 2, "gradient_accumulation_steps": 2, **train}),
                   continual=ContinualConfig(continual_learning=continual, num_tasks=2))


@pytest.mark.parametrize("continual,max_steps,expected", [
    (False, None, [14, 14]),  # every task's batches, 28 of them, over 2 micro-batches a step
    (True, None, [10, 4]),  # each task its own
    (True, 6, [6, 4]),  # --max-steps caps each task's schedule
])
def test_each_task_is_scheduled_over_its_own_epochs_capped_by_max_steps(continual, max_steps, expected):
    spec = _spec(continual, max_steps=max_steps)
    assert [horizon(spec, DATA, t) for t in (0, 1)] == expected


def _tasks(continual: bool = True, **train) -> Tasks:
    # the parts a boundary drives are not needed to keep state or to count a budget
    return Tasks(_spec(continual, **train), trainer=None, stream=None, monitor=None, report=None, ewc=None)


def test_with_continual_learning_the_budget_counts_from_the_tasks_start():
    tasks = _tasks(max_steps=5)
    tasks.start_step = 7
    assert not tasks.budget_spent(11) and tasks.budget_spent(12)
    assert _tasks(continual=False, max_steps=5).budget_spent(5), "without, from the run's start"
    assert not _tasks(max_steps=None).budget_spent(10**6)


def test_the_tasks_state_round_trips_and_a_rollback_keeps_the_best_validation_loss():
    tasks = _tasks()
    tasks.matrix, tasks.start_step = [[2.0, 3.0]], 8
    assert tasks.improved(2.5) and not tasks.improved(2.6)
    good = tasks.state_dict()
    tasks.matrix, tasks.start_step = [[2.0, 3.0], [2.2, 1.9]], 16
    assert tasks.improved(2.1)
    tasks.rewind(good)
    assert tasks.matrix == [[2.0, 3.0]] and tasks.start_step == 8 and tasks.best_val == 2.1
    fresh = _tasks()
    assert math.isinf(fresh.best_val)
    fresh.load_state_dict(good)
    assert fresh.matrix == [[2.0, 3.0]] and fresh.start_step == 8 and fresh.best_val == 2.5
