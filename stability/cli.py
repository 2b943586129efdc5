"""The ``lsnn`` command line (also ``python -m stability``).

Flags are generated from the config dataclasses, so a flag and its field share one name
and one docstring. ``--phase N`` presets equal the four commands of the users' write-up;
``--config FILE`` (JSON, YAML, TOML, or a run's own config.json) overrides the preset, and
any flag given explicitly overrides both.
"""

from __future__ import annotations

import argparse
import functools
import json
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
        if tp is bool:  # --x and --no-x: a flag can turn off what a --config file turned on
            kw["action"] = argparse.BooleanOptionalAction
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
    _add_prepare_command(sub)
    return parser


_PREPARE_FLAGS = ("tokenizer", "vocab_size", "tokenizer_sample_mb", "val_fraction", "data_format", "text_field")


def _add_prepare_command(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus once into token shards that `train --data` maps",
                       description="Tokenise SOURCE into OUT: token shards (uint16 where the vocabulary fits), an "
                       "index of documents, their names and domains, the tokenizer and a manifest. Streams the "
                       "source (memory grows with its number of files, never with its text) and encodes on every core. `lsnn train --data OUT` "
                       "then trains on it, taking the tokenizer and split flags from it.")
    p.add_argument("source", metavar="SOURCE", help="a text file, a directory of text files, JSON Lines (.jsonl) or "
                   "Parquet/Arrow files (a file, or a directory such as datasets.save_to_disk writes)")
    p.add_argument("out", metavar="OUT", type=Path, help="the directory to write; it must not exist (or be empty)")
    hints, docs = typing.get_type_hints(TrainConfig), field_docs(TrainConfig)
    for f in (f for f in fields(TrainConfig) if f.name in _PREPARE_FLAGS):
        tp, _ = _unwrap(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": f.default}
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
        else:
            kw.update(type=tp, metavar=tp.__name__.upper())
        p.add_argument(flag(f.name), help=f"{docs.get(f.name, '')} (default: {f.default})", **kw)
    p.add_argument("--workers", type=_number(int, 0, "an integer >= 0"), default=0,
                   help="encoding processes (default: 0, one per core this process may use)")
    p.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                   help="a progress bar on a terminal (auto), always (bar), or a line every 10 s (lines)")


def prepare_command(args: argparse.Namespace) -> int:
    """``lsnn prepare SOURCE OUT``; bad input exits 2 with a message, writing nothing."""
    from stability.data import DataError
    from stability.prepare import prepare
    from stability.shards import is_prepared, open_prepared, progress_bar, settings_of, source_of

    out: Path = args.out
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CliError(f"OUT {out}: exists and is not an empty directory; choose a new directory (or delete it)")
        if is_prepared(args.source):
            raise CliError(f"SOURCE {args.source}: is a prepared corpus already; pass it to `lsnn train --data`")
        t = TrainConfig(data=args.source, **{name: getattr(args, name) for name in _PREPARE_FLAGS})
        source = source_of(t)
        prepare(source, out, settings_of(t, args.workers), say=print, bar=progress_bar(args.progress),
                extra={"source_label": str(args.source)})
    except (CliError, ConfigError, DataError) as e:
        print(f"lsnn prepare: error: {e}", file=sys.stderr)
        return 2
    corpus = open_prepared(out, "prepare it again")
    splits = corpus.manifest["splits"]
    print(f"wrote {out}: " + ", ".join(f"{s} {v['documents']:,} documents, {v['tokens']:,} tokens in "
                                        f"{len(v['shards'])} shard(s)" for s, v in splits.items())
          + f"; train with: lsnn train --data {out}")
    return 0


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase", type=int, choices=sorted(PHASES), default=argparse.SUPPRESS,
                   help="preset equal to phase N of the users' plan (1: minimal, 2: mixed precision, "
                        "3: Mamba + plasticity + continual, 4: everything); explicit flags override it")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="flag values from a JSON, YAML (.yaml/.yml) or TOML file: flat (learning_rate: 0.001 or "
                        "learning-rate) or in sections as a run's config.json writes them, so --config "
                        "runs/X/config.json repeats run X (--resume and --overwrite come from the command "
                        "line only); it overrides --phase, explicit flags override it")
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
    (("recompute_mlp",), f"--mlp-ratio > 0 (the default is {ModelConfig.mlp_ratio})",
     lambda v: v.get("mlp_ratio", ModelConfig.mlp_ratio) > 0),
    (("num_gate_heads",), "--use-adaptive-gating", lambda v: v.get("use_adaptive_gating")),
    (("cross_attn_heads", "recompute_cross_attention"), "--use-cross-attention",
     lambda v: v.get("use_cross_attention")),
    (("ltc_ode_unfolds",), "--liquid-backbone ltc", lambda v: v.get("liquid_backbone") == "ltc"),
    (("liquid_backbone_units", "cfc_impl"), "--liquid-backbone cfc (the default)",
     lambda v: v.get("liquid_backbone", "cfc") == "cfc"),
    (("spike_rate_window",), "--spike-to-mamba-method rate (the default)",
     lambda v: v.get("spike_to_mamba_method", "rate") == "rate"),
    (("spike_temporal_tau",), "--spike-to-mamba-method temporal", lambda v: v.get("spike_to_mamba_method") == "temporal"),
    (("vocab_size", "tokenizer_sample_mb"), "--tokenizer bpe (byte, gpt2 and o200k have fixed vocabularies)",
     lambda v: v.get("tokenizer", "bpe") == "bpe"),
    (("data_format", "text_field"), "--data", lambda v: v.get("data") is not None),
)


def applicable(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the flags whose feature is off in them (what a preset may say)."""
    off = {name for names, _, on in _DEPENDS if not on(values) for name in names}
    return {k: v for k, v in values.items() if k not in off}


def check_dependencies(explicit: dict[str, Any], values: dict[str, Any]) -> None:
    """A flag given for a feature that is off would be silently ignored: refuse it."""
    problems = [f"{flag(name)} only applies with {needs}; add it or drop the flag"
                for names, needs, on in _DEPENDS for name in names if name in explicit and not on(values)]
    if problems:
        raise CliError("\n  - ".join(["flags that would have no effect:", *problems]))


# --- --config FILE -------------------------------------------------------------------------

# The sections of a run's config.json that hold flags, and the facts it records beside them
# (the tokenizer built, the corpus fingerprint and data, the tasks, the device, precision, torch
# version and process group the run had), which are not flags and are skipped.
_SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "guard": GuardConfig,
                              "plasticity": PlasticityConfig, "continual": ContinualConfig}
_RUN_FACTS = ("tokenizer", "corpus", "data", "tasks", "device", "precision", "torch", "distributed")
# What a process does to --output-dir, not how the run trains: only the command line says it
# (run X's config.json has resume or overwrite true when X was started so, and --config must
# not resume or wipe X behind the user's back).
_COMMAND_LINE_ONLY = ("resume", "overwrite")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".toml")


@functools.cache
def _flag_owners() -> dict[str, type]:
    """Every flag field and the config class it belongs to (vocab_size: TrainConfig's)."""
    owners: dict[str, type] = {}
    for cls in (TrainConfig, ModelConfig, GuardConfig, PlasticityConfig, ContinualConfig):
        for f in fields(cls):
            if not (cls is ModelConfig and f.name in _SKIP_MODEL_FIELDS):
                owners.setdefault(f.name, cls)
    return owners


def _parse_config(path: Path, where: str) -> Any:
    suffix = path.suffix.lower()
    if suffix not in _CONFIG_SUFFIXES:
        raise CliError(f"{where}: unknown kind of file {path.suffix or '(no suffix)'!r}; name it .json, .yaml, "
                       ".yml or .toml")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CliError(f"{where}: cannot read the file ({e.strerror or e}); check the path") from e
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise CliError(f"{where}: reading YAML needs PyYAML, which is not installed: pip install "
                           "'lsnn[yaml]', or write the file as JSON or TOML") from e
        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # the same parser, a dependency on 3.10
            import tomli as tomllib
        parse, errors = (lambda b: tomllib.loads(b.decode())), (tomllib.TOMLDecodeError,)
    else:
        import json

        parse, errors = json.loads, (json.JSONDecodeError,)
    try:
        return parse(raw)
    except (*errors, UnicodeDecodeError) as e:
        raise CliError(f"{where}: not valid {suffix[1:].upper()}: {e}") from e


def _check_value(name: str, value: Any, key: str, where: str) -> Any:
    """``value`` as field ``name`` takes it (an int for a float becomes a float), or a
    CliError naming the file, the key and the type wanted."""
    hint, optional = _unwrap(typing.get_type_hints(_flag_owners()[name])[name])
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    if value is None and optional:
        return None
    if choices is not None:
        ok = isinstance(value, type(choices[0])) and value in choices
        wanted = f"one of {', '.join(map(str, choices))}"
    elif hint is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, wanted = isinstance(value, hint), f"a {hint.__name__}"
    if not ok:
        raise CliError(f"{where}: {key} ({flag(name)}) must be {wanted}{' or null' if optional else ''}, "
                       f"got {value!r}")
    return value


def _unknown(key: str, where: str, known: set[str]) -> CliError:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1)
    hint = f"; did you mean {close[0]!r} ({flag(close[0])})?" if close else "; `lsnn train --help` lists the flags"
    return CliError(f"{where}: unknown key {key!r}{hint}")


def read_config(path: str | Path) -> tuple[int | None, dict[str, Any], dict[str, str]]:
    """The --phase, the flag values and where each was written (``train.learning_rate``) of
    a config file: flat (``learning_rate`` or ``learning-rate``), in config.json's sections,
    or both. Sections hold their own flags only; beside sections the run facts of
    config.json are skipped. Any other key, a bad type or an unreadable file is a CliError
    naming --config, the file and the key."""
    path = Path(path)
    where = f"--config {path}"
    data = _parse_config(path, where)
    if not isinstance(data, dict):
        raise CliError(f"{where}: expected a mapping of flag names to values, got {type(data).__name__}")
    owners = _flag_owners()
    nested = any(k in _SECTIONS for k in data)
    phase, values, keys = None, {}, {}

    def put(name: str, value: Any, key: str) -> None:
        if name in _COMMAND_LINE_ONLY:
            return
        if name in keys:
            raise CliError(f"{where}: {key} and {keys[name]} both set {flag(name)}; keep one")
        values[name], keys[name] = _check_value(name, value, key, where), key

    for key, value in data.items():
        name = str(key).replace("-", "_")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise CliError(f"{where}: section {key!r} must be a mapping of its flags, got {value!r}")
            cls = _SECTIONS[key]
            for sub, v in value.items():
                sub_name = str(sub).replace("-", "_")
                if cls is ModelConfig and sub_name in _SKIP_MODEL_FIELDS:
                    continue  # the tokenizer's vocabulary and free notes, not flags
                if owners.get(sub_name) is not cls:
                    raise _unknown(f"{key}.{sub}", where, {f.name for f in fields(cls)} - _SKIP_MODEL_FIELDS)
                put(sub_name, v, f"{key}.{sub}")
        elif nested and key in _RUN_FACTS:
            continue
        elif name == "phase":
            if isinstance(value, bool) or value not in PHASES:
                raise CliError(f"{where}: phase must be one of {', '.join(map(str, PHASES))}, got {value!r}")
            phase = value
        elif name in owners:
            put(name, value, str(key))
        else:
            raise _unknown(str(key), where, set(owners))
    return phase, values, keys


def _drop_derived(from_file: dict[str, Any], context: dict[str, Any]) -> None:
    """Forget the file's values of derived fields (--mamba-dt-rank from --hidden-dim,
    --liquid-backbone-units from --liquid-units, --surrogate-scale from --surrogate) where
    they are what the file's own flags derive, as config.json writes them: a flag that
    changes the inputs (--hidden-dim 512 on the command line) then derives them anew."""
    for name in [n for n in from_file if _default(n) is None and from_file[n] is not None]:
        cls = _flag_owners()[name]
        rest = {k: v for k, v in _split(cls, context).items() if k != name}
        try:
            derived = getattr(cls(**rest), name)
        except ValueError:  # the file alone is no valid configuration (flags may complete it): keep the value
            continue
        if derived == from_file[name]:
            del from_file[name]


def _default(name: str) -> Any:
    return next(f.default for f in fields(_flag_owners()[name]) if f.name == name)


def _file_dependency_problems(keys: dict[str, str], explicit: dict[str, Any], values: dict[str, Any],
                              where: str) -> None:
    """check_dependencies for values from a config file. A run's config.json holds every
    flag, most at what the run would have had anyway: a file value counts as given only
    when the configuration would hold something else without it (a default, a preset, a
    value derived from other flags)."""
    owners, problems = _flag_owners(), []
    for names, needs, on in _DEPENDS:
        for name in names:
            if name not in keys or name in explicit or on(values):
                continue
            cls = owners[name]
            rest = {k: v for k, v in _split(cls, values).items() if k != name}
            if getattr(cls(**rest), name) != values[name]:
                problems.append(f"{keys[name]} ({flag(name)}) only applies with {needs}; add it or drop the key")
    if problems:
        raise CliError("\n  - ".join([f"{where}: keys that would have no effect:", *problems]))


# What a prepared --data directory was made with, and the flags that say it.
_PREPARED_FLAGS = ("tokenizer", "vocab_size", "val_fraction", "tokenizer_sample_mb")


def _adopt_prepared(values: dict[str, Any], given: set[str]) -> None:
    """--data naming a prepared directory: the flags it was prepared with that the command
    leaves out take its values (one given otherwise is refused when the data is opened)."""
    data = values.get("data")
    if data is None:
        return
    from stability.prepare import MANIFEST

    try:
        manifest = json.loads((Path(data) / MANIFEST).read_text(encoding="utf-8"))
        requested = manifest["tokenizer"]["requested"]
        made = {**requested, "val_fraction": manifest["split"]["val_fraction"],
                "tokenizer_sample_mb": manifest["tokenizer"]["sample"].get("budget_mb")}
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a prepared directory (or a damaged one: opening it says what is wrong)
    for name in _PREPARED_FLAGS:
        bpe_only = name in ("vocab_size", "tokenizer_sample_mb") and made["tokenizer"] != "bpe"
        if name not in given and not bpe_only and made.get(name) is not None:
            values[name] = made[name]


def resolve(args: argparse.Namespace):
    """Configs from dataclass defaults <- the --phase preset <- the --config file <- (--tiny
    sizes) <- explicit flags. A --phase flag beats the file's phase."""
    explicit = vars(args).copy()
    explicit.pop("command", None)
    phase = explicit.pop("phase", None)
    config = explicit.pop("config", None)
    tiny = explicit.pop("tiny", False)
    explicit.pop("tolerance", None)
    file_phase, from_file, keys = read_config(config) if config is not None else (None, {}, {})
    phase = phase if phase is not None else file_phase
    values = dict(PHASES[phase]) if phase else {}
    _drop_derived(from_file, {**values, **from_file})
    keys = {name: key for name, key in keys.items() if name in from_file}
    values.update(from_file)
    if tiny:
        from stability.drill import TINY, TINY_TRAIN

        values.update({**TINY, **TINY_TRAIN})
    values.update(explicit)
    _adopt_prepared(values, {*explicit, *from_file})
    check_dependencies(explicit, values)
    try:
        model = ModelConfig(**_split(ModelConfig, values))
    except ValueError as e:  # ModelConfig is in model/, which knows nothing of ConfigError
        raise CliError(str(e)) from e
    spec = RunSpec(model=model, train=TrainConfig(**_split(TrainConfig, values)),
                   guard=GuardConfig(**_split(GuardConfig, values)),
                   plasticity=PlasticityConfig(**_split(PlasticityConfig, values)),
                   continual=ContinualConfig(**_split(ContinualConfig, values)))
    _file_dependency_problems(keys, explicit, values, f"--config {config}")
    if spec.train.tensorboard:  # every rank resolves: all refuse together, before anything is written
        from stability.reporting import summary_writer

        summary_writer()
    return spec


def main(argv: list[str] | None = None) -> int:
    """The ``lsnn`` command; returns its exit code."""
    try:
        return _main(argv)
    finally:
        # Free the finished run (its model, DDP wrapper or FSDP state, optimizer: held in
        # reference cycles) now, while the interpreter is whole. Left to the interpreter's
        # exit, a rank that trained to the end aborted under torchrun (gloo, SIGABRT,
        # "terminate called without an active exception", and torchrun reports the job
        # failed): 4 of 20 two-rank `lsnn train` runs ended so, none of 20 with this.
        import gc

        gc.collect()


def _main(argv: list[str] | None) -> int:
    from stability.data import DataError
    from stability.distributed import Dist, DistError, setup, teardown
    from stability.drill import drill
    from stability.faults import FaultSpecError
    from stability.run import EXIT_BAD_INPUT, BadInput, Run

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in USE_COMMANDS:
        return use_command(args)
    if args.command == "prepare":
        return prepare_command(args)
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
    from stability.preflight import resolve_device
    from stability.sampling import SampleError, generate

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
