"""Fuzz of the dilated gated convolution: the compiled op against the reference over random
shapes (empty batch, empty and one-step sequences, odd and zero channel counts, dilations past
both ends), masks, residual modes, dtypes, strided inputs and NaN/±inf in every input, outputs
and gradients; inputs never mutated; and one wrong argument at a time to the ops themselves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kxops
from kxops import _ext
from tests.utils import TOLERANCES, run_isolated

pytestmark = pytest.mark.fuzz

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _skip_without_kernel():
    if not _ext.has_kernel("gated_conv", torch.device("cpu")):
        pytest.skip("no compiled kxops::gated_conv kernel for cpu")


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["identity", "projection", "no_residual"]))
    out = draw(st.integers(1, 19))  # 19: two 8-lane fp32 vectors and a tail on CPU
    cin = out if mode == "identity" else draw(st.integers(0, 9))
    return dict(
        batch=draw(st.integers(0, 3)), time=draw(st.sampled_from([0, 1, 2, 5, 9])), cin=cin,
        out=out, k=draw(st.sampled_from([1, 3, 5])), dilation=draw(st.integers(1, 12)),
        mode=mode, mask=draw(st.sampled_from([None, "bool", "float"])),
        bias=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        strided=draw(st.booleans()), dropout=draw(st.booleans()),
        special=draw(st.sampled_from([None, "x", "weight", "bias"])),
        value=draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])),
        where=draw(st.integers(0, 2**20)), seed=draw(st.integers(0, 2**16)))


def make(case):
    """The inputs of one case (leaves that require grad) and the call's keyword arguments."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, batch, time, cin, out = (case[k] for k in ("dtype", "batch", "time", "cin", "out"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(batch, cin, time).transpose(1, 2) if case["strided"] else randn(batch, time, cin)
    weight = randn(2 * out, cin, case["k"], scale=1 / max(1, cin * case["k"]) ** 0.5)
    bias = randn(2 * out, scale=0.5) if case["bias"] else None
    rw = rb = None
    if case["mode"] == "projection":
        rw = randn(out, cin, 1, scale=1 / max(1, cin) ** 0.5)
        rb = randn(out, scale=0.5) if case["bias"] else None
    target = dict(x=x, weight=weight, bias=bias)[case["special"]] if case["special"] else None
    if target is not None and target.numel():
        index = torch.unravel_index(torch.tensor(case["where"] % target.numel()), target.shape)
        target[index] = case["value"]
    mask = None
    if case["mask"] is not None:
        mask = torch.rand(batch, time, generator=gen) > 0.3
        mask = mask if case["mask"] == "bool" else mask * torch.rand(batch, time, generator=gen)
    leaves = [t.requires_grad_() for t in (x, weight, bias, rw, rb) if t is not None]
    kwargs = dict(dilation=case["dilation"], drop_gate=0.4 if case["dropout"] else 0.0,
                  training=case["dropout"], residual=case["mode"] != "no_residual",
                  residual_weight=rw, residual_bias=rb)
    return x, weight, bias, mask, kwargs, leaves


def run(fn, x, weight, bias, mask, kwargs, leaves, grad_seed):
    torch.manual_seed(grad_seed)  # the same gate-dropout draw for both
    y = fn(x, weight, bias, mask, **kwargs)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    # An unused input (empty shapes) has no gradient in the reference, a zero one in the op.
    return [y, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))]


def compare(got, want, exact, dtype, loose_nan):
    """NaN exactly where the reference has NaN (with loose_nan: at least there); the other
    values equal within the dtype's rule."""
    want_nan = want.isnan() if dtype in (torch.float64, torch.float32) else exact.isnan()
    if loose_nan:
        assert got.isnan()[want_nan].all()
        keep = ~got.isnan() & ~want_nan
    else:
        assert torch.equal(got.isnan(), want_nan), (got, want)
        keep = ~want_nan
    got, want, exact = got[keep], want[keep], exact[keep]
    if dtype in (torch.float64, torch.float32):
        atol, rtol = TOLERANCES[dtype]
        scale = want.abs().max().item() if want.isfinite().any() else 1.0
        # Sums of many terms: the tolerance is scaled to the largest element of the tensor.
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, scale))
        return
    # Infinities where the fp64 result, rounded to the dtype, has them; the finite values by
    # the fp16/bf16 rule: at most twice the error of the reference run at that precision.
    exact_rounded = exact.to(dtype).double()
    infinite = got.isinf() | exact_rounded.isinf()
    assert torch.equal(got[infinite].double(), exact_rounded[infinite])
    finite = ~infinite & want.isfinite()
    if finite.any():
        atol, rtol = TOLERANCES[dtype]
        ours = (got[finite].double() - exact[finite]).abs().max().item()
        theirs = (want[finite].double() - exact[finite]).abs().max().item()
        floor = atol + rtol * exact[finite].abs().max().item()
        assert ours <= 2 * theirs + 4 * floor, (ours, theirs, floor)


@given(case=cases())
def test_kernel_matches_reference(case):
    _skip_without_kernel()
    x, weight, bias, mask, kwargs, leaves = make(case)
    before = [t.detach().clone() for t in (x, weight, bias, mask) if t is not None]
    ours = run(kxops.dilated_gated_conv1d, x, weight, bias, mask, kwargs, leaves, case["seed"])
    theirs = run(kxops.reference.dilated_gated_conv1d, x, weight, bias, mask, kwargs, leaves,
                 case["seed"])
    upcast = [t.detach().double().requires_grad_() for t in leaves]
    by_name = dict(zip([n for n, t in (("x", x), ("weight", weight), ("bias", bias),
                                       ("rw", kwargs["residual_weight"]),
                                       ("rb", kwargs["residual_bias"])) if t is not None],
                       upcast))
    exact_kwargs = dict(kwargs, residual_weight=by_name.get("rw"), residual_bias=by_name.get("rb"))
    exact = run(kxops.reference.dilated_gated_conv1d, by_name["x"], by_name["weight"],
                by_name.get("bias"), mask, exact_kwargs, upcast, case["seed"])
    for i, (got, want, ex) in enumerate(zip(ours, theirs, exact)):
        assert got.shape == want.shape and got.dtype == want.dtype
        # A gradient with inf/NaN in x or weight may be NaN where the reference's is not: the
        # op's backward GEMMs run over all rows, the zero gradient rows between sequences
        # included, and 0 * inf is NaN.
        loose = i > 0 and case["special"] in ("x", "weight")
        compare(got, want, ex, case["dtype"], loose_nan=loose)
    after = [t.detach() for t in (x, weight, bias, mask) if t is not None]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --- one wrong argument at a time, to the ops themselves, in a subprocess -------------------

_WRONG_SCRIPT = """
import sys, traceback, torch
from hypothesis import given, settings, strategies as st
import kxops

ARGS = ("x", "weight", "bias", "mask", "gate_keep", "residual_weight", "residual_bias",
        "grad_y", "z")

@st.composite
def wrong(draw):
    b, t, cin, out, k = (draw(st.integers(0, 3)), draw(st.integers(0, 6)),
                         draw(st.integers(1, 5)), draw(st.integers(1, 5)),
                         draw(st.sampled_from([1, 3, 5])))
    name = draw(st.sampled_from(ARGS + ("dilation", "drop_gate", "residual")))
    how = draw(st.sampled_from(["size", "dtype", "rank"]))
    return (b, t, cin, out, k, name, how, draw(st.integers(0, 2)),
            draw(st.sampled_from([-1, 1, 2])), draw(st.booleans()))

@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)
@given(wrong())
def check(case):
    b, t, cin, out, k, name, how, axis, delta, backward = case
    backward = name in ("grad_y", "z") or backward and name != "bias"
    shapes = dict(x=(b, t, cin), weight=(2 * out, cin, k), bias=(2 * out,), mask=(b, t),
                  gate_keep=(b, t, out), residual_weight=(out, cin, 1), residual_bias=(out,),
                  grad_y=(b, t, out), z=(b, t, 2 * out))
    dtypes = {n: torch.float32 for n in shapes}
    dtypes["gate_keep"] = torch.bool
    scalars = dict(dilation=2, drop_gate=0.2, residual=True)  # residual_weight is always given
    expected = "ValueError"
    if name in shapes and how == "dtype":
        dtypes[name] = torch.float64 if name != "gate_keep" else torch.float32
        expected = "TypeError"
    elif name in shapes and how == "rank":
        shapes[name] += (1,)
    elif name in shapes:
        shape, i = list(shapes[name]), axis % len(shapes[name])
        if shape[i] + delta < 0 or name == "weight" and i == 2 and delta == 2:
            delta = 1  # not negative; an odd kernel size stays a valid one
        shape[i] += delta
        shapes[name] = tuple(shape)
    elif name == "dilation":
        scalars["dilation"] = {-1: 0, 1: -1, 2: -2**40}[delta]
    elif name == "drop_gate":
        scalars["drop_gate"] = {-1: -0.5, 1: 1.5, 2: float("nan")}[delta]
    else:
        scalars["residual"] = False
    a = {n: torch.randn(s).to(dtypes[n]) if dtypes[n] != torch.bool else torch.rand(s) > 0.5
         for n, s in shapes.items()}
    rest = (a["mask"], a["gate_keep"], a["residual_weight"], a["residual_bias"])
    try:
        if backward:
            torch.ops.kxops.gated_conv_backward(
                a["grad_y"], a["x"], a["z"], a["weight"], *rest, [True] * 5,
                *scalars.values())
        else:
            torch.ops.kxops.gated_conv(a["x"], a["weight"], a["bias"], *rest, *scalars.values())
    except Exception as e:
        assert type(e).__name__ == expected and str(e).startswith("kxops.gated_conv"), (
            case, repr(e))
        return
    raise AssertionError(("accepted", case))

check()
print("done")
"""


def test_wrong_argument_one_at_a_time():
    """Random valid shapes with one argument of the ops made wrong (a dim off by -1/+1/+2, an
    extra dim, the wrong dtype, a bad dilation, drop_gate or residual flag): always the named
    error of the right type, never a crash (hence the subprocess) or a result."""
    _skip_without_kernel()
    examples = settings.default.max_examples
    result = run_isolated(f"MAX_EXAMPLES = {examples}\n" + _WRONG_SCRIPT, timeout=600)
    assert result.returncode == 0 and "done" in result.stdout, (
        result.stdout[-3000:], result.stderr[-5000:])
