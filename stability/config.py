"""Trainer configuration: one frozen dataclass per concern, field names equal to the
CLI flags (``--gradient-clip`` -> ``gradient_clip``), a one-line docstring per field
(it becomes the flag's ``--help``). Each class validates itself once and raises one
``ValueError`` naming every flag that is wrong.
"""

from __future__ import annotations

import ast
import functools
import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from model.config import ModelConfig, field_problems, flag, merge_problems


class ConfigError(ValueError):
    """A bad combination of flags; the message names each flag and what to do."""


def _raise_if(obj: Any, problems: list[str], what: str) -> None:
    """Raise one ConfigError with ``obj``'s choice and finiteness problems and ``problems``
    (its range checks, which NaN would fail too: those are not repeated)."""
    problems = merge_problems(field_problems(obj), problems)
    if problems:
        raise ConfigError(f"invalid {what}:\n  - " + "\n  - ".join(problems))


def _check_positive(obj: Any, names: tuple[str, ...], problems: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{flag(name)} must be a positive integer, got {value!r}")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class TrainConfig(_Config):
    """What to train on, for how long, and how."""

    task: Literal["llm"] = "llm"
    """What to train: llm (next-token language modelling), the only task."""
    epochs: int = 1
    """Passes over the training split (per task with --continual-learning)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    sequence_length: int = 256
    """Tokens per training sequence."""
    learning_rate: float = 2e-3
    """Peak learning rate of AdamW, reached after --warmup-steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of --learning-rate."""
    warmup_steps: int = 100
    """Linear warm-up steps; the first step already has a learning rate above zero."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on biases, norms, A_log, D)."""
    gradient_clip: float = 1.0
    """Clip the total gradient norm to this value; 0 turns clipping off."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    mixed_precision: bool = False
    """Autocast the forward pass to --amp-dtype."""
    amp_dtype: Literal["auto", "fp16", "bf16"] = "auto"
    """Mixed-precision dtype: auto is bf16 where supported, else fp16 with loss scaling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when available."""
    cuda_graphs: bool = False
    """Capture the whole guarded step as a CUDA graph once per batch shape and replay it (CUDA, one process, bf16/fp32)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: replicate the model (ddp; auto) or shard it with FSDP2 (fsdp)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    output_dir: str | None = None
    """Where checkpoints, metrics.jsonl and config.json go (default runs/<timestamp>)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (over all epochs; per task with --continual-learning)."""
    log_every: int = 50
    """Log a step line, and read the device-side health counters, every N steps."""
    checkpoint_every: int = 1000
    """Write checkpoints/last.pt every N steps as well as at each epoch end; 0: epoch ends only."""
    keep_checkpoints: int = 3
    """Keep the last K checkpoints taken at healthy moments (checkpoints/step-N.pt): rollback targets after a restart."""
    eval_batches: int = 200
    """Validate on this many batches spread evenly over the validation split; 0: all of it."""
    resume: bool = False
    """Continue the run in --output-dir from checkpoints/last.pt, exactly."""
    overwrite: bool = False
    """Start a new run in an --output-dir that holds one, deleting that run's files (and no others)."""
    dataset: str | None = None
    """A named corpus instead of the embedded one: stdlib (default) or wikitext2."""
    data: str | None = None
    """Text to train on instead of the embedded corpus: a text file, a directory of text files, JSON Lines, Parquet or Arrow files, or a directory from lsnn prepare."""
    data_format: Literal["auto", "text", "jsonl", "parquet", "arrow"] = "auto"
    """How to read --data: auto goes by the suffix of a file, or of the files holding most of a directory's bytes."""
    text_field: str = "text"
    """The field of a JSON Lines record, or the column of a Parquet or Arrow table, that holds the text (--data)."""
    val_fraction: float = 0.05
    """Fraction of files (or segments of a single --data file) held out for validation."""
    tokenizer: Literal["bpe", "byte", "gpt2", "o200k"] = "bpe"
    """bpe (trained on the training split), byte, or gpt2/o200k via tiktoken."""
    vocab_size: int = 8192
    """Vocabulary size of the bpe tokenizer (byte is 256; tiktoken's are fixed)."""
    tokenizer_sample_mb: int = 64
    """The bpe tokenizer is trained on at most this many MB of the training split: a fixed sample of whole documents."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress output: a bar on a terminal, plain periodic lines otherwise."""
    tensorboard: bool = False
    """Also write each metrics.jsonl record as TensorBoard scalars in OUTPUT_DIR/tensorboard/ (extra: tensorboard)."""
    report: bool = True
    """Draw the health report (report.png, report.html) when the run ends or stops with exit 3."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_positive(self, ("epochs", "batch_size", "sequence_length", "gradient_accumulation_steps",
                               "log_every", "vocab_size", "keep_checkpoints", "tokenizer_sample_mb"), p)
        if self.task != "llm":
            p.append(f"--task {self.task!r} is not supported; the only task is llm")
        if not 0 < self.learning_rate <= 1:
            p.append(f"--learning-rate must be in (0, 1], got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                p.append(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay <= 1:
            p.append(f"--weight-decay must be in [0, 1] (decoupled: each step shrinks weights by lr x it), "
                     f"got {self.weight_decay}")
        if self.gradient_clip < 0:
            p.append(f"--gradient-clip must be >= 0 (0 turns clipping off), got {self.gradient_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps must be a positive integer, got {self.max_steps}")
        if isinstance(self.eval_batches, bool) or not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            p.append(f"--eval-batches must be an integer >= 0 (0: the whole validation split), got {self.eval_batches!r}")
        if self.resume and self.overwrite:
            p.append("--resume continues the run in --output-dir and --overwrite deletes it; give one of them")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.data is not None and self.dataset is not None:
            p.append("--data and --dataset both name a corpus; give one of them")
        if self.amp_dtype != "auto" and not self.mixed_precision:
            p.append(f"--amp-dtype {self.amp_dtype} has no effect without --mixed-precision; add it")
        _raise_if(self, p, "training configuration")


@dataclass(frozen=True)
class GuardConfig(_Config):
    """The stability guard: skip, loss scaling, spike handling, recovery, health bands."""

    guard: bool = True
    """Guard every optimizer step (skip non-finite steps); --no-guard only for comparison runs."""
    init_scale: float = 2.0**10
    """fp16 loss scale at the start (the write-up's conservative 1024, not 65536)."""
    growth_factor: float = 1.5
    """Multiply the loss scale by this after --growth-interval overflow-free steps."""
    backoff_factor: float = 0.5
    """Multiply the loss scale by this on an overflowing step."""
    growth_interval: int = 200
    """Overflow-free steps between loss-scale growths."""
    overflow_patience: int = 3
    """Consecutive overflows after which the loss scale takes the extra --overflow-cut."""
    overflow_cut: float = 0.1
    """Extra multiplicative cut of the loss scale after --overflow-patience consecutive overflows."""
    min_scale: float = 1.0
    """The loss scale never goes below this; persistent overflow here stops the run."""
    max_scale: float = 2.0**24
    """The loss scale never grows above this (stays finite in fp32)."""
    overflow_limit: int = 20
    """Consecutive overflowing steps at --min-scale after which the run stops with the cause."""
    spike_policy: Literal["clip", "skip", "off"] = "clip"
    """Gradient-norm spikes (z-score over a running mean/variance): clip them, skip the step, or ignore."""
    spike_zscore: float = 4.0
    """A gradient norm this many running standard deviations above the running mean is a spike."""
    spike_ema: float = 0.97
    """Decay of the running mean and variance of the gradient norm."""
    spike_warmup: int = 25
    """Steps of statistics gathered before spikes are acted on."""
    loss_spike_policy: Literal["skip", "off"] = "skip"
    """Finite losses far above their running statistics (a z-score): skip the step, or ignore them."""
    loss_spike_zscore: float = 6.0
    """A loss this many running standard deviations above the running mean is a loss spike."""
    loss_spike_min_rise: float = 0.1
    """...and at least this fraction of the running mean above it, so a very steady loss does not skip every harder batch."""
    loss_spike_warmup: int = 50
    """Good steps of loss statistics gathered before loss spikes are acted on (again at each task)."""
    rollback_after: int = 5
    """Consecutive skipped steps after which training rolls back to the last good state (K)."""
    snapshot_every: int = 100
    """Keep an in-memory copy of the last good state every N good steps (N)."""
    max_rollbacks: int = 3
    """Rollbacks before the run stops with exit code 3 and a diagnosis (R)."""
    rollback_lr_factor: float = 0.5
    """Multiply the learning rate by this at each rollback."""
    band_healthy: float = 0.5
    """Gradient norms from here to --band-high are healthy (below: low)."""
    band_high: float = 5.0
    """Gradient norms from here to --band-critical are high (a warning)."""
    band_critical: float = 10.0
    """Gradient norms above this are critical (a warning)."""
    plasticity_max_norm: float = 1.0
    """Largest norm of one out-of-optimizer update (STDP) relative to its weight's norm; larger is clipped."""
    inject_fault: str | None = None
    """Inject faults, e.g. 'loss:nan@120,grad[blocks.1.mamba]:inf@30,overflow@5-20' (see README)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_positive(self, ("growth_interval", "overflow_patience", "overflow_limit", "spike_warmup",
                               "loss_spike_warmup", "rollback_after", "snapshot_every"), p)
        if self.max_rollbacks < 0:
            p.append(f"--max-rollbacks must be >= 0, got {self.max_rollbacks}")
        if not self.init_scale > 0 or not self.min_scale > 0:
            p.append("--init-scale and --min-scale must be > 0")
        if not self.min_scale <= self.init_scale <= self.max_scale:
            p.append(f"need --min-scale ({self.min_scale:g}) <= --init-scale ({self.init_scale:g}) "
                     f"<= --max-scale ({self.max_scale:g})")
        if not self.growth_factor > 1.0:
            p.append(f"--growth-factor must be > 1, got {self.growth_factor}")
        for name in ("backoff_factor", "overflow_cut", "rollback_lr_factor"):
            if not 0.0 < getattr(self, name) < 1.0:
                p.append(f"{flag(name)} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 < self.spike_ema < 1.0:
            p.append(f"--spike-ema must be in (0, 1), got {self.spike_ema}")
        for name in ("spike_zscore", "loss_spike_zscore"):
            if not getattr(self, name) > 0:
                p.append(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        if not self.loss_spike_min_rise >= 0:
            p.append(f"--loss-spike-min-rise must be >= 0, got {self.loss_spike_min_rise}")
        if not self.max_scale <= 2.0**64:
            p.append(f"--max-scale must be at most 2**64, got {self.max_scale:g}")
        if not 0 <= self.band_healthy <= self.band_high <= self.band_critical:
            p.append("need 0 <= --band-healthy <= --band-high <= --band-critical")
        if not self.plasticity_max_norm > 0:
            p.append(f"--plasticity-max-norm must be > 0, got {self.plasticity_max_norm}")
        _raise_if(self, p, "guard configuration")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@dataclass(frozen=True)
class PlasticityConfig(_Config):
    """Out-of-optimizer plasticity: STDP on the spiking synapses, meta-plasticity of rates."""

    use_stdp: bool = False
    """Apply spike-timing-dependent plasticity to each block's LIF-to-LIF synapses after each good step."""
    stdp_type: Literal["classical", "triplet", "homeostatic", "bcm"] = "classical"
    """STDP rule: pair-based, Pfister-Gerstner triplet, pair + rate homeostasis, or BCM."""
    stdp_learning_rate: float = 1e-3
    """Scale of the STDP weight change per step."""
    stdp_tau_plus: float = 4.0
    """Time constant, in tokens, of the pre-synaptic trace (the potentiation window)."""
    stdp_tau_minus: float = 4.0
    """Time constant, in tokens, of the post-synaptic trace (the depression window)."""
    stdp_target_rate: float = 0.1
    """Target firing rate (spikes per token) of homeostatic STDP, BCM and meta-plasticity."""
    use_meta_plasticity: bool = False
    """Adapt each block's optimizer learning rate and STDP rate to its gradient health and firing rate."""
    meta_lr: float = 0.05
    """Step, in log space, by which a meta-plasticity multiplier moves per optimizer step."""
    meta_min: float = 0.25
    """Lower bound of the meta-plasticity multipliers."""
    meta_max: float = 2.0
    """Upper bound of the meta-plasticity multipliers."""
    meta_rate_tolerance: float = 0.1
    """Firing rates within this distance of --stdp-target-rate count as healthy."""
    meta_plateau: float = 0.01
    """Relative loss improvement (fast vs slow running mean) below which the loss has plateaued."""

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("stdp_learning_rate", "stdp_tau_plus", "stdp_tau_minus", "meta_lr", "meta_plateau"):
            if not getattr(self, name) > 0:
                p.append(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 < self.stdp_target_rate < 1:
            p.append(f"--stdp-target-rate must be in (0, 1) spikes per token, got {self.stdp_target_rate}")
        if not 0 < self.meta_min <= 1 <= self.meta_max:
            p.append(f"need 0 < --meta-min ({self.meta_min}) <= 1 <= --meta-max ({self.meta_max})")
        if self.meta_rate_tolerance < 0:
            p.append(f"--meta-rate-tolerance must be >= 0, got {self.meta_rate_tolerance}")
        _raise_if(self, p, "plasticity configuration")


@dataclass(frozen=True)
class ContinualConfig(_Config):
    """Continual learning: tasks in sequence, EWC, replay."""

    continual_learning: bool = False
    """Train --num-tasks disjoint parts of the corpus (by domain) in order, --epochs each."""
    num_tasks: int = 2
    """Tasks for --continual-learning."""
    consolidation_strength: float = 10000.0
    """EWC: strength of the quadratic penalty anchoring weights important to earlier tasks; 0 turns it off."""
    fisher_batches: int = 16
    """EWC: training batches of a finished task used to estimate its diagonal Fisher information."""
    use_replay: bool = False
    """Mix sequences from earlier tasks, kept in a reservoir-sampled buffer, into each batch."""
    replay_buffer_size: int = 512
    """Sequences the replay buffer holds."""
    replay_strategy: Literal["uniform", "importance", "balanced"] = "uniform"
    """Replay sampling: uniform, importance (favour high-loss sequences), balanced (tasks equal)."""
    replay_fraction: float = 0.25
    """Fraction of each batch's sequences replaced by replayed ones."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_positive(self, ("num_tasks", "fisher_batches", "replay_buffer_size"), p)
        if self.continual_learning and self.num_tasks < 2:
            p.append(f"--num-tasks must be at least 2 with --continual-learning, got {self.num_tasks}")
        if self.use_replay and not self.continual_learning:
            p.append("--use-replay replays earlier tasks; add --continual-learning")
        if self.consolidation_strength < 0:
            p.append(f"--consolidation-strength must be >= 0, got {self.consolidation_strength}")
        if not 0 < self.replay_fraction < 1:
            p.append(f"--replay-fraction must be in (0, 1), got {self.replay_fraction}")
        _raise_if(self, p, "continual-learning configuration")


@dataclass
class RunSpec:
    """Everything a run is configured by."""

    model: ModelConfig
    train: TrainConfig
    guard: GuardConfig = field(default_factory=GuardConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    @property
    def num_tasks(self) -> int:
        return self.continual.num_tasks if self.continual.continual_learning else 1

    def to_dict(self) -> dict[str, Any]:
        """Every section by name, as config.json and a checkpoint hold them."""
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "guard": self.guard.to_dict(),
                "plasticity": self.plasticity.to_dict(), "continual": self.continual.to_dict()}
