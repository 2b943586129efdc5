"""The ``lsnn train`` command as a user meets it."""

from __future__ import annotations

import shlex

import pytest
import torch

from stability.atomic import atomic_write
from stability.checkpoint import load_checkpoint, serialize
from stability.cli import PHASES, build_parser, resolve
from tests.integration.cli_helpers import FAST, TINY_MODEL, ctrl_c_after, records, run_cli

# The four commands of TRAINING_STABILITY_FIXES.md, verbatim after `python scripts/cli.py`.
WRITE_UP = {
    1: "train --task llm --epochs 1 --batch-size 4 --sequence-length 64 --num-layers 2 --liquid-units 64 "
       "--spiking-units 32 --hidden-dim 128 --gradient-clip 0.5",
    2: "train --task llm --epochs 2 --batch-size 4 --sequence-length 128 --num-layers 2 --liquid-units 128 "
       "--spiking-units 64 --hidden-dim 256 --gradient-clip 1.0 --mixed-precision",
    3: "train --task llm --epochs 2 --batch-size 4 --sequence-length 256 --num-layers 4 --liquid-units 128 "
       "--spiking-units 64 --continual-learning --num-tasks 2 --use-mamba --integration-mode bidirectional "
       "--use-stdp --use-meta-plasticity",
    4: "train --task llm --epochs 30 --continual-learning --num-tasks 5 --use-stdp --use-meta-plasticity "
       "--use-replay --use-mamba --integration-mode bidirectional --spike-to-mamba-method temporal "
       "--mamba-expand 2 --mamba-d-state 32 --mamba-d-conv 4 --use-adaptive-gating --num-gate-heads 8 "
       "--use-cross-attention --cross-attn-heads 16",
}


def test_help_documents_every_flag_of_the_write_up(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = {tok for cmd in WRITE_UP.values() for tok in cmd.split() if tok.startswith("--")}
    everyday = ["--seed", "--device", "--output-dir", "--max-steps", "--gradient-accumulation-steps",
                "--warmup-steps", "--weight-decay", "--log-every", "--resume", "--dataset", "--data",
                "--tokenizer", "--vocab-size", "--amp-dtype", "--learning-rate", "--phase", "--inject-fault"]
    for name in sorted(flags) + everyday:
        assert name in text, f"{name} missing from --help"


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_phase_preset_equals_the_write_up_command(phase):
    written = resolve(build_parser().parse_args(shlex.split(WRITE_UP[phase])))
    preset = resolve(build_parser().parse_args(["train", "--phase", str(phase)]))
    assert written == preset


def test_no_recompute_mlp_reaches_the_model_config():
    on = resolve(build_parser().parse_args(["train", "--phase", "3"]))
    off = resolve(build_parser().parse_args(["train", "--phase", "3", "--no-recompute-mlp"]))
    assert on.model.recompute_mlp is True and off.model.recompute_mlp is False


def test_no_recompute_cross_attention_reaches_the_model_config():
    on = resolve(build_parser().parse_args(["train", "--phase", "4"]))
    off = resolve(build_parser().parse_args(["train", "--phase", "4", "--no-recompute-cross-attention"]))
    assert on.model.recompute_cross_attention is True and off.model.recompute_cross_attention is False


def test_explicit_flags_override_the_preset():
    spec = resolve(build_parser().parse_args(["train", "--phase", "1", "--hidden-dim", "64", "--epochs", "3"]))
    assert spec.model.hidden_dim == 64 and spec.train.epochs == 3
    assert spec.model.num_layers == PHASES[1]["num_layers"]


@pytest.mark.parametrize("args,needle", [
    (["--use-replay"], "--use-replay replays earlier tasks; add --continual-learning"),
    (["--num-tasks", "3"], "--num-tasks only applies with --continual-learning"),
    (["--stdp-type", "bcm"], "--stdp-type only applies with --use-stdp"),
    (["--mamba-d-state", "32"], "--mamba-d-state only applies with --use-mamba"),
    (["--num-gate-heads", "8"], "--num-gate-heads only applies with --use-adaptive-gating"),
    (["--cross-attn-heads", "8", "--use-mamba"], "--cross-attn-heads only applies with --use-cross-attention"),
    (["--vocab-size", "1000"], "--vocab-size only applies with --tokenizer bpe"),
    (["--meta-lr", "0.1"], "--meta-lr only applies with --use-meta-plasticity"),
    (["--replay-strategy", "balanced", "--continual-learning"], "--replay-strategy only applies with --use-replay"),
    (["--ltc-ode-unfolds", "3"], "--ltc-ode-unfolds only applies with --liquid-backbone ltc"),
    (["--spike-temporal-tau", "2"], "--spike-temporal-tau only applies with --spike-to-mamba-method temporal"),
    (["--mlp-ratio", "0", "--no-recompute-mlp"], "--recompute-mlp only applies with --mlp-ratio > 0"),
    (["--use-stdp", "--stdp-target-rate", "2"], "--stdp-target-rate must be in (0, 1)"),
    (["--continual-learning", "--num-tasks", "1"], "--num-tasks must be at least 2"),
    (["--continual-learning", "--num-tasks", "999"], "--num-tasks"),
    (["--integration-mode", "parallel"], "--use-mamba"),
    (["--use-mamba", "--use-cross-attention", "--cross-attn-heads", "5"], "--cross-attn-heads 5"),
    (["--beta", "1.5"], "--beta must be in (0, 1)"),
    (["--gradient-clip", "-1"], "--gradient-clip must be >= 0"),
    (["--amp-dtype", "fp16"], "--amp-dtype fp16 has no effect without --mixed-precision"),
    (["--inject-fault", "loss:nan"], "--inject-fault"),
    (["--inject-fault", "grad[blocks.9]:nan@3"], "names no module"),
    (["--sequence-length", "50000000"], "--sequence-length 50000000"),
    (["--data", "/nonexistent/text"], "--data /nonexistent/text"),
    (["--device", "cuda"], "--device cuda: CUDA is not available") if not torch.cuda.is_available()
    else (["--device", "tpu"], "--device"),
])
def test_bad_input_exits_2_names_the_flag_and_writes_nothing(tmp_path, corpus, capsys, args, needle):
    out = tmp_path / "run"
    data = [] if "--data" in args else ["--data", str(corpus)]
    code = run_cli([*data, *FAST, *TINY_MODEL, "--output-dir", str(out), *args])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--integration-mode", "diagonal"])
    assert e.value.code == 2
    assert "--integration-mode" in capsys.readouterr().err


def test_empty_data_file_is_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli(["--data", str(empty), *FAST, "--output-dir", str(tmp_path / "run")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_run_writes_metrics_config_and_loadable_checkpoints(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out),
                    "--max-steps", "12", "--log-every", "4"]) == 0
    steps = records(out, "step")
    assert [r["step"] for r in steps] == [4, 8, 12]
    for key in ("step", "epoch", "loss", "grad_norm", "lr", "loss_scale", "tokens_per_s", "band", "skipped"):
        assert all(key in r for r in steps), key
    (epoch,) = records(out, "epoch")
    for key in ("train_loss", "val_loss", "val_ppl", "val_acc", "unigram_loss"):
        assert key in epoch
    assert (out / "config.json").exists()
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(out / "checkpoints" / name)
        assert state["trainer"]["step"] == 12
    printed = capsys.readouterr().out
    assert "step 4: loss=" in printed and "grad_norm=" in printed and "tok/s=" in printed


def test_each_epoch_summary_is_printed_exactly_once(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--epochs", "2",
                    "--sequence-length", "256", "--batch-size", "16", "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("epoch 1/2:") == 1 and printed.count("epoch 2/2:") == 1
    assert [r["epoch"] for r in records(out, "epoch")] == [1, 2]


def test_existing_run_is_not_overwritten_without_resume(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--max-steps", "2"]
    assert run_cli(args) == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    assert run_cli(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_a_format_it_does_not_know_naming_what_to_do(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    base = ["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--max-steps", "2"]
    assert run_cli(base) == 0
    last = out / "checkpoints" / "last.pt"
    atomic_write(last, serialize({**load_checkpoint(last), "format": 99}))
    capsys.readouterr()
    assert run_cli([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.pt is a checkpoint of format 99; this version of lsnn reads formats 1-2" in err
    assert "start over without --resume (with --overwrite)" in err


def test_resume_with_a_different_model_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    base = ["--data", str(corpus), *FAST, "--output-dir", str(out), "--max-steps", "2"]
    assert run_cli([*base, *TINY_MODEL]) == 0
    assert run_cli([*base, *TINY_MODEL, "--hidden-dim", "48", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--hidden-dim: checkpoint has 32, this command 48" in err


def test_interrupted_run_resumes_with_the_same_losses(tmp_path, corpus, monkeypatch, capsys):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "16", "--log-every", "2"]
    straight = tmp_path / "straight"
    assert run_cli([*common, "--output-dir", str(straight)]) == 0

    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        ctrl_c_after(m, 7)
        assert run_cli([*common, "--output-dir", str(broken)]) == 130
    assert "--resume" in capsys.readouterr().out
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["trainer"]["step"] == 7
    assert run_cli([*common, "--output-dir", str(broken), "--resume"]) == 0

    a, b = records(straight, "step"), records(broken, "step")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["trainer"]["model"]
    wb = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)["trainer"]["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_leaves_the_process_denormal_setting_as_it_found_it(tmp_path, corpus):
    assert torch.tensor([1e-39]).mul(1.0).item() != 0
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(tmp_path / "r"),
                    "--max-steps", "2"]) == 0
    assert torch.tensor([1e-39]).mul(1.0).item() != 0


def test_a_run_in_a_worker_thread_trains_without_installing_a_signal_handler(tmp_path, corpus):
    import threading

    codes = []
    worker = threading.Thread(target=lambda: codes.append(run_cli(
        ["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(tmp_path / "r"), "--max-steps", "2"])))
    worker.start()
    worker.join()
    assert codes == [0]


@pytest.mark.parametrize("every,expected", [("2", [2, 4, 5]), ("0", [5])])
def test_checkpoint_every_writes_intermediate_checkpoints(tmp_path, corpus, monkeypatch, every, expected):
    from stability.checkpoint import CheckpointDir

    saved = []
    original = CheckpointDir.save

    def spy(self, state, keep):
        saved.append(state["trainer"]["step"])
        return original(self, state, keep)

    monkeypatch.setattr(CheckpointDir, "save", spy)
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(tmp_path / "r"),
                    "--max-steps", "5", "--checkpoint-every", every]) == 0
    assert saved == expected  # then the end of the run (--max-steps ends the epoch)


def test_gradient_accumulation_reads_that_many_batches_per_step(tmp_path, corpus):
    out = tmp_path / "r"
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--max-steps", "3",
                    "--gradient-accumulation-steps", "2", "--log-every", "3"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["stream"]["position"]["index"] == 6
    (step,) = records(out, "step")
    assert step["step"] == 3


def test_seed_changes_the_run_and_the_same_seed_repeats_it(tmp_path, corpus):
    losses = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(out), "--max-steps", "2",
                        "--log-every", "2", "--seed", seed]) == 0
        losses.append(records(out, "step")[0]["loss"])
    assert losses[0] == losses[1] != losses[2]


def test_a_run_stopped_by_max_steps_resumes_with_more_steps(tmp_path, corpus):
    common = ["--data", str(corpus), *FAST, *TINY_MODEL, "--log-every", "2"]
    straight = tmp_path / "straight"
    assert run_cli([*common, "--output-dir", str(straight), "--max-steps", "8"]) == 0
    staged = tmp_path / "staged"
    assert run_cli([*common, "--output-dir", str(staged), "--max-steps", "4"]) == 0
    assert run_cli([*common, "--output-dir", str(staged), "--max-steps", "8", "--resume"]) == 0
    assert load_checkpoint(staged / "checkpoints" / "last.pt")["trainer"]["step"] == 8
    assert [r["step"] for r in records(staged, "step")] == [2, 4, 6, 8]
    assert [r["step"] for r in records(staged, "epoch")] == [4, 8], "each stop gets its own summary"
    # the same batches in the same order (the schedule's horizon is the first run's, so the
    # learning rates, and with them the losses, differ after step 4)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["stream"]["position"]
    assert load_checkpoint(staged / "checkpoints" / "last.pt")["stream"]["position"] == a


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_allocates(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", str(corpus), *FAST[2:], *TINY_MODEL, "--vocab-size", "1000000000",
                    "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vocabulary 1000000000" in err and "GB" in err and "lower --" in err
    assert not out.exists()


def test_a_run_draws_its_health_report_at_the_end_and_at_exit_3_unless_no_report(tmp_path, corpus, capsys):
    drawn = [a for a in FAST if a != "--no-report"]
    done, stopped, quiet = tmp_path / "done", tmp_path / "stopped", tmp_path / "quiet"
    assert run_cli(["--data", str(corpus), *drawn, *TINY_MODEL, "--output-dir", str(done), "--max-steps", "4",
                    "--log-every", "2"]) == 0
    assert (done / "report.png").stat().st_size > 10_000 and (done / "report.html").exists()
    assert "health report:" in capsys.readouterr().out
    assert run_cli(["--data", str(corpus), *drawn, *TINY_MODEL, "--output-dir", str(stopped), "--max-steps", "30",
                    "--log-every", "1", "--rollback-after", "2", "--max-rollbacks", "0",
                    "--inject-fault", "param:nan@3"]) == 3
    assert (stopped / "report.png").exists() and (stopped / "report.html").exists()
    assert run_cli(["--data", str(corpus), *FAST, *TINY_MODEL, "--output-dir", str(quiet), "--max-steps", "2"]) == 0
    assert not (quiet / "report.png").exists()


def test_main_frees_the_finished_run_before_it_returns(tmp_path, corpus):
    """The run's objects sit in reference cycles. Left to the interpreter's exit with the
    process group's users among them, a torchrun rank that trained to the end aborted
    (gloo, SIGABRT) in about one two-rank run in seven. ``main`` collects them before it
    returns; the cyclic collector is off here, so only that collection can free them."""
    import gc

    from model import HybridLM
    from stability.cli import main

    def models() -> int:
        # type(), not isinstance: isinstance reads each object's __class__, and that of
        # torch.distributed's deprecated reduce_op warns
        return sum(type(o) is HybridLM for o in gc.get_objects())

    gc.collect()
    before = models()
    gc.disable()
    try:
        code = main(["train", "--data", str(corpus), *FAST, *TINY_MODEL, "--max-steps", "2",
                     "--output-dir", str(tmp_path / "r")])
        after = models()
    finally:
        gc.enable()
    assert code == 0
    assert after == before, f"{after - before} models of the finished run still alive after main returned"
