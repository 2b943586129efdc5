"""stability/config.py: every problem found once, in the dataclasses, naming the flag."""

from __future__ import annotations

import math
import typing
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.config import ModelConfig
from stability.config import ConfigError, ContinualConfig, GuardConfig, PlasticityConfig, TrainConfig

CONFIGS = (TrainConfig, GuardConfig, PlasticityConfig, ContinualConfig, ModelConfig)


def _fields_of(kind) -> list[tuple[type, str]]:
    out = []
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            if kind(tp):
                out.append((cls, f.name))
    return out


def _is_float(tp) -> bool:
    return tp is float or (float in typing.get_args(tp) and type(None) in typing.get_args(tp))


FLOAT_FIELDS = _fields_of(_is_float)
CHOICE_FIELDS = _fields_of(lambda tp: typing.get_origin(tp) is typing.Literal)


def test_the_float_and_choice_fields_are_found():
    names = {n for _, n in FLOAT_FIELDS}
    assert {"learning_rate", "weight_decay", "gradient_clip", "max_scale", "consolidation_strength",
            "spike_threshold", "surrogate_scale"} <= names
    assert {"spike_policy", "loss_spike_policy", "tokenizer", "integration_mode", "replay_strategy"} <= {
        n for _, n in CHOICE_FIELDS}


@given(field=st.sampled_from(FLOAT_FIELDS), value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_non_finite_float_flag_is_refused_naming_it(field, value):
    cls, name = field
    with pytest.raises(ValueError) as e:
        cls(**{name: value})
    assert f"--{name.replace('_', '-')} must be a finite number" in str(e.value)


@given(field=st.sampled_from(FLOAT_FIELDS), value=st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False))
def test_a_negative_float_flag_is_refused_naming_it(field, value):
    cls, name = field  # no float flag of lsnn has a meaningful negative value
    with pytest.raises(ValueError) as e:
        cls(**{name: value})
    assert f"--{name.replace('_', '-')}" in str(e.value)


@pytest.mark.parametrize("field", CHOICE_FIELDS, ids=lambda f: f"{f[0].__name__}.{f[1]}")
def test_an_unknown_choice_is_refused_in_the_dataclass_listing_the_valid_ones(field):
    cls, name = field
    hints = typing.get_type_hints(cls)
    with pytest.raises(ValueError) as e:
        cls(**{name: "sometimes"})
    message = str(e.value)
    assert f"--{name.replace('_', '-')} must be one of" in message
    assert all(str(choice) in message for choice in typing.get_args(hints[name]))


@pytest.mark.parametrize("kw,needle", [
    (dict(learning_rate=1e30), "--learning-rate must be in (0, 1]"),
    (dict(weight_decay=3.0), "--weight-decay must be in [0, 1]"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be a positive integer"),
])
def test_out_of_range_training_values_are_refused(kw, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert needle in str(e.value)


def test_every_problem_is_reported_at_once_and_nan_only_once():
    with pytest.raises(ConfigError) as e:
        GuardConfig(spike_policy="sometimes", spike_zscore=math.nan, loss_spike_policy="never")
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3, lines
    assert sum("--spike-zscore" in line for line in lines) == 1
