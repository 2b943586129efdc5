"""``--config FILE``: flag values from JSON, YAML or TOML, the run's own config.json included."""

from __future__ import annotations

import json
import sys

import pytest

from stability.cli import build_parser, main, resolve
from tests.integration.cli_helpers import FAST, TINY_MODEL, run_cli, small_corpus


def spec_of(*argv: str):
    return resolve(build_parser().parse_args(["train", *argv]))


def config_json(spec) -> dict:
    """What Run._write_config writes for ``spec``: the flag sections and the run's facts."""
    return {"model": spec.model.to_dict(), "train": spec.train.to_dict(), "guard": spec.guard.to_dict(),
            "plasticity": spec.plasticity.to_dict(), "continual": spec.continual.to_dict(),
            "tokenizer": {"name": "bpe", "vocab_size": 8192}, "tasks": ["stdlib"], "corpus": "1234abcd",
            "device": "cpu", "precision": "fp32", "distributed": {"mode": "none", "world": 1},
            "torch": "2.13.0"}


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


RUNS = {
    "phase-1": ["--phase", "1"],
    "phase-2": ["--phase", "2"],
    "phase-3": ["--phase", "3"],
    "phase-4": ["--phase", "4", "--seed", "7"],
    "ltc-byte": ["--liquid-backbone", "ltc", "--tokenizer", "byte", "--hidden-dim", "96", "--ltc-ode-unfolds", "3"],
    "stdp-off-replay": ["--continual-learning", "--use-replay", "--replay-strategy", "balanced", "--num-tasks", "3"],
}


@pytest.mark.parametrize("argv", RUNS.values(), ids=RUNS.keys())
def test_a_runs_config_json_gives_back_the_run_it_describes(tmp_path, argv):
    spec = spec_of(*argv)
    path = write(tmp_path, "config.json", json.dumps(config_json(spec), indent=2, default=str))
    assert spec_of("--config", path) == spec


def test_a_file_never_resumes_or_overwrites_the_run_it_came_from(tmp_path):
    written = config_json(spec_of("--phase", "1", "--output-dir", str(tmp_path / "x"), "--resume"))
    path = write(tmp_path, "config.json", json.dumps({**written, "train": {**written["train"], "overwrite": True}}))
    repeated = spec_of("--config", path)
    assert (repeated.train.resume, repeated.train.overwrite) == (False, False)
    assert repeated.train.output_dir == str(tmp_path / "x"), "so the run refuses to start there: X holds a run"
    assert spec_of("--config", path, "--resume").train.resume, "the command line still says it"


def test_the_config_json_of_a_real_run_repeats_it(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", files=8)
    args = ["--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "2", "--log-every", "1",
            "--spike-to-mamba-method", "temporal", "--output-dir", str(tmp_path / "run")]
    assert run_cli(args) == 0
    assert spec_of("--config", str(tmp_path / "run" / "config.json")) == spec_of(*args)


def test_values_config_json_derived_are_derived_anew_from_changed_flags(tmp_path):
    spec = spec_of("--phase", "4", "--liquid-backbone-units", "32")
    path = write(tmp_path, "config.json", json.dumps(config_json(spec), default=str))
    wider = spec_of("--config", path, "--hidden-dim", "512", "--liquid-units", "64", "--surrogate", "fast_sigmoid")
    assert wider.model.mamba_dt_rank == 32, "ceil(512 / 16), not the file's 16"
    assert wider.model.surrogate_scale == 25.0, "fast_sigmoid's default slope, not atan's 2 from the file"
    assert wider.model.liquid_backbone_units == 32, "set by the run itself, so kept"
    tiny = resolve(build_parser().parse_args(["drill", "--config", path, "--tiny"]))
    assert (tiny.model.hidden_dim, tiny.model.mamba_dt_rank, tiny.train.tokenizer) == (32, 2, "byte")
    assert tiny.model.use_cross_attention and tiny.continual.num_tasks == 5, "the file's layout at tiny sizes"


FLAT_YAML = """\
phase: 1
learning-rate: 0.001
hidden_dim: 64
use-mamba: true
integration_mode: parallel
inject_fault: null
"""
FLAT_TOML = """\
phase = 1
learning-rate = 0.001
hidden_dim = 64
use-mamba = true
integration_mode = "parallel"
"""
NESTED_JSON = json.dumps({"phase": 1, "train": {"learning_rate": 0.001},
                          "model": {"hidden-dim": 64, "use_mamba": True, "integration_mode": "parallel"}})


@pytest.mark.parametrize("name,text", [("c.yaml", FLAT_YAML), ("c.yml", FLAT_YAML), ("c.toml", FLAT_TOML),
                                       ("c.json", NESTED_JSON)])
def test_yaml_toml_and_json_flat_or_in_sections_give_the_same_flags(tmp_path, name, text):
    expected = spec_of("--phase", "1", "--learning-rate", "0.001", "--hidden-dim", "64", "--use-mamba",
                       "--integration-mode", "parallel")
    assert spec_of("--config", write(tmp_path, name, text)) == expected


def test_the_file_overrides_the_preset_and_explicit_flags_override_the_file(tmp_path):
    path = write(tmp_path, "c.yaml", "phase: 3\nepochs: 5\nhidden_dim: 64\nuse_stdp: true\n")
    spec = spec_of("--config", path, "--hidden-dim", "96", "--no-use-stdp")
    assert (spec.train.epochs, spec.model.hidden_dim, spec.plasticity.use_stdp) == (5, 96, False)
    assert spec.model.num_layers == 4 and spec.model.use_mamba, "the rest of phase 3 stays"
    assert spec_of("--config", path, "--phase", "1").model.num_layers == 2, "--phase on the command line wins"
    assert spec_of("--config", write(tmp_path, "d.toml", "learning_rate = 1")).train.learning_rate == 1.0


def test_a_file_value_for_a_feature_that_is_off_is_refused_unless_it_changes_nothing(tmp_path):
    same = write(tmp_path, "same.yaml", "num_tasks: 2\nmamba_d_state: 16\nmamba_dt_rank: 16\nhidden_dim: 256\n")
    assert spec_of("--config", same) == spec_of()  # defaults, and mamba_dt_rank derived from hidden_dim
    assert spec_of("--config", same, "--use-mamba", "--mamba-d-state", "8").model.mamba_d_state == 8


@pytest.mark.parametrize("name,text,needles", [
    ("c.yaml", "hidden_dimm: 64\n", ["unknown key 'hidden_dimm'", "did you mean 'hidden_dim' (--hidden-dim)"]),
    ("c.json", '{"train": {"hidden_dim": 64}}', ["unknown key 'train.hidden_dim'"]),
    ("c.json", '{"model": {"hidden_dim": 64}, "tokenizerr": "byte"}', ["unknown key 'tokenizerr'"]),
    ("c.json", '{"corpus": "abc"}', ["unknown key 'corpus'"]),
    ("c.yaml", "learning_rate: fast\n", ["learning_rate (--learning-rate) must be a number, got 'fast'"]),
    ("c.yaml", "epochs: 1.5\n", ["epochs (--epochs) must be an integer, got 1.5"]),
    ("c.yaml", "epochs: true\n", ["epochs (--epochs) must be an integer"]),
    ("c.yaml", "use_mamba: 1\n", ["use_mamba (--use-mamba) must be true or false, got 1"]),
    ("c.toml", 'integration_mode = "diagonal"\n', ["integration_mode (--integration-mode) must be one of "
                                                   "sequential, parallel, bidirectional"]),
    ("c.yaml", "epochs: null\n", ["epochs (--epochs) must be an integer, got None"]),
    ("c.json", '{"seed": 1, "train": {"seed": 2}}', ["train.seed and seed both set --seed"]),
    ("c.json", '{"model": [1, 2]}', ["section 'model' must be a mapping"]),
    ("c.yaml", "- 1\n- 2\n", ["expected a mapping of flag names to values, got list"]),
    ("c.yaml", "", ["expected a mapping of flag names to values, got NoneType"]),
    ("c.json", '{"phase": 9}', ["phase must be one of 1, 2, 3, 4, got 9"]),
    ("c.json", '{"hidden_dim": 64,}', ["not valid JSON"]),
    ("c.toml", "hidden_dim = \n", ["not valid TOML"]),
    ("c.yaml", "a: [\n", ["not valid YAML"]),
    ("c.ini", "hidden_dim=64\n", ["unknown kind of file '.ini'", "name it .json, .yaml, .yml or .toml"]),
    ("c.yaml", "num_tasks: 3\n", ["keys that would have no effect", "num_tasks (--num-tasks) only applies with "
                                  "--continual-learning; add it or drop the key"]),
    ("c.json", '{"model": {"mamba_d_state": 32}}', ["model.mamba_d_state (--mamba-d-state) only applies with "
                                                     "--use-mamba"]),
])
def test_a_bad_config_file_exits_2_naming_it_and_the_key_and_writes_nothing(tmp_path, capsys, name, text, needles):
    path = write(tmp_path, name, text)
    out = tmp_path / "run"
    assert main(["train", "--config", path, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}: " in err
    for needle in needles:
        assert needle in err
    assert not out.exists()


def test_an_unreadable_config_file_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert f"--config {missing}: cannot read the file" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 2, "a directory"


def test_yaml_without_pyyaml_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    path = write(tmp_path, "c.yaml", "hidden_dim: 64\n")
    assert main(["train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}: reading YAML needs PyYAML" in err and "pip install 'lsnn[yaml]'" in err


def test_a_value_out_of_range_gets_the_configs_own_message(tmp_path, capsys):
    assert main(["train", "--config", write(tmp_path, "c.yaml", "beta: 1.5\n")]) == 2
    assert "--beta must be in (0, 1)" in capsys.readouterr().err


def test_tensorboard_without_the_package_is_bad_input_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    path = write(tmp_path, "c.yaml", "tensorboard: true\n")
    out = tmp_path / "run"
    for argv in (["--tensorboard"], ["--config", path]):
        assert main(["train", *argv, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--tensorboard needs the tensorboard package" in err and "pip install 'lsnn[tensorboard]'" in err
    assert not out.exists()
