"""Fuzz of the AdaX / AdaX-W optimizers: random param shapes (empty, size 1, odd, 2-D, 4-D),
dtypes (complex included), layouts (strided, transposed, channels_last params; expanded and
transposed grads), flags and NaN/±inf in the grads. Every path (fused, foreach, capturable
foreach) gives the numbers of the per-param loop (torch.optim's single-tensor style), and the
user's grads are never modified."""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kxops
from kxops import _ext
from kxops.reference import adax as ref
from tests.utils import TOLERANCES

PATHS = {"foreach": dict(foreach=True), "capturable": dict(foreach=True, capturable=True)}
if _ext.has_kernel("adax_", torch.device("cpu")):
    PATHS["fused"] = dict(fused=True)
LOOP = dict(foreach=False, fused=False)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


@st.composite
def param_specs(draw):
    kind = draw(st.sampled_from(["empty", "one", "odd", "matrix", "4d"]))
    shape = {
        "empty": (0,),
        "one": (1,),
        "odd": (draw(st.integers(1, 40)) * 2 + 1,),
        "matrix": (draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        "4d": (2, 3, draw(st.integers(1, 4)), draw(st.integers(1, 4))),
    }[kind]
    layouts = ["contiguous", "strided"] + (["transposed"] if len(shape) >= 2 else []) + (
        ["channels_last"] if len(shape) == 4 else [])
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(layouts)),
        grad_layout=draw(st.sampled_from(["like_param", "contiguous", "expanded", "transposed"])),
        specials=draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), max_size=2)),
        seed=draw(st.integers(0, 2**16)),
    )


def _laid_out(shape, layout, generator, specials=()):
    """A random tensor of `shape` with `layout`; `specials` (NaN/inf) are written into its
    memory first, at positions drawn from `generator`."""
    if layout == "strided":
        base_shape = (*shape[:-1], 2 * shape[-1])
    elif layout == "transposed" and len(shape) >= 2:
        base_shape = (*shape[:-2], shape[-1], shape[-2])
    elif layout == "expanded":
        base_shape = (*shape[:-1], 1)
    else:
        base_shape = shape
    base = torch.randn(base_shape, generator=generator)
    flat = base.view(-1)
    for value in specials:
        if flat.numel():
            flat[torch.randint(flat.numel(), (), generator=generator)] = value
    if layout == "strided":
        return base[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        return base.transpose(-1, -2)
    if layout == "expanded":
        return base.expand(shape)
    if layout == "channels_last":
        return base.to(memory_format=torch.channels_last)
    return base


def build(spec):
    """(param values, grad) for one spec, the same each time."""
    generator = torch.Generator().manual_seed(spec["seed"])
    dtype = spec["dtype"]
    if dtype.is_complex:
        param = _laid_out(spec["shape"] + (2,), "contiguous", generator)
        grad = _laid_out(spec["shape"] + (2,), "contiguous", generator, spec["specials"])
        return torch.view_as_complex(param), torch.view_as_complex(grad)
    param = _laid_out(spec["shape"], spec["layout"], generator)
    grad_layout = spec["layout"] if spec["grad_layout"] == "like_param" else spec["grad_layout"]
    grad = _laid_out(spec["shape"], grad_layout, generator, spec["specials"])
    return param.to(dtype), grad.to(dtype)


def run(specs, cls, flags, *, lr, maximize, weight_decay, duplicate, steps=2):
    values = [build(spec) for spec in specs]
    params = [torch.nn.Parameter(value.clone()) for value, _ in values]
    # A parameter's layout must survive clone(): rebuild the strided ones as views.
    for i, spec in enumerate(specs):
        if spec["layout"] == "strided" and not spec["dtype"].is_complex:
            holder = torch.zeros(*values[i][0].shape[:-1], 2 * values[i][0].shape[-1],
                                 dtype=spec["dtype"])
            params[i] = holder[..., ::2].copy_(values[i][0]).requires_grad_()
    grads = [grad for _, grad in values]
    listed = params + params[:1] if duplicate else params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate parameters
        optimizer = cls(listed, lr=lr, maximize=maximize, weight_decay=weight_decay, **flags)
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return params, [optimizer.state[p] for p in params], grads


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def assert_same(got, want, dtype):
    atol, rtol = TOLERANCES[torch.float32 if dtype.is_complex else dtype]
    torch.testing.assert_close(_real(got), _real(want), atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.fuzz
@given(specs=st.lists(param_specs(), min_size=1, max_size=4),
       path=st.sampled_from(sorted(PATHS)),
       cls=st.sampled_from([kxops.optim.AdaX, kxops.optim.AdaXW]),
       maximize=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]),
       tensor_lr=st.booleans(),
       duplicate=st.booleans())
def test_every_path_matches_the_per_param_loop(specs, path, cls, maximize, weight_decay,
                                                tensor_lr, duplicate):
    lr = torch.tensor(1e-2, dtype=torch.float64) if tensor_lr else 1e-2
    kwargs = dict(lr=lr, maximize=maximize, weight_decay=weight_decay, duplicate=duplicate)
    params, states, grads = run(specs, cls, PATHS[path], **kwargs)
    grads_before = [build(spec)[1] for spec in specs]
    want_params, want_states, _ = run(specs, cls, LOOP, **kwargs)
    for spec, p, want, state, want_state in zip(specs, params, want_params, states,
                                                want_states):
        assert p.stride() == want.stride()
        assert_same(p.detach(), want.detach(), spec["dtype"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == ref.state_dtype(spec["dtype"])
            assert_same(state[key], want_state[key], state[key].dtype)
        assert state["step"].item() == want_state["step"].item()
    for grad, before in zip(grads, grads_before):
        torch.testing.assert_close(grad, before, atol=0, rtol=0, equal_nan=True)


@pytest.mark.fuzz
@given(log_step=st.floats(0, 12), beta2=st.sampled_from([1e-4, 1e-3, 1e-2, 0.5]),
       path=st.sampled_from([*sorted(PATHS), "loop"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_no_step_count_gives_nan_from_finite_inputs(log_step, beta2, path, dtype):
    """Whatever the step count, elements whose gradient has always been 0 stay put and the
    others stay finite."""
    p = torch.tensor([1.0, -1.0, 0.5, 2.0]).to(dtype)
    before = p.clone()
    g = torch.tensor([0.0, 0.0, 0.3, -0.2]).to(dtype)
    state = ref.state_dtype(dtype)
    m = torch.tensor([0.0, 0.0, 0.2, -0.1], dtype=state)
    v = torch.tensor([0.0, 0.0, 0.05, 0.02], dtype=state)
    step = torch.tensor(float(int(10 ** log_step)))
    kxops.adax.adax([p], [g], [m], [v], [step], lr=1e-3, beta1=0.9, beta2=beta2,
                    weight_decay=0.0, eps=1e-12, decoupled=True, maximize=False,
                    **(LOOP if path == "loop" else PATHS[path]))
    assert torch.isfinite(p).all() and torch.isfinite(m).all() and torch.isfinite(v).all()
    assert torch.equal(p[:2], before[:2])


def _decoded(param, state):
    scales = (state.get("exp_avg_scales"), state.get("exp_avg_sq_scales"))
    real = _real(param.detach())
    return ref.load_moments(real, state["exp_avg"], state["exp_avg_sq"], scales)


@pytest.mark.fuzz
@given(specs=st.lists(param_specs(), min_size=1, max_size=4),
       path=st.sampled_from(sorted(PATHS)),
       state_dtype=st.sampled_from([torch.bfloat16, torch.uint8]),
       stochastic=st.sampled_from([None, False, True]),
       maximize=st.booleans())
def test_compact_state_on_every_path_gives_the_loops_codes(specs, path, state_dtype,
                                                           stochastic, maximize):
    # Every layout, NaN/inf grads, complex and fp64 params (which keep fp64 state): the codes,
    # scales and seeds of the loop, bit for bit (AdaX-W: the params do not feed the moments).
    flags = dict(state_dtype=state_dtype, stochastic_rounding=stochastic)
    kwargs = dict(lr=1e-2, maximize=maximize, weight_decay=0.1, duplicate=False)
    torch.manual_seed(0)
    params, states, _ = run(specs, kxops.optim.AdaXW, dict(PATHS[path], **flags), **kwargs)
    torch.manual_seed(0)
    want_params, want_states, _ = run(specs, kxops.optim.AdaXW, dict(LOOP, **flags), **kwargs)
    for spec, p, want, state, want_state in zip(specs, params, want_params, states,
                                                want_states):
        assert state["exp_avg"].dtype == ref.state_dtype(spec["dtype"], state_dtype)
        assert state.get("rounding_seed") == want_state.get("rounding_seed")
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scales", "exp_avg_sq_scales"):
            if key in state and state[key].dtype in (*ref.COMPACT, torch.float32):
                a, b = _real(state[key]), _real(want_state[key])
                assert torch.equal(a.float().nan_to_num(7), b.float().nan_to_num(7)), key
        assert_same(p.detach(), want.detach(), spec["dtype"])
        for got, expected in zip(_decoded(p, state), _decoded(want, want_state)):
            if spec["dtype"] != torch.float64:  # decoded moments are finite or NaN as the loop's
                assert torch.equal(got.isnan(), expected.isnan())
