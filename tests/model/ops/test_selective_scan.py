"""Selective scan: the oracle against hand-computed numbers; every fast path (numba, loop,
parallel, Triton under its interpreter, chunked) against the oracle in value and
gradient; the dispatcher; CUDA paths where CUDA is."""

from __future__ import annotations

import importlib
import itertools
import math
import re
import typing
from collections.abc import Callable
from functools import partial

import pytest
import torch

from model.ops import numba_support, triton_support
from model.ops.selective_scan import interface, numba_kernel, torch_scans
from model.config import ModelConfig
from model.ops.selective_scan import (
    SCAN_IMPLS,
    mamba_ssm_available,
    numba_available,
    resolve_scan_impl,
    selective_scan,
    selective_scan_chunked,
    selective_scan_loop,
    selective_scan_numba,
    selective_scan_parallel,
    selective_scan_ref,
    selective_scan_triton,
    triton_available,
)
from tests.helpers import assert_close

ScanFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]

# Gradients sum over batch and time, so they carry more rounding than values.
GRAD_SCALE = 4.0

ALL_OPTIONS = dict(D=True, z=True, delta_bias=True, delta_softplus=True, return_last_state=True)
NO_OPTIONS = dict(D=False, z=False, delta_bias=False, delta_softplus=False, return_last_state=False)


def make_inputs(
    b: int, e: int, n: int, l: int, B_kind: str, C_kind: str, *, groups: int = 2,
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
    D: bool = True, z: bool = True, delta_bias: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Leaf tensors for a scan: u, delta, z and time-varying B, C in ``dtype``; A, D,
    delta_bias and constant B, C are weights and stay fp32 (as mamba-ssm's kernel wants).
    delta and delta_bias are positive, A negative: a decaying scan."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def state_map(kind: str) -> torch.Tensor:
        shapes = {"constant": (e, n), "variable": (b, n, l), "grouped": (b, groups, n, l)}
        return randn(*shapes[kind]) if kind == "constant" else randn(*shapes[kind]).to(dtype)

    inputs = {
        "u": randn(b, e, l).to(dtype),
        "delta": (0.5 * torch.rand(b, e, l, generator=gen)).to(dtype),
        "A": -torch.exp(0.5 * randn(e, n)),
        "B": state_map(B_kind),
        "C": state_map(C_kind),
        "D": randn(e) if D else None,
        "z": randn(b, e, l).to(dtype) if z else None,
        "delta_bias": 0.5 * torch.rand(e, generator=gen) if delta_bias else None,
    }
    return {k: None if v is None else v.to(device).requires_grad_() for k, v in inputs.items()}


def run(
    fn: ScanFn, inputs: dict[str, torch.Tensor | None], seed: int = 1, **flags: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of ``fn`` and the gradients of every input under a seeded upstream grad
    (the same for every fn given the same shapes)."""
    result = fn(**inputs, **flags)
    outs = list(result) if isinstance(result, tuple) else [result]
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(outs, list(leaves.values()), upstream)
    return outs, dict(zip(leaves, grads))


def assert_matches_reference(
    fn: ScanFn, inputs: dict[str, torch.Tensor | None], scale: float = 1.0, **flags: bool
) -> None:
    outs, grads = run(fn, inputs, **flags)
    ref_outs, ref_grads = run(selective_scan_ref, inputs, **flags)
    dtype = inputs["u"].dtype
    for name, out, ref in zip(("out", "last_state"), outs, ref_outs):
        assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
        assert_close(out, ref, dtype=dtype, scale=scale, msg=name)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name}: dtype {grad.dtype}"
        assert_close(grad, ref_grads[name], dtype=dtype, scale=scale * GRAD_SCALE, msg=f"d{name}")


def split_options(options: dict[str, bool]) -> tuple[dict[str, bool], dict[str, bool]]:
    """(which optional tensors to make, which flags to pass)."""
    tensors = {k: options[k] for k in ("D", "z", "delta_bias")}
    flags = {k: options[k] for k in ("delta_softplus", "return_last_state")}
    return tensors, flags


# ---------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------


def hand_example() -> dict[str, torch.Tensor]:
    """l=3, e=1, n=2, delta=1, A=log([1/2, 1/4]) so the decays are 1/2 and 1/4, B=[1, 2]."""
    return {
        "u": torch.tensor([[[1.0, 2.0, 3.0]]]),
        "delta": torch.ones(1, 1, 3),
        "A": torch.tensor([[math.log(0.5), math.log(0.25)]]),
        "B": torch.tensor([[1.0, 2.0]]),
    }


def test_reference_matches_hand_computation_with_constant_B_and_C():
    # x1 = [1, 2]; x2 = [1/2 + 2, 2/4 + 4] = [2.5, 4.5]; x3 = [1.25 + 3, 1.125 + 6] = [4.25, 7.125]
    # y = x . [1, 1] = [3, 7, 11.375]; out = y + 0.5 u = [3.5, 8, 12.875]
    ex = hand_example()
    out, last = selective_scan_ref(
        **ex, C=torch.tensor([[1.0, 1.0]]), D=torch.tensor([0.5]), return_last_state=True
    )
    assert_close(out, torch.tensor([[[3.5, 8.0, 12.875]]]), msg="out")
    assert_close(last, torch.tensor([[[4.25, 7.125]]]), msg="last state")


def test_reference_matches_hand_computation_with_variable_C_and_gate():
    # Same states; C_t = [1, 0], [0, 1], [1, 1] picks 1, 4.5, 11.375; z gates by silu(z).
    ex = hand_example()
    C = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])  # (b n l)
    z = torch.tensor([[[0.0, 1.0, -2.0]]])
    silu = [zz / (1.0 + math.exp(-zz)) for zz in (0.0, 1.0, -2.0)]
    expected = torch.tensor([[[1.0 * silu[0], 4.5 * silu[1], 11.375 * silu[2]]]])
    assert_close(selective_scan_ref(**ex, C=C, z=z), expected)


def test_reference_applies_delta_bias_then_softplus():
    # softplus(delta + bias) = 1 reproduces the delta=1 example exactly.
    ex = hand_example()
    inv_softplus_one = math.log(math.expm1(1.0))
    ex["delta"] = torch.full((1, 1, 3), 0.25)
    out = selective_scan_ref(
        **ex, C=torch.tensor([[1.0, 1.0]]),
        delta_bias=torch.tensor([inv_softplus_one - 0.25]), delta_softplus=True,
    )
    assert_close(out, torch.tensor([[[3.0, 7.0, 11.375]]]))


def test_reference_grouped_B_C_share_each_group_across_its_channels():
    inputs = make_inputs(2, 6, 3, 9, "grouped", "grouped", groups=3, D=False, z=False, delta_bias=False)
    out = selective_scan_ref(**inputs)
    for g in range(3):
        channels = slice(2 * g, 2 * g + 2)
        per_group = selective_scan_ref(
            inputs["u"][:, channels], inputs["delta"][:, channels], inputs["A"][channels],
            inputs["B"][:, g], inputs["C"][:, g],
        )
        assert_close(out[:, channels], per_group, msg=f"group {g}")


def test_reference_keeps_float64_for_gradcheck():
    inputs = {k: v.double() for k, v in hand_example().items()}
    assert selective_scan_ref(**inputs, C=torch.ones(1, 2, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------------------
# Loop and chunked against the oracle
# ---------------------------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not importable: pip install numba")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not importable: pip install lsnn[triton]")


def _loop_blocks(steps: int) -> Callable[[pytest.MonkeyPatch, int], None]:
    """The loop's time blocks set to ``steps`` steps for a state of b * e * n elements."""
    return lambda mp, state_elems: mp.setattr(torch_scans, "_BLOCK_ELEMS", steps * state_elems)


def _triton_interpreted(mp: pytest.MonkeyPatch, state_elems: int) -> None:
    """Triton's interpreter on the CPU, with chunks of 8 steps: chunk boundaries are
    crossed at l = 17 and 130, and the interpreter walks fewer padded steps.

    TRITON_INTERPRET is set at collection (tests/conftest.py) where CUDA is absent."""
    triton_scan = importlib.import_module("model.ops.selective_scan.triton_kernel")
    if not triton_support.interpreted():
        pytest.skip("Triton compiles in this process (TRITON_INTERPRET unset, or CUDA present): "
                    "the CUDA variants test the kernel")
    mp.setattr(triton_scan, "CHUNK", 8)


def _numba_blocks(mp: pytest.MonkeyPatch, channels: int, ln: int = 1) -> None:
    """The numba kernels' blocks at most ``channels`` wide: the forward's, and the
    backward's at length times state size ``ln`` (its width is its buffers' elements over
    l n; with one channel, any l n)."""
    mp.setattr(numba_kernel, "_FORWARD_BLOCK", channels)
    mp.setattr(numba_kernel, "_BLOCK_ELEMS", channels * ln)


# name -> (scan, set-up of its blocking). The loop is checked with its default time blocks
# (one block at these sizes) and with blocks of 1 and 3 steps, so state and adjoint are
# carried across block boundaries; numba with one channel a block (partial sums carried
# across blocks) and with three threads' partial sums, whatever the machine has.
IMPLS: dict[str, tuple[ScanFn, Callable[[pytest.MonkeyPatch, int], None] | None]] = {
    "numba": (selective_scan_numba, None),
    "numba_block1": (selective_scan_numba, lambda mp, _: _numba_blocks(mp, 1)),
    "numba_parts3": (selective_scan_numba, lambda mp, _: mp.setattr(numba_kernel, "threads", lambda k: min(k, 3))),
    "loop": (selective_scan_loop, None),
    "loop_block1": (selective_scan_loop, _loop_blocks(1)),
    "loop_block3": (selective_scan_loop, _loop_blocks(3)),
    "parallel": (selective_scan_parallel, None),
    "triton": (selective_scan_triton, _triton_interpreted),
    "chunked": (selective_scan_chunked, None),
    "chunked_5": (partial(selective_scan_chunked, chunk_size=5), None),
}
_MARKS = {name: [needs_numba] for name in IMPLS if name.startswith("numba")} | {"triton": [needs_triton]}


def impl_params(names: list[str]) -> list:
    """``names`` as parameters, each with the skip its library needs."""
    return [pytest.param(name, marks=_MARKS.get(name, [])) for name in names]


# The Triton interpreter takes seconds a scan: the default grid runs it at l in {1, 17}
# (and 130 below); every length runs under -m slow.
CPU_FAST = [name for name in IMPLS if name != "triton"]


@pytest.fixture
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., ScanFn]:
    """The scan named by the test's ``impl_name``, set up for a state of b * e * n elements."""
    fn, setup = IMPLS[request.getfixturevalue("impl_name")]

    def for_state(state_elems: int) -> ScanFn:
        if setup is not None:
            setup(monkeypatch, state_elems)
        return fn

    return for_state


# numba's blocking and partial sums are exercised at two lengths; every length under -m slow
_SHORT = {"numba_block1", "numba_parts3"}
GRID = [(name, l) for name in CPU_FAST for l in ((17, 130) if name in _SHORT else (1, 17, 64, 130))]
GRID += [("triton", 1), ("triton", 17)]


@pytest.mark.parametrize(
    ("impl_name", "l"), [pytest.param(name, l, marks=_MARKS.get(name, [])) for name, l in GRID]
)
@pytest.mark.parametrize("kind", ["variable", "constant", "grouped"])
@pytest.mark.parametrize("options", [ALL_OPTIONS, NO_OPTIONS], ids=["all_options", "no_options"])
def test_fast_scans_match_reference_in_value_and_gradient(impl, impl_name, l, kind, options):
    b, e, n = 2, 4, 3
    tensors, flags = split_options(options)
    inputs = make_inputs(b, e, n, l, kind, kind, seed=l, **tensors)
    assert_matches_reference(impl(b * e * n), inputs, **flags)


def _triton_long_cases() -> list:
    """l in {64, 130} x kinds x options for Triton; one case in the default suite, the rest
    under -m slow (seconds each in the interpreter)."""
    cases = []
    for l, kind, (options_id, options) in itertools.product(
        (64, 130), ("variable", "constant", "grouped"), (("all", ALL_OPTIONS), ("none", NO_OPTIONS))
    ):
        default = (l, kind, options_id) == (130, "grouped", "all")
        marks = [needs_triton] + ([] if default else [pytest.mark.slow])
        cases.append(pytest.param(l, kind, options, id=f"l{l}-{kind}-{options_id}", marks=marks))
    return cases


@pytest.mark.parametrize(("l", "kind", "options"), _triton_long_cases())
@pytest.mark.parametrize("impl_name", ["triton"])
def test_triton_matches_reference_across_many_chunks(impl, impl_name, l, kind, options):
    b, e, n = 2, 4, 3
    tensors, flags = split_options(options)
    inputs = make_inputs(b, e, n, l, kind, kind, seed=l, **tensors)
    assert_matches_reference(impl(b * e * n), inputs, **flags)


@pytest.mark.parametrize("impl_name", impl_params(["numba_block1", "loop_block3", "parallel", "triton", "chunked_5"]))
@pytest.mark.parametrize(
    ("B_kind", "C_kind"),
    [("constant", "variable"), ("variable", "grouped"), ("grouped", "constant")],
)
def test_fast_scans_match_reference_with_mixed_B_and_C_kinds(impl, impl_name, B_kind, C_kind):
    b, e, n = 2, 4, 3
    inputs = make_inputs(b, e, n, 11, B_kind, C_kind)
    assert_matches_reference(impl(b * e * n), inputs, delta_softplus=True, return_last_state=True)


@pytest.mark.parametrize("impl_name", impl_params(["numba", "loop_block3", "parallel", "triton", "chunked_5"]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["variable", "grouped"])
def test_low_precision_fast_scans_match_reference_on_the_same_inputs(impl, impl_name, dtype, kind):
    b, e, n = 2, 4, 3
    inputs = make_inputs(b, e, n, 33, kind, kind, dtype=dtype)
    assert_matches_reference(impl(b * e * n), inputs, delta_softplus=True, return_last_state=True)


def _mamba_views(b: int, e: int, n: int, l: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One leaf (b l 2e + e + 2n) and the scan's inputs as views of it, strided as a Mamba
    mixer passes them (u and z halves of in_proj's output, delta and B, C the projections'
    columns, all transposed to (b . l)): nothing contiguous but A, D and the bias."""
    gen = torch.Generator().manual_seed(seed)
    leaf = torch.randn(b, l, 3 * e + 2 * n, generator=gen).requires_grad_()
    cols = leaf.transpose(1, 2)  # (b 3e+2n l)
    u, z, delta, B, C = cols.split([e, e, e, n, n], dim=1)
    inputs = {"u": u, "delta": delta, "A": -torch.exp(0.5 * torch.randn(e, n, generator=gen)), "B": B, "C": C,
              "D": torch.randn(e, generator=gen), "z": z, "delta_bias": torch.rand(e, generator=gen)}
    assert not any(inputs[k].is_contiguous() for k in ("u", "delta", "B", "C", "z"))
    return leaf, inputs


@pytest.mark.parametrize("impl_name", impl_params(["numba", "loop", "parallel", "triton", "chunked"]))
def test_fast_scans_read_inputs_at_any_strides(impl, impl_name):
    """The layouts the Mamba mixer hands over without copies: the Triton kernel reads every
    input through its strides, so a stride taken for a contiguous one would show here."""
    b, e, n, l = 2, 4, 3, 17
    results = []
    for fn in (impl(b * e * n), selective_scan_ref):
        leaf, inputs = _mamba_views(b, e, n, l)
        out, last = fn(**inputs, delta_softplus=True, return_last_state=True)
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen)).sum() + (last * torch.randn(last.shape, generator=gen)).sum()
        results.append((out, last, torch.autograd.grad(loss, leaf)[0]))
    for name, got, want in zip(("out", "last", "dleaf"), *results):
        assert_close(got, want, dtype=torch.float32, scale=GRAD_SCALE if name == "dleaf" else 1.0, msg=name)


@pytest.mark.parametrize("impl_name", impl_params(["numba", "loop", "parallel", "triton"]))
@pytest.mark.parametrize(("low", "high"), [(-24.0, -17.0), (10.0, 40.0)], ids=["tail", "threshold"])
def test_fast_scans_softplus_is_torchs_at_extreme_deltas(impl, impl_name, low, high):
    """softplus(delta) where exp(delta) is below fp32's epsilon next to 1, so that a naive
    log(1 + exp(delta)) rounds dt to 0 (u scaled up so the state, all dt u B, is of order
    one), and across softplus's threshold (delta > 20 gives delta)."""
    b, e, n, l = 1, 3, 2, 16
    inputs = make_inputs(b, e, n, l, "variable", "variable", D=False, z=False, delta_bias=False)
    with torch.no_grad():
        inputs["delta"].copy_(torch.linspace(low, high, b * e * l).reshape(b, e, l))
        if high < 0:
            inputs["u"].mul_(1e8)
        inputs["A"].mul_(0.01)  # a decay that survives dt = 40
    assert_matches_reference(impl(b * e * n), inputs, delta_softplus=True, return_last_state=True)


# Every option alone, all of them, none of them.
WIDE_OPTIONS = [NO_OPTIONS, ALL_OPTIONS] + [{**NO_OPTIONS, k: True} for k in ALL_OPTIONS]


@pytest.mark.slow
@pytest.mark.parametrize("impl_name", impl_params(list(IMPLS)))
@pytest.mark.parametrize("l", [1, 2, 63, 65, 300])
@pytest.mark.parametrize("B_kind", ["variable", "constant", "grouped"])
@pytest.mark.parametrize("C_kind", ["variable", "constant", "grouped"])
@pytest.mark.parametrize("options", WIDE_OPTIONS, ids=lambda o: "+".join(k for k, v in o.items() if v) or "none")
def test_fast_scans_match_reference_over_the_wide_grid(impl, impl_name, l, B_kind, C_kind, options):
    b, e, n = 3, 8, 5
    tensors, flags = split_options(options)
    inputs = make_inputs(b, e, n, l, B_kind, C_kind, groups=4, seed=l, **tensors)
    assert_matches_reference(impl(b * e * n), inputs, **flags)


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        pytest.param("numba", selective_scan_numba, marks=needs_numba),
        ("loop", selective_scan_loop),
        ("parallel", selective_scan_parallel),
        ("chunked", partial(selective_scan_chunked, chunk_size=3)),
    ],
)
@pytest.mark.parametrize(("B_kind", "C_kind"), [("grouped", "variable"), ("constant", "grouped")])
def test_fast_scan_gradients_pass_float64_gradcheck(monkeypatch, name, fn, B_kind, C_kind):
    monkeypatch.setattr(torch_scans, "_BLOCK_ELEMS", 2 * 2 * 4 * 2)  # loop: blocks of 2 steps
    _numba_blocks(monkeypatch, 3, ln=7 * 2)  # numba: blocks of 3 channels
    inputs = make_inputs(2, 4, 2, 7, B_kind, C_kind)
    args = [v.detach().double().requires_grad_() for v in inputs.values()]

    def scan(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(*tensors, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(scan, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("chunked", selective_scan_chunked),
        ("parallel", selective_scan_parallel),
        pytest.param("numba", selective_scan_numba, marks=needs_numba),
    ],
)
@pytest.mark.parametrize(
    ("regime", "A_scale", "delta_scale"),
    [("slow_decay", 0.01, 0.05), ("fast_decay", 16.0, 4.0)],
)
def test_long_sequence_fast_scans_stay_finite_and_match_loop(name, fn, regime, A_scale, delta_scale):
    # fast_decay: within a chunk the cumulative log-decay reaches about -4000. Computing the
    # decay between s and t as exp(S_t) * exp(-S_s) would give inf * 0 = NaN there; the
    # parallel scan's products of 2048 decays underflow to 0, which must stay harmless.
    b, e, n, l = 1, 8, 4, 2048
    inputs = make_inputs(b, e, n, l, "variable", "variable", D=False, z=False, delta_bias=False)
    with torch.no_grad():
        inputs["A"].mul_(A_scale / inputs["A"].abs().max())
        inputs["delta"].mul_(delta_scale / 0.5)
    fast, fast_grads = run(fn, inputs, return_last_state=True)
    loop, loop_grads = run(selective_scan_loop, inputs, return_last_state=True)
    for part, a, b_ in [("out", fast[0], loop[0]), ("last", fast[1], loop[1])]:
        assert a.isfinite().all(), f"{regime}: {name} {part} is not finite"
        assert_close(a, b_, scale=4, msg=f"{regime} {part}")
    # The gradients sum 2048 steps' terms into results from about 1e3 down to 0.05; fp32
    # rounding alone leaves errors of ~1e-4 on the small ones, in both fp32 scans, which a
    # vectorised sum's order (so the CPU's vector width) moves. So each is measured
    # against the loop in fp64, and the fast scan must be about as accurate as the fp32
    # loop: within 8x its error (numba's is below the loop's; the parallel scan's tree of
    # products rounds about 4x the loop's here; a wrong gradient is off by far more).
    _, exact_grads = run(selective_scan_loop, {k: None if v is None else v.double() for k, v in inputs.items()},
                         return_last_state=True)
    for part, grad in fast_grads.items():
        assert grad.isfinite().all(), f"{regime}: {name} d{part} is not finite"
        exact = exact_grads[part]
        fast_err, loop_err = (grad.double() - exact).abs().max(), (loop_grads[part].double() - exact).abs().max()
        floor = 1e-6 * exact.abs().max()  # fp32's epsilon (1.2e-7) on the largest term, with room
        assert fast_err <= 8 * loop_err + floor, (
            f"{regime} d{part}: {name}'s max error {fast_err:.3g} against fp64, the fp32 loop's {loop_err:.3g}")


@pytest.mark.parametrize(
    "fn",
    [selective_scan_loop, selective_scan_parallel, pytest.param(selective_scan_numba, marks=needs_numba)],
    ids=["loop", "parallel", "numba"],
)
def test_gradient_reaches_inputs_through_the_last_state_only(fn):
    inputs = make_inputs(1, 2, 2, 5, "variable", "variable", D=False, z=False, delta_bias=False)
    _, last = fn(**inputs, return_last_state=True)
    (du,) = torch.autograd.grad(last.sum(), [inputs["u"]])
    _, ref_last = selective_scan_ref(**inputs, return_last_state=True)
    (ref_du,) = torch.autograd.grad(ref_last.sum(), [inputs["u"]])
    assert du.abs().sum() > 0
    assert_close(du, ref_du)


# ---------------------------------------------------------------------------------------
# Argument checks and dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [selective_scan_ref, selective_scan_numba, selective_scan_loop, selective_scan_parallel,
     selective_scan_triton, selective_scan_chunked],
)
def test_mismatched_shapes_are_rejected_naming_them(fn):
    inputs = make_inputs(2, 6, 3, 5, "grouped", "variable", groups=4)  # 6 channels, 4 groups
    with pytest.raises(ValueError, match=r"B \(2, 4, 3, 5\) fits none of"):
        fn(**inputs)


@pytest.mark.parametrize(("name", "shape"), [("D", (5,)), ("z", (2, 6, 4)), ("delta_bias", (1,))])
def test_optional_tensors_of_the_wrong_shape_are_rejected(name, shape):
    inputs = make_inputs(2, 6, 3, 5, "variable", "variable")
    inputs[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"{name} must be .* got {re.escape(str(shape))}"):
        selective_scan(**inputs)


def test_complex_A_is_rejected():
    inputs = make_inputs(1, 2, 2, 3, "variable", "variable")
    inputs["A"] = torch.complex(inputs["A"].detach(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="complex A is not supported"):
        selective_scan(**inputs, impl="loop")


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        selective_scan_chunked(**make_inputs(1, 2, 2, 3, "variable", "variable"), chunk_size=0)


def test_unknown_impl_raises_listing_the_valid_ones():
    u = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="unknown selective-scan implementation 'fast'") as err:
        resolve_scan_impl(u, "fast")
    for name in SCAN_IMPLS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="'fast'"):
        selective_scan(**make_inputs(1, 2, 2, 3, "variable", "variable"), impl="fast")


def test_cuda_impl_on_cpu_tensors_raises_saying_how_to_fix():
    inputs = make_inputs(1, 2, 2, 3, "variable", "variable")
    with pytest.raises(ValueError) as err:
        selective_scan(**inputs, impl="cuda")
    message = str(err.value)
    for part in ("--scan-impl cuda", "cpu", "pip install lsnn[cuda]", "--scan-impl loop"):
        assert part in message, f"{part!r} missing from: {message}"


def test_auto_on_cpu_resolves_to_numba_else_loop(monkeypatch):
    expected = "numba" if numba_available() else "loop"
    assert resolve_scan_impl(torch.zeros(1, 2, 3), "auto") == expected
    monkeypatch.setattr(interface, "numba_available", lambda: False)
    assert resolve_scan_impl(torch.zeros(1, 2, 3), "auto") == "loop"


def test_config_offers_exactly_the_scan_impls():
    hint = typing.get_type_hints(ModelConfig)["scan_impl"]
    assert typing.get_args(hint) == SCAN_IMPLS
    for name in SCAN_IMPLS:
        assert ModelConfig(scan_impl=name).scan_impl == name


def test_numba_impl_without_numba_raises_saying_how_to_fix(monkeypatch):
    monkeypatch.setattr(interface, "numba_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs numba.*pip install numba.*--scan-impl loop"):
        resolve_scan_impl(torch.zeros(1, 2, 3), "numba")


@needs_triton
def test_triton_impl_on_cpu_without_the_interpreter_raises_saying_how_to_fix(monkeypatch):
    monkeypatch.setattr(triton_support, "interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"--scan-impl triton runs on CUDA.*TRITON_INTERPRET=1.*numba or loop"):
        resolve_scan_impl(torch.zeros(1, 2, 3), "triton")


def test_triton_impl_without_triton_raises_saying_how_to_fix(monkeypatch):
    monkeypatch.setattr(interface, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton.*pip install lsnn\[triton\].*--scan-impl parallel"):
        resolve_scan_impl(torch.zeros(1, 2, 3), "triton")


@pytest.mark.parametrize("impl_name", impl_params(["numba", "loop", "parallel", "chunked", "ref"]))
def test_dispatcher_runs_the_named_impl(impl_name):
    direct = {"numba": selective_scan_numba, "loop": selective_scan_loop, "parallel": selective_scan_parallel,
              "chunked": selective_scan_chunked, "ref": selective_scan_ref}
    inputs = make_inputs(2, 4, 3, 9, "variable", "grouped")
    via, via_last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl=impl_name)
    out, last = direct[impl_name](**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(via, out) and torch.equal(via_last, last)


def test_auto_dispatch_on_cpu_equals_the_resolved_impl():
    inputs = make_inputs(2, 4, 3, 9, "variable", "variable")
    expected = selective_scan_numba if numba_available() else selective_scan_loop
    assert torch.equal(selective_scan(**inputs), expected(**inputs))


# ---------------------------------------------------------------------------------------
# CUDA (skipped, with the reason, where CUDA is absent)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_auto_on_cuda_picks_mamba_ssm_else_triton_else_parallel(monkeypatch):
    expected = "cuda" if mamba_ssm_available() else "triton" if triton_available() else "parallel"
    u = torch.zeros(1, 2, 3, device="cuda")
    assert resolve_scan_impl(u, "auto") == expected
    monkeypatch.setattr(interface, "mamba_ssm_available", lambda: False)
    monkeypatch.setattr(interface, "triton_available", lambda: False)
    assert resolve_scan_impl(u, "auto") == "parallel"


@pytest.mark.gpu
def test_numba_impl_on_cuda_tensors_raises_saying_how_to_fix():
    with pytest.raises(ValueError, match=r"--scan-impl numba runs on the CPU.*triton or parallel"):
        resolve_scan_impl(torch.zeros(1, 2, 3, device="cuda"), "numba")


@pytest.mark.gpu
def test_cuda_impl_without_mamba_ssm_raises_saying_how_to_fix(monkeypatch):
    monkeypatch.setattr(interface, "mamba_ssm_available", lambda: False)
    with pytest.raises(ValueError, match=r"cannot be imported.*pip install lsnn\[cuda\]"):
        resolve_scan_impl(torch.zeros(1, 2, 3, device="cuda"), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fn",
    [selective_scan_chunked, selective_scan_parallel, pytest.param(selective_scan_triton, marks=needs_triton)],
    ids=["chunked", "parallel", "triton"],
)
@pytest.mark.parametrize("l", [1, 17, 130, 512])
@pytest.mark.parametrize("kind", ["variable", "constant", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_torch_and_triton_scans_on_cuda_match_reference(exact_fp32_cuda, fn, l, kind, dtype):
    inputs = make_inputs(2, 8, 4, l, kind, kind, dtype=dtype, device="cuda")
    assert_matches_reference(fn, inputs, delta_softplus=True, return_last_state=True)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("b", "e", "n", "l"), [(4, 512, 16, 256), (2, 96, 32, 1000)])
def test_triton_on_cuda_matches_reference_at_model_sizes(exact_fp32_cuda, b, e, n, l):
    # many programs, several chunks, a d_state of 32, a length that is not a multiple of the chunk
    inputs = make_inputs(b, e, n, l, "variable", "variable", dtype=torch.float32, device="cuda")
    assert_matches_reference(selective_scan_triton, inputs, scale=4.0, delta_softplus=True, return_last_state=True)


@pytest.mark.gpu
@pytest.mark.parametrize("l", [1, 17, 130, 512])
@pytest.mark.parametrize("kind", ["variable", "constant", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(exact_fp32_cuda, l, kind, dtype):
    # The kernel does not propagate a gradient through the last state (mamba-ssm documents
    # this), so the last state is compared in value only and gets no upstream gradient.
    # Its parallel scan sums in another order than the sequential oracle: wider tolerance
    # (about mamba-ssm's own test tolerances).
    if not mamba_ssm_available():
        pytest.skip("mamba-ssm not importable: pip install lsnn[cuda]")
    scale = 20.0 if dtype == torch.float32 else 2.0
    inputs = make_inputs(2, 8, 4, l, kind, kind, dtype=dtype, device="cuda")
    flags = dict(delta_softplus=True)
    out, last = selective_scan(**inputs, **flags, return_last_state=True, impl="cuda")
    ref, ref_last = selective_scan_ref(**inputs, **flags, return_last_state=True)
    assert_close(out, ref, dtype=dtype, scale=scale, msg="out")
    assert_close(last, ref_last, dtype=dtype, scale=scale, msg="last state")
    kernel = partial(selective_scan, impl="cuda")
    assert_matches_reference(kernel, inputs, scale=scale, **flags)


# ---------------------------------------------------------------------------------------
# Non-finite inputs
# ---------------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("where", ["u", "delta", "B", "C", "z"])
def test_numba_scan_keeps_a_nan_input_visible_in_output_and_gradients(where):
    """The kernels compile with reassociation but not fastmath's no-NaN assumption: a NaN
    that enters the scan leaves it, in the output and in every gradient the reference's
    autograd makes NaN, for the guard to see."""
    inputs = make_inputs(1, 4, 3, 6, "variable", "variable")
    with torch.no_grad():
        inputs[where].view(-1)[2] = float("nan")
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    results = {}
    for name, fn in [("ref", selective_scan_ref), ("numba", selective_scan_numba)]:
        out = fn(**inputs)
        grads = torch.autograd.grad(out.sum(), [inputs[k] for k in leaves])
        results[name] = [out.isnan().any().item()] + [g.isnan().any().item() for g in grads]
    assert results["ref"][0], "the reference hides the NaN: the test's premise is wrong"
    assert results["numba"] == results["ref"], f"NaN in (out, {', '.join('d' + k for k in leaves)})"


@needs_numba
@pytest.mark.parametrize(("B_kind", "C_kind"), [("variable", "variable"), ("grouped", "constant")])
def test_numba_forward_gives_the_same_output_and_state_at_any_block_width(monkeypatch, B_kind, C_kind):
    """The forward's blocks are as wide as allowed (it keeps only their states) while the
    backward's are narrower: each channel's recurrence is the same arithmetic whatever
    block holds it, so the width changes nothing, bit for bit."""
    inputs = make_inputs(2, 12, 3, 9, B_kind, C_kind)
    results = []
    for width in (1, 5, numba_kernel._FORWARD_BLOCK):
        monkeypatch.setattr(numba_kernel, "_FORWARD_BLOCK", width)
        with torch.no_grad():
            results.append(selective_scan_numba(**inputs, delta_softplus=True, return_last_state=True))
    for out, last in results[:-1]:
        assert torch.equal(out, results[-1][0]) and torch.equal(last, results[-1][1])


@needs_numba
@pytest.mark.parametrize(("group", "threads"), [(256, 2), (256, 3), (64, 4), (64, 8)])
def test_numba_work_items_cover_every_channel_once_and_give_each_thread_one(monkeypatch, group, threads):
    """One sequence of 256 channels, blocks up to 256 wide: narrower blocks, so that every
    thread gets an item, each within one run of channels sharing B's and C's rows."""
    monkeypatch.setattr(numba_kernel, "threads", lambda k: min(k, threads))
    e = 256
    rows = numba_kernel.Rows(torch.zeros(e // group, 5, 3), batch=e // group, group=group, step=1)
    items, widest = numba_kernel._items(1, e, 256, rows, rows)
    assert len(items) >= threads
    covered = sorted(c for _, c0, c1 in items for c in range(c0, c1))
    assert covered == list(range(e))
    assert all(c0 // group == (c1 - 1) // group for _, c0, c1 in items)
    assert widest == max(c1 - c0 for _, c0, c1 in items)


# ---------------------------------------------------------------------------------------
# The kernels as registered ops
# ---------------------------------------------------------------------------------------


def _op_inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, e, n, l = 2, 4, 3, 10
    B = {"constant": (e, n), "variable": (b, n, l), "grouped": (b, 2, n, l)}[kind]
    return [torch.randn(b, e, l, generator=g), torch.rand(b, e, l, generator=g) * 0.5,
            -torch.rand(e, n, generator=g) - 0.5, torch.randn(*B, generator=g), torch.randn(*B, generator=g)]


@needs_triton
@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("optional", [True, False])
def test_the_triton_scan_is_one_registered_op_with_a_fake_and_a_backward(kind, optional):
    importlib.import_module("model.ops.selective_scan.triton_kernel")  # registers the op
    u, delta, A, B, C = (t.requires_grad_() for t in _op_inputs(kind))
    e = u.shape[1]
    extra = [torch.randn(e, requires_grad=True), torch.randn_like(u, requires_grad=True),
             torch.randn(e, requires_grad=True)] if optional else [None, None, None]
    torch.library.opcheck(torch.ops.lsnn.selective_scan_triton.default, (u, delta, A, B, C, *extra, True, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_numba
@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("optional", [True, False])
def test_the_numba_scan_is_one_registered_op_with_a_fake_and_a_backward(kind, optional):
    u, delta, A, B, C = (t.requires_grad_() for t in _op_inputs(kind, seed=1))
    e = u.shape[1]
    extra = [torch.randn(e, requires_grad=True), torch.randn_like(u, requires_grad=True),
             torch.randn(e, requires_grad=True)] if optional else [None, None, None]
    torch.library.opcheck(torch.ops.lsnn.selective_scan_numba.default, (u, delta, A, B, C, *extra, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", [pytest.param("numba", marks=needs_numba), pytest.param("triton", marks=needs_triton)])
def test_a_traced_scan_is_one_node_each_way_at_any_length(impl):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(u, delta, A, B, C):
        y = selective_scan(u, delta, A, B, C, delta_softplus=True, impl=impl)
        return torch.autograd.grad(y.sum(), (u, delta, A, B, C))

    graphs = {}
    for l in (5, 13):
        g = torch.Generator().manual_seed(l)
        args = [torch.randn(2, 4, l, generator=g), torch.randn(2, 4, l, generator=g), -torch.rand(4, 3, generator=g),
                torch.randn(2, 3, l, generator=g), torch.randn(2, 3, l, generator=g)]
        graph = make_fx(step)(*(a.requires_grad_() for a in args)).graph
        graphs[l] = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert sum("lsnn.selective_scan" in t for t in graphs[l]) == 2, graphs[l]
    assert graphs[5] == graphs[13], "nothing in the graph grows with the length"
