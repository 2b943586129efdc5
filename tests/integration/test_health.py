"""Healthy gradient norms on tiny versions of the four phase configurations."""

import statistics

import pytest

from stability.cli import PHASES
from stability.drill import TINY, TINY_TRAIN
from tests.integration.cli_helpers import records, run_cli

_LATER = {"continual_learning", "num_tasks", "use_stdp", "use_meta_plasticity", "use_replay"}


def tiny_phase_args(phase: int) -> list[str]:
    values = {**{k: v for k, v in PHASES[phase].items() if k not in _LATER}, **TINY, **TINY_TRAIN}
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
    assert run_cli([*tiny_phase_args(phase), "--data", str(corpus), "--max-steps", "80", "--log-every", "1",
                    "--output-dir", str(out)]) == 0
    norms = [r["grad_norm"] for r in records(out, "step")]
    assert len(norms) == 80
    (epoch,) = [r for r in records(out, "epoch")]
    assert epoch["bands"]["exploded"] == 0 and epoch["skipped"] == 0
    assert 0.5 <= statistics.median(norms) <= 5.0
    assert max(norms[20:]) <= 10.0, "no critical gradient norm after warm-up"
