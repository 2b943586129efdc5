"""The ``lsnn`` command line (also ``python -m stability``).

Flags are generated from the config dataclasses, so a flag and its field share one name
and one docstring. ``--phase N`` presets equal the four commands of the users' write-up;
any flag given explicitly overrides its preset.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal

from model.config import ModelConfig, flag
from stability.config import (
    ConfigError,
    ContinualConfig,
    GuardConfig,
    PlasticityConfig,
    RunSpec,
    TrainConfig,
    field_docs,
)

# The four phases of TRAINING_STABILITY_FIXES.md, flag for flag.
PHASES: dict[int, dict[str, Any]] = {
    1: dict(task="llm", epochs=1, batch_size=4, sequence_length=64, num_layers=2, liquid_units=64,
            spiking_units=32, hidden_dim=128, gradient_clip=0.5),
    2: dict(task="llm", epochs=2, batch_size=4, sequence_length=128, num_layers=2, liquid_units=128,
            spiking_units=64, hidden_dim=256, gradient_clip=1.0, mixed_precision=True),
    3: dict(task="llm", epochs=2, batch_size=4, sequence_length=256, num_layers=4, liquid_units=128,
            spiking_units=64, continual_learning=True, num_tasks=2, use_mamba=True,
            integration_mode="bidirectional", use_stdp=True, use_meta_plasticity=True),
    4: dict(task="llm", epochs=30, continual_learning=True, num_tasks=5, use_stdp=True,
            use_meta_plasticity=True, use_replay=True, use_mamba=True, integration_mode="bidirectional",
            spike_to_mamba_method="temporal", mamba_expand=2, mamba_d_state=32, mamba_d_conv=4,
            use_adaptive_gating=True, num_gate_heads=8, use_cross_attention=True, cross_attn_heads=16),
}

_SKIP_MODEL_FIELDS = {"vocab_size", "extra"}  # vocab comes from the tokenizer (--vocab-size)


class CliError(ValueError):
    pass


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp, _optional = _unwrap(hints[f.name])
        default = f.default if f.default is not MISSING else None
        help_text = docs.get(f.name, "")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            if default:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
            group.add_argument(flag(f.name), help=help_text, **kw)
            continue
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        else:
            kw["type"] = tp
            kw["metavar"] = tp.__name__.upper()
        group.add_argument(flag(f.name), help=f"{help_text} (default: {default})", **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsnn", description="Train hybrid liquid-spiking-Mamba language models that do not explode.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model", description="Train a model on the embedded corpus "
                           "(the Python standard library's sources) or on --data.")
    _add_run_flags(train)
    drill = sub.add_parser("drill", help="rehearse failures: train under a battery of injected faults",
                           description="Train the configuration a few dozen steps clean and once per fault of a "
                           "standard battery (NaN/inf/-inf/spikes in losses, gradients, activations, weights, "
                           "plasticity, an fp16 overflow storm); print a table; exit 1 if any fault was not "
                           "survived. Takes every flag of `train`.")
    _add_run_flags(drill)
    drill.add_argument("--tiny", action="store_true",
                       help="shrink the model and batches to tiny sizes, keeping the layout and features")
    drill.add_argument("--tolerance", type=float, default=0.25,
                       help="a fault is survived if the final validation loss is within this fraction "
                            "(of max(1, control loss)) above the clean control's (default: 0.25)")
    _add_use_commands(sub)
    return parser


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase", type=int, choices=sorted(PHASES), default=argparse.SUPPRESS,
                   help="preset equal to phase N of the users' plan (1: minimal, 2: mixed precision, "
                        "3: Mamba + plasticity + continual, 4: everything); explicit flags override it")
    add_config_flags(p, TrainConfig)
    add_config_flags(p, ModelConfig, skip=_SKIP_MODEL_FIELDS)
    add_config_flags(p, GuardConfig)
    add_config_flags(p, PlasticityConfig)
    add_config_flags(p, ContinualConfig)


def _split(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


# Flags that only mean something with another one: (flags, what they need, whether it is on).
_DEPENDS: tuple[tuple[tuple[str, ...], str, Any], ...] = (
    (("num_tasks", "consolidation_strength", "fisher_batches"), "--continual-learning",
     lambda v: v.get("continual_learning")),
    (("stdp_type", "stdp_learning_rate", "stdp_tau_plus", "stdp_tau_minus"), "--use-stdp",
     lambda v: v.get("use_stdp")),
    (("meta_lr", "meta_min", "meta_max", "meta_rate_tolerance", "meta_plateau"), "--use-meta-plasticity",
     lambda v: v.get("use_meta_plasticity")),
    (("replay_buffer_size", "replay_strategy", "replay_fraction"), "--use-replay", lambda v: v.get("use_replay")),
    (("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "scan_impl"), "--use-mamba",
     lambda v: v.get("use_mamba")),
    (("num_gate_heads",), "--use-adaptive-gating", lambda v: v.get("use_adaptive_gating")),
    (("cross_attn_heads",), "--use-cross-attention", lambda v: v.get("use_cross_attention")),
    (("ltc_ode_unfolds",), "--liquid-backbone ltc", lambda v: v.get("liquid_backbone") == "ltc"),
    (("liquid_backbone_units",), "--liquid-backbone cfc (the default)", lambda v: v.get("liquid_backbone", "cfc") == "cfc"),
    (("spike_rate_window",), "--spike-to-mamba-method rate (the default)",
     lambda v: v.get("spike_to_mamba_method", "rate") == "rate"),
    (("spike_temporal_tau",), "--spike-to-mamba-method temporal", lambda v: v.get("spike_to_mamba_method") == "temporal"),
    (("vocab_size",), "--tokenizer bpe (byte, gpt2 and o200k have fixed vocabularies)",
     lambda v: v.get("tokenizer", "bpe") == "bpe"),
)


def check_dependencies(explicit: dict[str, Any], values: dict[str, Any]) -> None:
    """A flag given for a feature that is off would be silently ignored: refuse it."""
    problems = [f"{flag(name)} only applies with {needs}; add it or drop the flag"
                for names, needs, on in _DEPENDS for name in names if name in explicit and not on(values)]
    if problems:
        raise CliError("\n  - ".join(["flags that would have no effect:", *problems]))


def resolve(args: argparse.Namespace):
    """Configs from dataclass defaults <- the --phase preset <- (--tiny sizes) <- explicit flags."""
    explicit = vars(args).copy()
    explicit.pop("command", None)
    phase = explicit.pop("phase", None)
    tiny = explicit.pop("tiny", False)
    explicit.pop("tolerance", None)
    values = dict(PHASES[phase]) if phase else {}
    if tiny:
        from stability.drill import TINY, TINY_TRAIN

        values.update({**TINY, **TINY_TRAIN})
    values.update(explicit)
    check_dependencies(explicit, values)
    try:
        model = ModelConfig(**_split(ModelConfig, values))
    except ValueError as e:  # ModelConfig is in model/, which knows nothing of ConfigError
        raise CliError(str(e)) from e
    return RunSpec(model=model, train=TrainConfig(**_split(TrainConfig, values)),
                   guard=GuardConfig(**_split(GuardConfig, values)),
                   plasticity=PlasticityConfig(**_split(PlasticityConfig, values)),
                   continual=ContinualConfig(**_split(ContinualConfig, values)))


def main(argv: list[str] | None = None) -> int:
    from stability.data import DataError
    from stability.distributed import Dist, DistError, setup, teardown
    from stability.drill import drill
    from stability.faults import FaultSpecError
    from stability.run import EXIT_BAD_INPUT, BadInput, Run

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in USE_COMMANDS:
        return use_command(args)
    bad_input = (CliError, ConfigError, DataError, BadInput, FaultSpecError, DistError)
    d = Dist()
    try:
        # everything that can be wrong with the input is found here, before any write
        try:
            spec = resolve(args)
            d = setup(spec.train.distributed, spec.train.device)  # torchrun's process group, if any
            if args.command == "drill":
                return drill(spec, sys.stdout, tolerance=args.tolerance,
                             keep=Path(spec.train.output_dir) if spec.train.output_dir else None, dist=d)
            job = Run(spec, dist=d)
            job.setup()
        except bad_input as e:  # every rank finds the same problem; rank 0 says it
            if d.main:
                print(f"lsnn {args.command}: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return job.fit()
    finally:
        teardown(d)


# --- using what a run trained: sample, eval, export, report ------------------------------

USE_COMMANDS: tuple[str, ...] = ("sample", "eval", "export", "report")


def _number(kind: type, low: float, what: str):
    """An argparse type: ``kind`` (int or float), finite and >= ``low``; the error names the rule."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (value >= low and value - value == 0):  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def _add_use_commands(sub) -> None:
    def common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
        p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the --output-dir of a `lsnn train` run")
        if checkpoint:
            p.add_argument("--checkpoint", choices=("best", "last"), default=None,
                           help="checkpoints/best.pt (lowest validation loss) or last.pt "
                                "(default: best if the run has one, else last)")

    sample = sub.add_parser("sample", help="generate text from a trained run",
                            description="Continue --prompt with the run's model and tokenizer, printing each "
                            "piece of text as soon as it is generated. Each new token costs one recurrent step.")
    common(sample)
    sample.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    sample.add_argument("--max-new-tokens", type=_number(int, 1, "a positive integer"), default=200,
                        help="tokens to generate at most; stops early at the end-of-document token (default: 200)")
    sample.add_argument("--temperature", type=_number(float, 0, "a finite number >= 0"), default=0.8,
                        help="softmax temperature; 0 is greedy (default: 0.8)")
    sample.add_argument("--top-k", type=_number(int, 0, "an integer >= 0"), default=40,
                        help="draw from the K most likely tokens only; 0: from all (default: 40)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws: a seed repeats its text (default: 0)")
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="(default: cpu)")
    ev = sub.add_parser("eval", help="loss, perplexity and accuracy of a trained run",
                        description="Evaluate a checkpoint on the run's validation split (rebuilt from its "
                        "config.json) or on --data, beside the unigram baselines.")
    common(ev)
    ev.add_argument("--data", default=None, metavar="PATH",
                    help="a text file or directory to evaluate on, all of it (default: the run's validation split)")
    ev.add_argument("--eval-batches", type=_number(int, 1, "a positive integer"), default=None,
                    help="batches spread evenly over the text (default: the run's --eval-batches, else all)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="(default: cpu)")
    export = sub.add_parser("export", help="write the model as safetensors + config.json + tokenizer.json",
                            description="Write OUT/model.safetensors, OUT/config.json and OUT/tokenizer.json, "
                            "loadable with HybridLM.from_pretrained(OUT) and load_saved_tokenizer(OUT).")
    common(export)
    export.add_argument("out", metavar="OUT", type=Path, help="directory to write (created if missing)")
    report = sub.add_parser("report", help="draw a run's health report (report.png, report.html)",
                            description="Write RUN_DIR/report.png and a self-contained RUN_DIR/report.html: "
                            "losses against the unigram baseline, gradient norm and its bands, loss scale, "
                            "skips and rollbacks, per-block diagnostics and the task matrix.")
    common(report, checkpoint=False)


def use_command(args: argparse.Namespace) -> int:
    """Run sample, eval, export or report; bad input exits 2 with a message, no traceback."""
    import json

    from stability.artifacts import ArtifactError, export_run, open_run
    from stability.data import DataError
    from stability.evaluation import evaluate_run, format_result
    from stability.healthreport import ReportError, write_report
    from stability.sampling import SampleError, generate
    from stability.trainer import resolve_device

    try:
        if args.command == "report":
            png, page = _writing(write_report, args.run_dir)
            print(f"wrote {png} and {page}")
            return 0
        device = resolve_device(getattr(args, "device", "cpu"))  # export: on the CPU
        art = open_run(args.run_dir, args.checkpoint, device)
        if args.command == "sample":
            generate(art.model, art.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                     args.seed, out=sys.stdout)
        elif args.command == "eval":
            result = evaluate_run(art, args.data, args.eval_batches, device)
            print(json.dumps(result, indent=2) if args.json else "\n".join(format_result(result)))
        else:
            paths = _writing(export_run, art, args.out)
            print(f"wrote {', '.join(str(p) for p in paths)} ({art.checkpoint}, step {art.step})")
    except (ArtifactError, ConfigError, DataError, ReportError, SampleError) as e:
        print(f"lsnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _writing(write, *args):
    """``write(*args)``, an OSError (a read-only or full disk) becoming a message naming the file."""
    from stability.artifacts import ArtifactError

    try:
        return write(*args)
    except OSError as e:
        raise ArtifactError(f"cannot write {e.filename or args[-1]}: {e.strerror or e}; "
                            "choose a writable directory") from e


if __name__ == "__main__":
    sys.exit(main())
