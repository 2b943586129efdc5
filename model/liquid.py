"""Liquid units: the CfC and LTC cells of ncps, and a layer that runs one over the tokens.

The cells follow ``ncps.torch.CfCCell`` and ``ncps.torch.LTCCell`` (fully connected wiring)
line for line, with the same parameter names, so an ncps state dict loads into them and
gives the same outputs; ncps itself is only a test oracle and is never imported here.

``LiquidLayer`` runs a cell over the token axis with one time unit per token. Each path
keeps its reference beside it:

- ``cfc_sequence_ref`` / ``ltc_sequence_ref``: step the cell itself, token by token.
- ``cfc_sequence`` / ``ltc_sequence``: the same recurrence with everything that does not
  depend on the state (input projections, the whole sensory synapse) hoisted out of the
  loop; plain autograd, any mode.
- ``cfc_sequence_fused``: the hot path (CfC default mode, one tanh-family backbone layer)
  through ``model.ops.cfc.cfc_scan``, one op whose backward is a hand-derived reverse loop;
  its per-token loops run compiled (numba) on the CPU, as one Triton kernel each on CUDA,
  or as torch kernels (``--cfc-impl``).

Shape letters:
    b  batch
    l  sequence length (tokens)
    i  input features
    q  liquid units (hidden state)
    k  backbone units
    c  width the CfC heads read: k, or i + q without a backbone
    n  stacked head outputs: 3q (ff1, ff2, time gate) or q (pure mode)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.ops.cfc import CFC_IMPLS, cfc_scan

if TYPE_CHECKING:
    from model.config import ModelConfig

CfCMode = Literal["default", "pure", "no_gate"]
CFC_MODES: tuple[str, ...] = ("default", "pure", "no_gate")
CFC_ACTIVATIONS: tuple[str, ...] = ("lecun_tanh", "tanh", "relu", "gelu", "silu")
LIQUID_BACKBONES: tuple[str, ...] = ("cfc", "ltc")
LTC_MAPPINGS: tuple[str, ...] = ("affine", "linear", "none")

# a = out * tanh(in * z): the activations the fused CfC path folds into its weights.
_TANH_SCALES: dict[str, tuple[float, float]] = {"lecun_tanh": (0.666, 1.7159), "tanh": (1.0, 1.0)}


class LeCun(nn.Module):
    """LeCun's scaled tanh, 1.7159 * tanh(0.666 x), as ncps defines it."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(0.666 * x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lecun_tanh": LeCun, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
}


# ---------------------------------------------------------------------------------------
# CfC
# ---------------------------------------------------------------------------------------


class CfCCell(nn.Module):
    """Closed-form continuous-time cell (Hasani et al. 2022), as ``ncps.torch.CfCCell``.

    Fully connected only (no sparsity mask) and no backbone dropout. Parameter names and
    the order in which they are created and initialised are ncps', so under the same seed
    both draw the same weights.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        mode: CfCMode = "default",
        backbone_activation: str = "lecun_tanh",
        backbone_units: int = 128,
        backbone_layers: int = 1,
    ) -> None:
        super().__init__()
        if mode not in CFC_MODES:
            raise ValueError(f"unknown CfC mode {mode!r}; use one of {', '.join(CFC_MODES)}")
        if backbone_activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown backbone activation {backbone_activation!r}; "
                f"use one of {', '.join(CFC_ACTIVATIONS)}"
            )
        if backbone_layers < 0:
            raise ValueError(f"backbone_layers must be >= 0, got {backbone_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.mode = mode
        self.backbone_activation = backbone_activation
        self.backbone_layers = backbone_layers
        act = _ACTIVATIONS[backbone_activation]
        self.backbone: nn.Sequential | None = None
        if backbone_layers > 0:
            layers: list[nn.Module] = [nn.Linear(input_size + hidden_size, backbone_units), act()]
            for _ in range(1, backbone_layers):
                layers += [nn.Linear(backbone_units, backbone_units), act()]
            self.backbone = nn.Sequential(*layers)
        width = backbone_units if backbone_layers > 0 else input_size + hidden_size  # c
        self.ff1 = nn.Linear(width, hidden_size)
        if mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(1, hidden_size))
            self.A = nn.Parameter(torch.ones(1, hidden_size))
        else:
            self.ff2 = nn.Linear(width, hidden_size)
            self.time_a = nn.Linear(width, hidden_size)
            self.time_b = nn.Linear(width, hidden_size)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform on every 2-D parameter, as ncps (w_tau and A included)."""
        for w in self.parameters():
            if w.dim() == 2 and w.requires_grad:
                nn.init.xavier_uniform_(w)

    def forward(self, input: Tensor, hx: Tensor, ts: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
        """One step: ``input`` (b i), ``hx`` (b q) -> (output, new state), both (b q)."""
        x = torch.cat([input, hx], 1)  # (b i+q)
        if self.backbone is not None:
            x = self.backbone(x)  # (b k)
        ff1 = self.ff1(x)  # (b q)
        if self.mode == "pure":
            new_hidden = -self.A * torch.exp(-ts * (torch.abs(self.w_tau) + torch.abs(ff1))) * ff1 + self.A
        else:
            ff1 = torch.tanh(ff1)
            ff2 = torch.tanh(self.ff2(x))
            t_interp = torch.sigmoid(self.time_a(x) * ts + self.time_b(x))
            if self.mode == "no_gate":
                new_hidden = ff1 + t_interp * ff2
            else:
                new_hidden = ff1 * (1.0 - t_interp) + t_interp * ff2
        return new_hidden, new_hidden


def cfc_sequence_ref(cell: CfCCell, x: Tensor, h0: Tensor, ts: float = 1.0) -> tuple[Tensor, Tensor]:
    """Reference: step ``cell`` over the tokens of ``x`` (b l i) from ``h0`` (b q)."""
    h = h0
    ys = []
    for x_t in x.unbind(1):
        y, h = cell(x_t, h, ts)
        ys.append(y)
    return torch.stack(ys, 1), h  # (b l q), (b q)


def _cfc_heads(cell: CfCCell, ts: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The CfC heads as one linear map (n c), (n): ff1, ff2 and the time gate, whose two
    heads fold into one because ``ts`` is the same for every token."""
    if cell.mode == "pure":
        return cell.ff1.weight.to(dtype), cell.ff1.bias.to(dtype)
    ta_w, ta_b = cell.time_a.weight, cell.time_a.bias
    if ts != 1:  # times 1 is exact, in value and gradient: two ops each way fewer (GPU launches)
        ta_w, ta_b = ts * ta_w, ts * ta_b
    w = torch.cat([cell.ff1.weight, cell.ff2.weight, ta_w + cell.time_b.weight])
    b = torch.cat([cell.ff1.bias, cell.ff2.bias, ta_b + cell.time_b.bias])
    return w.to(dtype), b.to(dtype)  # (3q c), (3q)


def _cfc_update(cell: CfCCell, p: Tensor, ts: float, w_tau: Tensor | None, a: Tensor | None) -> Tensor:
    """New state from the stacked head pre-activations ``p`` (b n)."""
    q = cell.hidden_size
    if cell.mode == "pure":
        return -a * torch.exp(-ts * (w_tau + torch.abs(p))) * p + a
    f1, f2 = torch.tanh(p[:, : 2 * q]).chunk(2, 1)  # (b q) each
    gate = torch.sigmoid(p[:, 2 * q :])  # (b q)
    if cell.mode == "no_gate":
        return torch.addcmul(f1, gate, f2)
    return torch.lerp(f1, f2, gate)


def cfc_sequence(cell: CfCCell, x: Tensor, h0: Tensor, ts: float = 1.0) -> tuple[Tensor, Tensor]:
    """Any CfC over the tokens with plain autograd, the input half of the first layer
    (the backbone's, or the heads' without a backbone) computed for all tokens at once."""
    dt, i, q = x.dtype, cell.input_size, cell.hidden_size
    heads_w, heads_b = _cfc_heads(cell, ts, dt)  # (n c), (n)
    if cell.backbone is not None:
        first = cell.backbone[0]
        w_x, w_h = first.weight.to(dt).split([i, q], 1)  # (k i), (k q)
        bias = first.bias.to(dt)
        act = cell.backbone[1]
        deeper = [(m.weight.to(dt).t().contiguous(), m.bias.to(dt)) for m in cell.backbone[2::2]]
    else:
        w_x, w_h = heads_w.split([i, q], 1)  # (n i), (n q)
        bias = heads_b
    # Time-major, so that every token's slice is contiguous; weights transposed once.
    zx = F.linear(x.transpose(0, 1), w_x, bias)  # (l b k) or (l b n)
    w_ht, heads_wt = w_h.t().contiguous(), heads_w.t().contiguous()
    w_tau = torch.abs(cell.w_tau.to(dt)) if cell.mode == "pure" else None
    amp = cell.A.to(dt) if cell.mode == "pure" else None
    h, ys = h0, []
    for zx_t in zx.unbind(0):
        p = torch.addmm(zx_t, h, w_ht)  # (b k) or, without a backbone, (b n)
        if cell.backbone is not None:
            p = act(p)
            for w, b in deeper:
                p = act(torch.addmm(b, p, w))  # (b k)
            p = torch.addmm(heads_b, p, heads_wt)  # (b n)
        h = _cfc_update(cell, p, ts, w_tau, amp)  # (b q)
        ys.append(h)
    return torch.stack(ys, 1), h  # (b l q), (b q)


def cfc_fusable(cell: CfCCell) -> bool:
    """Whether ``cfc_sequence_fused`` covers this cell: default mode, one tanh-family layer."""
    return cell.mode == "default" and cell.backbone_layers == 1 and cell.backbone_activation in _TANH_SCALES


def cfc_sequence_fused(cell: CfCCell, x: Tensor, h0: Tensor, ts: float = 1.0, impl: str = "auto"
                       ) -> tuple[Tensor, Tensor]:
    """``cfc_sequence`` for a ``cfc_fusable`` cell, through ``cfc_scan`` (its ``impl``)."""
    if not cfc_fusable(cell):
        raise ValueError(
            f"the fused CfC path covers mode 'default' with one {'/'.join(_TANH_SCALES)} backbone "
            f"layer, got mode {cell.mode!r}, {cell.backbone_layers} layers of "
            f"{cell.backbone_activation!r}; use cfc_sequence"
        )
    first = cell.backbone[0]
    w_x, w_h = first.weight.to(x.dtype).split([cell.input_size, cell.hidden_size], 1)  # (k i), (k q)
    heads_w, heads_b = _cfc_heads(cell, ts, x.dtype)  # (3q k), (3q)
    zx = F.linear(x, w_x, first.bias.to(x.dtype))  # (b l k)
    return cfc_scan(zx, h0, w_h, heads_w, heads_b, *_TANH_SCALES[cell.backbone_activation], impl=impl)


# ---------------------------------------------------------------------------------------
# LTC
# ---------------------------------------------------------------------------------------

_LTC_INIT_RANGES: dict[str, tuple[float, float]] = {
    "gleak": (0.001, 1.0),
    "vleak": (-0.2, 0.2),
    "cm": (0.4, 0.6),
    "w": (0.001, 1.0),
    "sigma": (3, 8),
    "mu": (0.3, 0.8),
    "sensory_w": (0.001, 1.0),
    "sensory_sigma": (3, 8),
    "sensory_mu": (0.3, 0.8),
}


def _uniform(name: str, *shape: int) -> nn.Parameter:
    lo, hi = _LTC_INIT_RANGES[name]
    return nn.Parameter(torch.rand(*shape) * (hi - lo) + lo)


def _polarity(*shape: int) -> Tensor:
    """Random synapse polarity, -1 with probability 1/3 as ncps' FullyConnected wiring."""
    return torch.where(torch.rand(*shape) < 1 / 3, -1.0, 1.0)


class LTCCell(nn.Module):
    """Liquid time-constant cell (Hasani et al. 2021), as ``ncps.torch.LTCCell`` on
    ``ncps.wirings.FullyConnected(units)``: every neuron is a motor neuron, so the output
    has ``units`` features. The masks are all-ones buffers kept for state-dict parity.

    With ``implicit_param_constraints`` (the default, unlike ncps) w, sensory_w, cm and
    gleak pass through softplus, so no clipping is needed after an optimiser step;
    otherwise call ``apply_weight_constraints`` after each step, as with ncps.
    """

    def __init__(
        self,
        input_size: int,
        units: int,
        ode_unfolds: int = 6,
        epsilon: float = 1e-8,
        implicit_param_constraints: bool = True,
        input_mapping: str = "affine",
        output_mapping: str = "affine",
    ) -> None:
        super().__init__()
        for name, value in (("input_mapping", input_mapping), ("output_mapping", output_mapping)):
            if value not in LTC_MAPPINGS:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(LTC_MAPPINGS)}")
        if ode_unfolds < 1:
            raise ValueError(f"ode_unfolds must be >= 1, got {ode_unfolds}")
        self.input_size = input_size
        self.units = units
        self._ode_unfolds = ode_unfolds
        self._epsilon = epsilon
        self._implicit_param_constraints = implicit_param_constraints
        self._input_mapping = input_mapping
        self._output_mapping = output_mapping
        self.gleak = _uniform("gleak", units)
        self.vleak = _uniform("vleak", units)
        self.cm = _uniform("cm", units)
        self.sigma = _uniform("sigma", units, units)
        self.mu = _uniform("mu", units, units)
        self.w = _uniform("w", units, units)
        self.erev = nn.Parameter(_polarity(units, units))
        self.sensory_sigma = _uniform("sensory_sigma", input_size, units)
        self.sensory_mu = _uniform("sensory_mu", input_size, units)
        self.sensory_w = _uniform("sensory_w", input_size, units)
        self.sensory_erev = nn.Parameter(_polarity(input_size, units))
        self.register_buffer("sparsity_mask", torch.ones(units, units))
        self.register_buffer("sensory_sparsity_mask", torch.ones(input_size, units))
        if input_mapping in ("affine", "linear"):
            self.input_w = nn.Parameter(torch.ones(input_size))
        if input_mapping == "affine":
            self.input_b = nn.Parameter(torch.zeros(input_size))
        if output_mapping in ("affine", "linear"):
            self.output_w = nn.Parameter(torch.ones(units))
        if output_mapping == "affine":
            self.output_b = nn.Parameter(torch.zeros(units))

    @property
    def state_size(self) -> int:
        return self.units

    @property
    def sensory_size(self) -> int:
        return self.input_size

    @property
    def motor_size(self) -> int:
        return self.units

    @property
    def output_size(self) -> int:
        return self.units

    @property
    def ode_unfolds(self) -> int:
        return self._ode_unfolds

    def make_positive(self, t: Tensor) -> Tensor:
        return F.softplus(t) if self._implicit_param_constraints else t

    def map_inputs(self, x: Tensor) -> Tensor:
        if self._input_mapping in ("affine", "linear"):
            x = x * self.input_w
        if self._input_mapping == "affine":
            x = x + self.input_b
        return x

    def map_outputs(self, state: Tensor) -> Tensor:
        if self._output_mapping in ("affine", "linear"):
            state = state * self.output_w
        if self._output_mapping == "affine":
            state = state + self.output_b
        return state

    def apply_weight_constraints(self) -> None:
        """Clip w, sensory_w, cm and gleak at 0 (only without implicit constraints), as ncps."""
        if not self._implicit_param_constraints:
            with torch.no_grad():
                for p in (self.w, self.sensory_w, self.cm, self.gleak):
                    p.clamp_(min=0)

    def _ode_solver(self, inputs: Tensor, state: Tensor, elapsed_time: float) -> Tensor:
        pos = self.make_positive
        sensory = pos(self.sensory_w) * torch.sigmoid(self.sensory_sigma * (inputs.unsqueeze(-1) - self.sensory_mu))
        sensory = sensory * self.sensory_sparsity_mask  # (b i q)
        num_sensory = torch.sum(sensory * self.sensory_erev, dim=1)  # (b q)
        den_sensory = torch.sum(sensory, dim=1)  # (b q)
        cm_t = pos(self.cm) / (elapsed_time / self._ode_unfolds)
        w = pos(self.w)
        v = state
        for _ in range(self._ode_unfolds):
            act = w * torch.sigmoid(self.sigma * (v.unsqueeze(-1) - self.mu)) * self.sparsity_mask  # (b q q)
            num = torch.sum(act * self.erev, dim=1) + num_sensory  # (b q)
            den = torch.sum(act, dim=1) + den_sensory  # (b q)
            gleak = pos(self.gleak)
            v = (cm_t * v + gleak * self.vleak + num) / (cm_t + gleak + den + self._epsilon)
        return v

    def forward(self, inputs: Tensor, states: Tensor, elapsed_time: float = 1.0) -> tuple[Tensor, Tensor]:
        """One step: ``inputs`` (b i), ``states`` (b q) -> (outputs, next state), both (b q)."""
        next_state = self._ode_solver(self.map_inputs(inputs), states, elapsed_time)
        return self.map_outputs(next_state), next_state


def ltc_sequence_ref(cell: LTCCell, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: step ``cell`` over the tokens of ``x`` (b l i) from ``h0`` (b q)."""
    v = h0
    ys = []
    for x_t in x.unbind(1):
        y, v = cell(x_t, v)
        ys.append(y)
    return torch.stack(ys, 1), v  # (b l q), (b q)


def ltc_sequence(cell: LTCCell, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """The LTC over the tokens with plain autograd; the input mapping and the whole
    sensory synapse (activations, numerator and denominator sums) are computed for all
    tokens at once, the output mapping after the loop. One time unit per token."""
    dt, pos = x.dtype, cell.make_positive
    p = {name: t.to(dt) for name, t in [*cell.named_parameters(), *cell.named_buffers()]}
    u = x
    if "input_w" in p:
        u = u * p["input_w"]
    if "input_b" in p:
        u = u + p["input_b"]
    sens = torch.sigmoid(p["sensory_sigma"] * (u.unsqueeze(-1) - p["sensory_mu"]))  # (b l i q)
    sens_w = pos(p["sensory_w"]) * p["sensory_sparsity_mask"]  # (i q)
    num_s = (sens * (sens_w * p["sensory_erev"])).sum(2)  # (b l q)
    den_s = (sens * sens_w).sum(2)  # (b l q)
    gleak = pos(p["gleak"])
    cm_t = pos(p["cm"]) * cell.ode_unfolds  # cm / (elapsed time / unfolds)
    num_c = gleak * p["vleak"] + num_s  # (b l q)
    den_c = cm_t + gleak + cell._epsilon + den_s  # (b l q)
    w = pos(p["w"]) * p["sparsity_mask"]  # (q q)
    w_rev = w * p["erev"]  # (q q)
    sigma = p["sigma"]
    neg_sigma_mu = -(sigma * p["mu"])  # (q q)
    v, vs = h0, []
    # (b q q) products and sums beat an einsum here, whose backward is ~4x slower.
    for num_t, den_t in zip(num_c.unbind(1), den_c.unbind(1)):
        for _ in range(cell.ode_unfolds):
            act = torch.sigmoid(torch.addcmul(neg_sigma_mu, v.unsqueeze(-1), sigma))  # (b q q)
            v = (torch.addcmul(num_t, cm_t, v) + (act * w_rev).sum(1)) / (den_t + (act * w).sum(1))  # (b q)
        vs.append(v)
    y = torch.stack(vs, 1)  # (b l q)
    if "output_w" in p:
        y = y * p["output_w"]
    if "output_b" in p:
        y = y + p["output_b"]
    return y, v


# ---------------------------------------------------------------------------------------
# Layer
# ---------------------------------------------------------------------------------------


class LiquidLayer(nn.Module):
    """A liquid cell run over the token axis, one time unit per token.

    ``forward(x (b l i), h0 (b q) | None) -> (y (b l q), h_last (b q))``. The recurrence
    runs in fp32 (fp64 if ``x`` is fp64) with autocast off; ``y`` is cast back to ``x``'s
    dtype and ``h_last`` stays in the recurrence dtype, since it is state to carry on.
    ``fused=False`` runs the reference (the cell stepped token by token).

    ``backbone_units`` and the keyword-only CfC options apply to ``cfc``; ``ode_unfolds``
    to ``ltc``; ``cfc_impl`` is where the fused CfC scan's loops run (``model.ops.cfc``). The
    LTC's hoisted sensory synapse holds a (b l i q) activation for backward, as many bytes
    as stepping the cell would save across the tokens.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        backbone: Literal["cfc", "ltc"] = "cfc",
        backbone_units: int = 128,
        ode_unfolds: int = 6,
        *,
        mode: CfCMode = "default",
        backbone_activation: str = "lecun_tanh",
        backbone_layers: int = 1,
        fused: bool = True,
        cfc_impl: str = "auto",
    ) -> None:
        super().__init__()
        if backbone not in LIQUID_BACKBONES:
            raise ValueError(f"unknown liquid backbone {backbone!r}; use one of {', '.join(LIQUID_BACKBONES)}")
        if cfc_impl not in CFC_IMPLS:
            raise ValueError(f"unknown CfC implementation {cfc_impl!r}; use one of {', '.join(CFC_IMPLS)}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.backbone = backbone
        self.fused = fused
        self.cfc_impl = cfc_impl
        self.cell: CfCCell | LTCCell
        if backbone == "cfc":
            self.cell = CfCCell(input_size, hidden_size, mode, backbone_activation, backbone_units, backbone_layers)
        else:
            self.cell = LTCCell(input_size, hidden_size, ode_unfolds)

    @classmethod
    def from_config(cls, cfg: ModelConfig, input_size: int) -> LiquidLayer:
        """The layer of ``--liquid-backbone`` with ``--liquid-units`` state units."""
        return cls(
            input_size,
            cfg.liquid_units,
            backbone=cfg.liquid_backbone,
            backbone_units=cfg.liquid_backbone_units,
            ode_unfolds=cfg.ltc_ode_unfolds,
            cfc_impl=cfg.cfc_impl,
        )

    def extra_repr(self) -> str:
        return f"{self.input_size} -> {self.hidden_size}, backbone={self.backbone}, fused={self.fused}"

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"liquid layer expects input (batch, length, {self.input_size}), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if h0 is not None and tuple(h0.shape) != (b, self.hidden_size):
            raise ValueError(
                f"liquid layer expects h0 (batch, units) = ({b}, {self.hidden_size}), got {tuple(h0.shape)}"
            )
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dt)
            h = torch.zeros(b, self.hidden_size, dtype=dt, device=x.device) if h0 is None else h0.to(dt)
            y, h_last = self._run(xs, h)
        return y.to(x.dtype), h_last

    def _run(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        cell = self.cell
        if isinstance(cell, LTCCell):
            return ltc_sequence(cell, x, h0) if self.fused else ltc_sequence_ref(cell, x, h0)
        if not self.fused:
            return cfc_sequence_ref(cell, x, h0)
        if cfc_fusable(cell):
            return cfc_sequence_fused(cell, x, h0, impl=self.cfc_impl)
        return cfc_sequence(cell, x, h0)
