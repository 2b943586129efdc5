"""Model configuration: one frozen dataclass, field names equal to the CLI flags.

``--liquid-units`` is ``liquid_units`` and so on. Every problem with a configuration is
collected and raised as one ``ValueError`` that names the flags to change.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

IntegrationMode = Literal["sequential", "parallel", "bidirectional"]
SpikeMethod = Literal["rate", "temporal", "potential"]
LiquidBackbone = Literal["cfc", "ltc"]
Surrogate = Literal["atan", "fast_sigmoid"]

INTEGRATION_MODES: tuple[str, ...] = typing.get_args(IntegrationMode)
SPIKE_METHODS: tuple[str, ...] = typing.get_args(SpikeMethod)
LIQUID_BACKBONES: tuple[str, ...] = typing.get_args(LiquidBackbone)
SURROGATES: tuple[str, ...] = typing.get_args(Surrogate)

# Default surrogate sharpness, as snntorch's atan(alpha=2.0) and fast_sigmoid(slope=25).
_SURROGATE_DEFAULT_SCALE = {"atan": 2.0, "fast_sigmoid": 25.0}


def flag(name: str) -> str:
    """The CLI flag of a config field: ``liquid_units`` -> ``--liquid-units``."""
    return "--" + name.replace("_", "-")


def field_problems(obj: Any) -> list[str]:
    """Problems every config dataclass checks the same way, from its type hints: a
    ``Literal`` field must hold one of its choices, and a float field a finite number
    (NaN and inf pass every ``<``/``>`` range check silently, so they are refused first)."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            continue
        if typing.get_origin(tp) is Literal:
            if value not in args:
                problems.append(f"{flag(f.name)} must be one of {', '.join(map(str, args))}; got {value!r}")
        elif tp is float or (float in args and type(None) in args):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{flag(f.name)} must be a finite number, got {value!r}")
    return problems


def merge_problems(field_msgs: list[str], range_msgs: list[str]) -> list[str]:
    """``field_problems`` then the range checks, less range messages about a flag that is
    already reported (NaN fails every range check too)."""
    reported = {m.split()[0] for m in field_msgs}
    return field_msgs + [m for m in range_msgs if m.split()[0] not in reported]


@dataclass(frozen=True)
class ModelConfig:
    """The hybrid liquid-spiking-Mamba language model."""

    vocab_size: int = 8192
    """Tokens in the vocabulary; set from the tokenizer by the trainer."""
    hidden_dim: int = 256
    """Width of the residual stream (d)."""
    num_layers: int = 4
    """Number of hybrid blocks."""
    mlp_ratio: int = 2
    """Width of each block's feed-forward layer as a multiple of hidden_dim; 0 removes it."""
    recompute_mlp: bool = True
    """Recompute the feed-forward layer's hidden activations in the backward instead of keeping them."""
    chunked_loss: bool = True
    """Compute the LM head and the training loss a chunk of tokens at a time, never the whole (tokens x vocab) logits."""
    dropout: float = 0.0
    """Dropout on each block's residual branches."""
    tie_embeddings: bool = True
    """Share the LM head's weight with the token embedding."""

    spiking_units: int = 64
    """LIF neurons per spiking layer (s); each block has two layers, input -> LIF -> LIF."""
    beta: float = 0.9
    """Membrane decay per token of the LIF neurons, in (0, 1)."""
    spike_threshold: float = 1.0
    """Membrane potential at which a LIF neuron fires; reset subtracts it."""
    surrogate: Surrogate = "atan"
    """Surrogate gradient of the spike: arctan or fast sigmoid (as snntorch)."""
    surrogate_scale: float | None = None
    """Surrogate sharpness: atan alpha (default 2) or fast-sigmoid slope (default 25)."""
    lif_impl: Literal["auto", "numba", "torch", "triton"] = "auto"
    """Where the LIF's per-token loop runs: auto is numba on CPU, triton on GPU where Triton imports, else torch."""

    liquid_units: int = 128
    """Hidden units of the liquid cell (q)."""
    liquid_backbone: LiquidBackbone = "cfc"
    """Liquid cell: closed-form continuous-time (cfc) or liquid time-constant ODE (ltc)."""
    liquid_backbone_units: int | None = None
    """Width of the CfC backbone layer (ncps' backbone_units); default --liquid-units."""
    ltc_ode_unfolds: int = 6
    """Semi-implicit Euler steps per token of the LTC ODE solver (ncps' ode_unfolds)."""
    cfc_impl: Literal["auto", "numba", "torch", "triton"] = "auto"
    """Where the CfC's per-token loops run: auto is numba on CPU, triton on GPU where Triton imports, else torch."""

    use_mamba: bool = False
    """Add the selective state-space (Mamba) path to every block."""
    mamba_d_state: int = 16
    """State size per channel of the selective scan (n)."""
    mamba_d_conv: int = 4
    """Kernel width of Mamba's causal depthwise convolution."""
    mamba_expand: int = 2
    """Mamba's inner width as a multiple of hidden_dim (e = expand * d)."""
    mamba_dt_rank: int | None = None
    """Rank of the delta projection; default ceil(hidden_dim / 16) as in Mamba."""
    scan_impl: Literal["auto", "numba", "loop", "parallel", "triton", "chunked", "cuda", "ref"] = "auto"
    """Selective scan: auto is numba (else loop) on CPU; cuda (mamba-ssm), else triton, else parallel on GPU."""

    spike_to_mamba_method: SpikeMethod = "rate"
    """How spikes become continuous features: rate, temporal (exponential) or potential."""
    spike_rate_window: int = 8
    """Window, in tokens, of the causal moving average used by the rate method."""
    spike_temporal_tau: float = 4.0
    """Time constant, in tokens, of the causal exponential filter of the temporal method."""

    integration_mode: IntegrationMode = "sequential"
    """How the spiking/liquid stream and the Mamba stream are combined in a block."""
    use_adaptive_gating: bool = False
    """Mix the block's branches with learned per-token, per-head gates, not a fixed average."""
    num_gate_heads: int = 4
    """Heads of the adaptive gate; hidden_dim must divide by it."""
    use_cross_attention: bool = False
    """Causal multi-head cross-attention between the spiking/liquid and Mamba streams."""
    cross_attn_heads: int = 4
    """Heads of the cross-attention; hidden_dim must divide by it."""
    recompute_cross_attention: bool = True
    """Recompute the cross-attention's norms and projections in the backward; its attention's outputs are kept."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Not a flag: free-form notes carried into checkpoints (e.g. the tokenizer name)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid model configuration:\n  - " + "\n  - ".join(problems))
        if self.surrogate_scale is None:
            object.__setattr__(self, "surrogate_scale", _SURROGATE_DEFAULT_SCALE[self.surrogate])
        if self.mamba_dt_rank is None:
            object.__setattr__(self, "mamba_dt_rank", math.ceil(self.hidden_dim / 16))
        if self.liquid_backbone_units is None:
            object.__setattr__(self, "liquid_backbone_units", self.liquid_units)

    @property
    def d_inner(self) -> int:
        """Mamba's inner width e."""
        return self.mamba_expand * self.hidden_dim

    def problems(self) -> list[str]:
        """Every problem with this configuration, each naming the flag to change."""
        found = field_problems(self)
        p: list[str] = []
        positive = (
            "vocab_size", "hidden_dim", "num_layers", "spiking_units", "liquid_units", "ltc_ode_unfolds",
            "mamba_d_state", "mamba_d_conv",
            "mamba_expand", "spike_rate_window", "num_gate_heads", "cross_attn_heads",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{flag(name)} must be a positive integer, got {value!r}")
        if not isinstance(self.mlp_ratio, int) or self.mlp_ratio < 0:
            p.append(f"--mlp-ratio must be an integer >= 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.beta < 1.0:
            p.append(f"--beta must be in (0, 1) (membrane decay per token), got {self.beta}")
        if not self.spike_threshold > 0.0:
            p.append(f"--spike-threshold must be > 0, got {self.spike_threshold}")
        if self.surrogate_scale is not None and not self.surrogate_scale > 0.0:
            p.append(f"--surrogate-scale must be > 0, got {self.surrogate_scale}")
        if not self.spike_temporal_tau > 0.0:
            p.append(f"--spike-temporal-tau must be > 0, got {self.spike_temporal_tau}")
        if self.liquid_backbone_units is not None and (
            not isinstance(self.liquid_backbone_units, int) or self.liquid_backbone_units < 1
        ):
            p.append(f"--liquid-backbone-units must be a positive integer, got {self.liquid_backbone_units!r}")
        if self.mamba_dt_rank is not None and (
            not isinstance(self.mamba_dt_rank, int) or self.mamba_dt_rank < 1
        ):
            p.append(f"--mamba-dt-rank must be a positive integer, got {self.mamba_dt_rank!r}")
        if not self.use_mamba:
            if self.integration_mode != "sequential":
                p.append(
                    f"--integration-mode {self.integration_mode} combines the liquid/spiking stream "
                    "with the Mamba stream; add --use-mamba or use --integration-mode sequential"
                )
            if self.use_cross_attention:
                p.append(
                    "--use-cross-attention attends between the liquid/spiking and Mamba streams; "
                    "add --use-mamba or drop --use-cross-attention"
                )
        if isinstance(self.hidden_dim, int) and self.hidden_dim > 0:
            if self.use_adaptive_gating and isinstance(self.num_gate_heads, int) and self.num_gate_heads > 0:
                if self.hidden_dim % self.num_gate_heads:
                    p.append(
                        f"--hidden-dim {self.hidden_dim} must be divisible by --num-gate-heads "
                        f"{self.num_gate_heads}; change one of them"
                    )
            if self.use_cross_attention and isinstance(self.cross_attn_heads, int) and self.cross_attn_heads > 0:
                if self.hidden_dim % self.cross_attn_heads:
                    p.append(
                        f"--hidden-dim {self.hidden_dim} must be divisible by --cross-attn-heads "
                        f"{self.cross_attn_heads}; change one of them"
                    )
        return merge_problems(found, p)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (a checkpoint's), ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
