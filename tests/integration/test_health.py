"""Healthy gradient norms on tiny versions of the four phase configurations."""

import statistics

import pytest

from stability.cli import PHASES, applicable
from stability.drill import TINY, TINY_TRAIN
from tests.integration.cli_helpers import records, run_cli


def tiny_phase_args(phase: int) -> list[str]:
    """The phase's preset, flag for flag, at tiny sizes."""
    values = applicable({**PHASES[phase], **TINY, **TINY_TRAIN})
    args = []
    for k, v in values.items():
        name = "--" + k.replace("_", "-")
        if v is True:
            args.append(name)
        elif v is not False:
            args += [name, str(v)]
    return args


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_tiny_phase_gradient_norms_stay_healthy(tmp_path, corpus, phase):
    out = tmp_path / "run"
    data = ["--data", str(corpus)] if phase < 3 else []  # tasks need the embedded corpus' domains
    assert run_cli([*tiny_phase_args(phase), *data, "--max-steps", "60", "--log-every", "1",
                    "--output-dir", str(out)]) == 0
    steps = records(out, "step")
    tasks = {s["task"] for s in steps}
    assert len(steps) == 60 * len(tasks)
    for epoch in records(out, "epoch"):
        assert epoch["bands"]["exploded"] == 0 and epoch["skipped"] == 0
    for task in tasks:  # each task restarts its warm-up
        norms = [s["grad_norm"] for s in steps if s["task"] == task]
        assert 0.5 <= statistics.median(norms) <= 5.0
        assert max(norms[20:]) <= 10.0, "no critical gradient norm after warm-up"
