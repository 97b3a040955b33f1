"""AdaX / AdaX-W: the reference against the authors' recurrence, the foreach path against the
reference, the optimizer classes, GradScaler's protocol and bad inputs."""

import copy
import math
import re

import pytest
import torch

import kxops
from kxops import _ext
from kxops.adax import adax, resolve_path
from kxops.reference import adax as ref
from tests.utils import (
    assert_close,
    cuda_with_memory,
    dispatched_ops,
    needs_kernel,
    run_isolated,
    switched,
)

HYPER = dict(lr=1e-2, beta1=0.9, beta2=1e-4, weight_decay=0.05, eps=1e-8)


def authors_adax(param, grads, *, lr, beta1, beta2, weight_decay, eps, decoupled):
    """The authors' un-normalised AdaX: v = (1+b2) v + b2 g^2, p -= lr sqrt(B_t) m/(sqrt(v)+eps)."""
    p = param.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = (1 + beta2) * v + beta2 * g * g
        bias_correction = (1 + beta2) ** t - 1
        p = p - lr * math.sqrt(bias_correction) * m / (v.sqrt() + eps)
    return p


def gradient_at(p, t):
    """A deterministic gradient field that depends on the parameter (like a real loss)."""
    return torch.sin(3 * p + 0.1 * t) + 0.1 * p


@pytest.mark.parametrize("decoupled", [False, True])
def test_reference_follows_the_authors_recurrence_for_300_steps(decoupled):
    p0 = torch.randn(50, dtype=torch.float64)
    p, m, v, step = p0.clone(), torch.zeros(50, dtype=torch.float64), \
        torch.zeros(50, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    grads = []
    for t in range(300):
        grads.append(gradient_at(p, t))
        ref.adax([p], [grads[-1]], [m], [v], [step], decoupled=decoupled, maximize=False,
                 **HYPER)
    expected = authors_adax(p0, grads, decoupled=decoupled, **HYPER)
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-12)


def test_normalised_state_does_not_overflow_at_ten_million_steps():
    p = torch.ones(4)
    m, v = torch.zeros(4), torch.full((4,), 0.25)
    step = torch.tensor(1e7)
    ref.adax([p], [torch.full((4,), 0.5)], [m], [v], [step], lr=1e-3, beta1=0.9, beta2=1e-4,
             weight_decay=0.0, eps=1e-12, decoupled=True, maximize=False)
    assert torch.isfinite(v).all() and torch.isfinite(p).all()
    assert (1 - p).abs().min() > 1e-6  # the update does not vanish


def _states(params, state_dtype=None):
    return ([torch.zeros_like(p, dtype=state_dtype or ref.state_dtype(p.dtype)) for p in params],
            [torch.zeros_like(p, dtype=state_dtype or ref.state_dtype(p.dtype)) for p in params],
            [torch.zeros((), dtype=torch.float32) for _ in params])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_foreach_matches_for_loop(dtype, decoupled, maximize, capturable):
    shapes = [(3, 4), (7,), (1,), (2, 2, 2)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    grads_before = [g.clone() for g in grads]
    loop_params = [p.clone() for p in params]
    foreach_state, loop_state = _states(params), _states(params)
    for _ in range(3):
        adax(params, grads, *foreach_state, foreach=True, capturable=capturable,
             decoupled=decoupled, maximize=maximize, **HYPER)
        adax(loop_params, grads, *loop_state, foreach=False, decoupled=decoupled,
             maximize=maximize, **HYPER)
    for got, want in zip(params, loop_params):
        assert_close(got, want)
    for got, want in zip(foreach_state[1], loop_state[1]):
        assert got.dtype == ref.state_dtype(dtype)
        assert_close(got, want, dtype=got.dtype)
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_foreach_gives_the_for_loops_numbers_bit_for_bit(dtype, decoupled, maximize,
                                                         capturable):
    # The foreach path does the loop's operations in the loop's order (on CPU).
    torch.manual_seed(0)
    shapes = [(3, 4), (7,), (1,), (33000,)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    if dtype not in ref.LOW_PRECISION:
        params.append(torch.randn(5, dtype=torch.complex128).to(dtype.to_complex()))
    params[0][0, 0] = math.nan
    grads = [torch.randn_like(p) * 1e3 for p in params]
    grads[1].zero_()  # elements whose gradient has always been 0
    loop_params = [p.clone() for p in params]
    foreach_state, loop_state = _states(params), _states(params)
    lr = torch.tensor(HYPER["lr"]) if capturable else HYPER["lr"]
    flags = dict(decoupled=decoupled, maximize=maximize, grad_scale=torch.tensor(1024.0))
    for _ in range(3):
        adax(params, grads, *foreach_state, foreach=True, capturable=capturable,
             **dict(HYPER, lr=lr), **flags)
        adax(loop_params, grads, *loop_state, foreach=False, fused=False,
             **dict(HYPER, lr=lr), **flags)
    # Capturable forms 1/B_t on the device with torch's exp/expm1, the loop on the host with
    # Python's math: the two libraries may differ in float64's last bit (seen on an AVX-512
    # Intel CPU: torch's exp(-3 log1p(1e-4)) one ulp from math.exp), which reaches a float64
    # param as a few ulps of its scale (1); fp32 and lower-precision math never show it.
    ulps = 8 * torch.finfo(torch.float64).eps if capturable and dtype == torch.float64 else 0
    for got, want in zip(params + foreach_state[0] + foreach_state[1],
                         loop_params + loop_state[0] + loop_state[1]):
        torch.testing.assert_close(got, want, rtol=ulps, atol=ulps, equal_nan=True)


def test_grad_scale_and_found_inf():
    params = [torch.randn(5)]
    scaled = [torch.randn(5)]
    expected = [params[0].clone()]
    state, expected_state = _states(params), _states(params)
    adax(params, [scaled[0] * 1024], *state, grad_scale=torch.tensor(1024.0), decoupled=True,
         maximize=False, **HYPER)
    adax(expected, scaled, *expected_state, decoupled=True, maximize=False, **HYPER)
    assert_close(params[0], expected[0])
    before = params[0].clone()
    for foreach in (False, True):
        adax(params, [torch.full((5,), math.inf)], *state, found_inf=torch.tensor(1.0),
             foreach=foreach, decoupled=True, maximize=False, **HYPER)
    assert torch.equal(params[0], before) and state[2][0].item() == 1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _train(model, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("cls", [kxops.optim.AdaX, kxops.optim.AdaXW])
@pytest.mark.parametrize("foreach", [False, True])
def test_optimizer_matches_functional_reference(cls, foreach):
    model = _model()
    reference_model = copy.deepcopy(model)
    optimizer = cls(model.parameters(), lr=1e-2, foreach=foreach)
    _train(model, optimizer, 5)
    params = list(reference_model.parameters())
    state = _states(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 6, generator=generator)
        reference_model.zero_grad()
        reference_model(x).square().mean().backward()
        group = optimizer.defaults
        with torch.no_grad():
            ref.adax(params, [p.grad for p in params], *state, lr=1e-2, beta1=group["betas"][0],
                     beta2=group["betas"][1], weight_decay=group["weight_decay"],
                     eps=group["eps"], decoupled=cls is kxops.optim.AdaXW, maximize=False)
    for got, want in zip(model.parameters(), params):
        assert_close(got.detach(), want.detach())


def test_defaults_follow_the_design():
    p = [torch.nn.Parameter(torch.randn(2))]
    adax_defaults = kxops.optim.AdaX(p).defaults
    adaxw_defaults = kxops.optim.AdaXW(p).defaults
    assert (adax_defaults["lr"], adax_defaults["betas"], adax_defaults["eps"],
            adax_defaults["weight_decay"]) == (1.5e-3, (0.9, 1e-4), 1e-12, 5e-4)
    assert (adaxw_defaults["lr"], adaxw_defaults["weight_decay"]) == (5e-3, 5e-2)
    # What the user asked is kept; the path is resolved at each step.
    assert adaxw_defaults["fused"] is None and adaxw_defaults["foreach"] is None
    fused_expected = all(_ext.has_kernel("adax_", t.device) for t in p)
    assert resolve_path(p, foreach=None, fused=None, differentiable=False) == (
        fused_expected, not fused_expected)


def test_resume_from_state_dict_is_bitwise_identical():
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(
        optimizer.state_dict())
    _train(model, optimizer, 4, seed=2)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    resumed_opt = kxops.optim.AdaXW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, 4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_low_precision_params_keep_fp32_state_through_load_state_dict():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    optimizer = kxops.optim.AdaXW([p])
    p.grad = torch.randn(10).bfloat16()
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.float32
    state = copy.deepcopy(optimizer.state_dict())
    fresh = kxops.optim.AdaXW([p])
    fresh.load_state_dict(state)
    assert fresh.state[p]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["exp_avg_sq"], state["state"][0]["exp_avg_sq"])


def test_param_groups_scheduler_and_closure():
    model = _model()
    optimizer = kxops.optim.AdaX([
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 1e-1, "weight_decay": 0.0},
    ], lr=1e-2)
    extra = torch.nn.Parameter(torch.randn(3))
    optimizer.add_param_group({"params": [extra], "betas": (0.5, 1e-3)})
    assert optimizer.param_groups[2]["betas"] == (0.5, 1e-3)
    assert optimizer.param_groups[2]["lr"] == 1e-2
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(2, 6)).sum() + extra.sum()
        loss.backward()
        return loss

    before = extra.detach().clone()
    loss = optimizer.step(closure)
    scheduler.step()
    assert isinstance(loss, torch.Tensor)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(5e-2)
    assert not torch.equal(before, extra)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    a.grad = torch.randn(3)
    before = b.detach().clone()
    optimizer = kxops.optim.AdaXW([a, b])
    optimizer.step()
    assert torch.equal(b, before) and b not in optimizer.state


def test_grad_scaler_skips_step_on_inf():
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = kxops.optim.AdaXW([p])
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * torch.tensor([1.0, math.inf, 1.0, 1.0])).sum()).backward()
    before = p.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(p, before)
    assert optimizer.state[p]["step"].item() == 0
    assert scaler.get_scale() == 2.0
    optimizer.zero_grad()
    scaler.scale(p.sum()).backward()
    scaler.step(optimizer)
    assert optimizer.state[p]["step"].item() == 1 and not torch.equal(p, before)


def test_torch_compile_step():
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 6)).sum().backward()
    eager_model = copy.deepcopy(model)
    eager_opt = kxops.optim.AdaXW(eager_model.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        q.grad = p.grad.clone()
    torch.compile(optimizer.step)()
    eager_opt.step()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "learning rate"),
    (dict(betas=(1.0, 1e-4)), "index 0"),
    (dict(betas=(0.9, 0.0)), "index 1"),
    (dict(eps=-1.0), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kxops.optim.AdaXW([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_bad_flags_and_grads():
    params = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        kxops.optim.AdaXW(params, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        kxops.optim.AdaXW(params, fused=True, differentiable=True)
    if not _ext.has_kernel("adax_", torch.device("cpu")):
        optimizer = kxops.optim.AdaXW(params, fused=True)
        params[0].grad = torch.randn(2)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
            optimizer.step()
    embedding = torch.nn.Embedding(4, 3, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        kxops.optim.AdaXW(embedding.parameters()).step()


# --- the compiled fused step, wherever a kernel is registered -------------------------------



# The copies of the CPU kernel (csrc/adax_cpu.h): each must give the same numbers.
CPU_KERNELS = ["AVX2", "AVX512"]


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernel(request, device):
    """Runs the test with one copy of the CPU kernel, skipped where this build or CPU has none
    (a CUDA run takes one copy only: the kernel is not the CPU's)."""
    if device.type != "cpu" and request.param != CPU_KERNELS[0]:
        pytest.skip("one run is enough on a CUDA device")
    yield from switched(lambda kernel: torch.ops.kxops._set_adax_cpu_kernel(kernel),
                        request.param)


def _device_states(params, device):
    exp_avgs, exp_avg_sqs, _ = _states(params)
    return exp_avgs, exp_avg_sqs, [torch.zeros((), device=device) for _ in params]


# Odd sizes for the vector tails, one over a CPU slice (16384) and a CUDA chunk boundary.
FUSED_SHAPES = [(3, 4), (7,), (1,), (2, 2, 2), (33000,), (0,)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_matches_for_loop(device, dtype, decoupled, maximize, tensor_lr, cpu_kernel):
    needs_kernel("adax_", device)
    params = [torch.randn(s, device=device).to(dtype) for s in FUSED_SHAPES]
    grads = [torch.randn(s, device=device).to(dtype) for s in FUSED_SHAPES]
    grads_before = [g.clone() for g in grads]
    loop_params = [p.clone() for p in params]
    fused_state, loop_state = _device_states(params, device), _states(params)
    # A float64 lr tensor holds exactly the float the loop gets.
    lr = torch.tensor(HYPER["lr"], dtype=torch.float64, device=device)
    hyper = dict(HYPER, lr=lr if tensor_lr else HYPER["lr"])
    for _ in range(3):
        adax(params, grads, *fused_state, fused=True, decoupled=decoupled, maximize=maximize,
             **hyper)
        adax(loop_params, grads, *loop_state, foreach=False, decoupled=decoupled,
             maximize=maximize, **HYPER)
    for got, want in zip(params, loop_params):
        assert_close(got, want)
    for got, want in zip(fused_state[0] + fused_state[1], loop_state[0] + loop_state[1]):
        assert got.dtype == ref.state_dtype(dtype)
        assert_close(got, want, dtype=got.dtype)
    assert all(s.item() == 3 for s in fused_state[2])
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_follows_the_authors_recurrence_for_300_steps(device, decoupled):
    needs_kernel("adax_", device)
    p0 = torch.randn(50, dtype=torch.float64, device=device)
    p = p0.clone()
    (m,), (v,), (step,) = _device_states([p], device)
    grads = []
    for t in range(300):
        grads.append(gradient_at(p, t))
        adax([p], [grads[-1]], [m], [v], [step], fused=True, decoupled=decoupled,
             maximize=False, **HYPER)
    expected = authors_adax(p0, grads, decoupled=decoupled, **HYPER)
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-12)


def test_fused_at_ten_million_steps(device):
    needs_kernel("adax_", device)
    p = torch.ones(4, device=device)
    m, v = torch.zeros(4, device=device), torch.full((4,), 0.25, device=device)
    step = torch.tensor(1e7, device=device)
    adax([p], [torch.full((4,), 0.5, device=device)], [m], [v], [step], fused=True, lr=1e-3,
         beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-12, decoupled=True, maximize=False)
    assert torch.isfinite(v).all() and torch.isfinite(p).all()
    assert (1 - p).abs().min() > 1e-6


def test_fused_grad_scale_and_found_inf(device):
    needs_kernel("adax_", device)
    params = [torch.randn(5, device=device)]
    scaled = [torch.randn(5, device=device)]
    expected = [params[0].clone()]
    state, expected_state = _device_states(params, device), _device_states(params, device)
    adax(params, [scaled[0] * 1024], *state, fused=True,
         grad_scale=torch.tensor(1024.0, device=device), decoupled=True, maximize=False, **HYPER)
    adax(expected, scaled, *expected_state, foreach=True, decoupled=True, maximize=False,
         **HYPER)
    assert_close(params[0], expected[0])
    before = params[0].clone()
    adax(params, [torch.full((5,), math.inf, device=device)], *state, fused=True,
         found_inf=torch.tensor(1.0, device=device), decoupled=True, maximize=False, **HYPER)
    assert torch.equal(params[0], before) and state[2][0].item() == 1


def test_fused_mixed_dtypes_in_one_call(device):
    needs_kernel("adax_", device)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float16]
    params = [torch.randn(100 + i, device=device).to(d) for i, d in enumerate(dtypes)]
    grads = [torch.randn_like(p) for p in params]
    loop_params = [p.clone() for p in params]
    fused_state, loop_state = _device_states(params, device), _states(params)
    adax(params, grads, *fused_state, fused=True, decoupled=False, maximize=False, **HYPER)
    adax(loop_params, grads, *loop_state, foreach=False, decoupled=False, maximize=False,
         **HYPER)
    for got, want in zip(params, loop_params):
        assert_close(got, want)


def test_fused_opcheck(device):
    needs_kernel("adax_", device)
    params = [torch.randn(s, device=device) for s in [(3, 4), (9,)]]
    grads = [torch.randn_like(p) for p in params]
    state = _device_states(params, device)
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=1e-4, weight_decay=0.05, eps=1e-8, decoupled=True,
                  maximize=False)
    torch.library.opcheck(torch.ops.kxops.adax_.default, (params, grads, *state), kwargs)
    kwargs["lr"] = torch.tensor(1e-2, device=device)
    torch.library.opcheck(torch.ops.kxops.adax_.tensor_lr, (params, grads, *state), kwargs)


# Each case: (name, the Python error, a regex of its message, code that builds the bad lists
# or arguments from good ones). Run in one child process: a crash shows as a failed run.
BAD_OP_ARGUMENTS = [
    ("lengths", "ValueError", "same length", "g = g + g"),
    ("long param", "TypeError", r"params\[1\] must be float32, float64, float16 or bfloat16, "
     "got torch.int64", "p[1] = p[1].long()"),
    ("complex param", "TypeError", r"params\[1\] must be float32",
     "p[1] = torch.zeros(4, dtype=torch.complex64); g[1] = g[1].to(torch.complex64)"),
    # A float type the kernels do not dispatch: refused before the float32 tensor 0 is stepped.
    ("float8 param", "TypeError", r"params\[1\] must be float32",
     "p[1] = p[1].to(torch.float8_e4m3fn); g[1] = g[1].to(torch.float8_e4m3fn)"),
    ("grad dtype", "TypeError", r"grads\[1\] has dtype torch.float64 but must be torch.float32 for "
     r"torch.float32 params",
     "g[1] = g[1].double()"),
    ("exp_avg dtype", "TypeError", r"exp_avgs\[1\] has dtype", "m[1] = m[1].double()"),
    ("exp_avg_sq dtype", "TypeError", r"exp_avg_sqs\[1\] has dtype",
     "v[1] = v[1].bfloat16()"),
    ("grad shape", "ValueError", r"grads\[1\] has shape \(5,\) but params\[1\] has shape \(4,\)",
     "g[1] = torch.randn(5)"),
    ("grad numel", "ValueError", r"grads\[1\] has shape \(2, 2\)", "g[1] = torch.randn(2, 2)"),
    ("exp_avg shape", "ValueError", r"exp_avgs\[1\] has shape \(2,\)", "m[1] = m[1][:2]"),
    ("exp_avg_sq shape", "ValueError", r"exp_avg_sqs\[1\] has shape \(40,\)",
     "v[1] = torch.zeros(40)"),
    ("step dtype", "TypeError", r"state_steps\[1\] must be float32, got torch.float64",
     "s[1] = s[1].double()"),
    ("step numel", "ValueError", r"state_steps\[1\] must have one element",
     "s[1] = torch.zeros(2)"),
    ("overlapping param", "RuntimeError", r"params\[1\] has elements that share memory",
     "p[1] = torch.randn(1).expand(4)"),
    ("overlapping exp_avg", "RuntimeError", r"exp_avgs\[1\] has elements that share memory",
     "m[1] = torch.zeros(1).expand(4)"),
    ("lr elements", "ValueError", "lr must have one element", "kw['lr'] = torch.ones(2)"),
    ("lr dtype", "TypeError", "lr must be a floating-point tensor",
     "kw['lr'] = torch.tensor(1)"),
    ("grad_scale elements", "ValueError", "grad_scale must have one element",
     "kw['grad_scale'] = torch.ones(3)"),
    ("found_inf dtype", "TypeError", "found_inf must be a floating-point tensor",
     "kw['found_inf'] = torch.tensor(True)"),
    ("beta1", "ValueError", "beta1 must be in", "kw['beta1'] = 1.0"),
    ("beta1 nan", "ValueError", "beta1 must be in", "kw['beta1'] = math.nan"),
    ("beta2", "ValueError", "beta2 must be positive", "kw['beta2'] = 0.0"),
    ("beta2 inf", "ValueError", "beta2 must be positive", "kw['beta2'] = math.inf"),
    ("beta2 subnormal", "ValueError", "beta2 must be positive", "kw['beta2'] = 1e-320"),
    ("eps", "ValueError", "eps must be finite and >= 0", "kw['eps'] = -1.0"),
    ("eps nan", "ValueError", "eps must be finite and >= 0", "kw['eps'] = math.nan"),
    ("weight_decay", "ValueError", "weight_decay must be finite and >= 0",
     "kw['weight_decay'] = -1.0"),
    ("weight_decay inf", "ValueError", "weight_decay must be finite and >= 0",
     "kw['weight_decay'] = math.inf"),
    ("lr inf", "ValueError", "lr must be finite and >= 0", "kw['lr'] = math.inf"),
    ("lr negative", "ValueError", "lr must be finite and >= 0", "kw['lr'] = -1e-3"),
]


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_op_checks_every_argument_before_touching_memory(tensor_lr):
    """Both overloads of torch.ops.kxops.adax_ called directly: each bad argument (at index 1,
    after a good tensor 0; a tensor lr picks the tensor_lr overload) raises the Python type
    the wrappers use, naming it, and leaves every tensor as it was."""
    needs_kernel("adax_", "cpu")
    cases = BAD_OP_ARGUMENTS
    code = f"""
        import math, torch, kxops
        cases = {[(name, build) for name, _, _, build in cases]!r}
        for name, build in cases:
            p = [torch.randn(4), torch.randn(4)]
            g = [torch.randn(4), torch.randn(4)]
            m = [torch.zeros(4), torch.zeros(4)]
            v = [torch.zeros(4), torch.zeros(4)]
            s = [torch.zeros(()), torch.zeros(())]
            kw = dict(lr={'torch.tensor(1e-2)' if tensor_lr else '1e-2'}, beta1=0.9, beta2=1e-4,
                      weight_decay=0.0, eps=1e-8, decoupled=True, maximize=False)
            exec(build)
            before = [t.clone() for t in p + m + v + s]
            op = torch.ops.kxops.adax_
            if not isinstance(kw["lr"], float):
                op = op.tensor_lr
            try:
                op(p, g, m, v, s, **kw)
                print(name, "|no error|")
            except Exception as e:
                untouched = all(torch.equal(a, b) for a, b in zip(before, p + m + v + s))
                print(name, "|" + type(e).__name__ + "|" + str(e).splitlines()[0],
                      "|untouched" if untouched else "|MODIFIED")
    """
    result = run_isolated(code)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" |", 1) for line in result.stdout.splitlines())
    for name, error, match, _ in cases:
        got = lines[name]
        assert got.startswith(error + "|kxops.adax_: "), (name, got)
        assert re.search(match, got), (name, match, got)
        assert got.endswith("|untouched"), (name, got)


def captured_step(optimizer):
    """optimizer.step captured in a CUDA graph, on a side stream as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True)])
@pytest.mark.parametrize("schedule", [False, True])
def test_cuda_graph_capture(flags, schedule):
    """A captured step replayed equals eager steps; with a schedule, StepLR changes a tensor
    lr on the params' device between replays and the replays follow it."""
    if flags.get("fused"):
        needs_kernel("adax_", "cuda")
    model = _model().cuda()
    lr = torch.tensor(1e-2, device="cuda") if schedule else 1e-2
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=lr, capturable=True, **flags)
    eager_model = copy.deepcopy(model)
    eager_opt = kxops.optim.AdaXW(eager_model.parameters(), lr=1e-2, **flags)
    schedulers = ([torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                   for o in (optimizer, eager_opt)] if schedule else [])
    x = torch.randn(8, 6, device="cuda")
    for m in (model, eager_model):
        m(x).square().mean().backward()
    optimizer.step()  # state is created outside the capture
    eager_opt.step()
    graph = captured_step(optimizer)
    for _ in range(3):
        for scheduler in schedulers:
            scheduler.step()
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert_close(a.detach(), b.detach())
    # One eager step, then three replays of the captured one.
    assert optimizer.state[next(model.parameters())]["step"].item() == 4
    if schedule:
        assert optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True)])
def test_capture_refuses_a_cpu_lr_tensor(flags):
    if flags.get("fused"):
        needs_kernel("adax_", "cuda")
    model = _model().cuda()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=torch.tensor(1e-2), capturable=True,
                                  **flags)
    optimizer.step()  # eager: allowed
    with pytest.raises(RuntimeError, match="needs lr on the params' device"):
        captured_step(optimizer)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_hundreds_of_tensors_in_one_step():
    """More tensors than fit in one launch's kernel arguments in PyTorch's fused Adam."""
    needs_kernel("adax_", "cuda")
    params = [torch.randn(17 + i % 5, device="cuda") for i in range(700)]
    grads = [torch.randn_like(p) for p in params]
    loop_params = [p.clone() for p in params]
    fused_state, loop_state = _device_states(params, "cuda"), _states(params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        adax(params, grads, *fused_state, fused=True, decoupled=True, maximize=False, **HYPER)
        torch.cuda.synchronize()
    update_launches = [e for e in prof.events() if "adax_kernel" in e.name]
    assert len(update_launches) == 1, [e.name for e in prof.events()]
    adax(loop_params, grads, *loop_state, foreach=False, decoupled=True, maximize=False,
         **HYPER)
    for got, want in zip(params, loop_params):
        assert_close(got, want)


@cuda_with_memory(32)
def test_cuda_tensor_past_2_pow_31_elements():
    """One bf16 tensor of more than 2^31 elements (fp32 state): two steps; the elements at both
    ends and their state match the for-loop steps on copies of those elements."""
    needs_kernel("adax_", "cuda")
    numel = 2**31 + 33
    params = [torch.randn(numel, device="cuda", dtype=torch.bfloat16)]
    grads = [torch.randn_like(params[0])]
    ends = [slice(0, 1000), slice(numel - 1000, numel)]
    loop_params = [params[0][end].clone() for end in ends]
    loop_grads = [grads[0][end].clone() for end in ends]
    fused_state, loop_state = _device_states(params, "cuda"), _states(loop_params)
    for _ in range(2):
        adax(params, grads, *fused_state, fused=True, decoupled=True, maximize=False, **HYPER)
        adax(loop_params, loop_grads, *loop_state, foreach=False, decoupled=True, maximize=False,
             **HYPER)
    for i, end in enumerate(ends):
        assert_close(params[0][end], loop_params[i])
        assert_close(fused_state[0][0][end], loop_state[0][i])
        assert_close(fused_state[1][0][end], loop_state[1][i])


# --- long training, layouts, duplicates, complex params, checkpoints, torch.optim parity -----

PATHS = {
    "fused": dict(fused=True),
    "foreach": dict(foreach=True),
    "capturable": dict(foreach=True, capturable=True),
    "loop": dict(foreach=False, fused=False),
}


def path_flags(path):
    if path == "fused":
        needs_kernel("adax_", "cpu")
    return PATHS[path]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("steps", [1e7, 1e9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_closed_form_after_a_billion_steps(path, steps, dtype):
    """eps / sqrt(B_t) underflows long before 10^7 steps: elements whose gradient has always
    been 0 keep the authors' zero update (not 0/0 = NaN), the others get m / sqrt(v_hat)."""
    flags = path_flags(path)
    p = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.75]).to(dtype)
    g = torch.tensor([0.0, 0.0, 0.25, -1.0, 1e-3]).to(dtype)
    m = torch.tensor([0.0, 0.0, 0.1, -0.3, 2e-3], dtype=ref.state_dtype(dtype))
    v = torch.tensor([0.0, 0.0, 0.04, 0.5, 1e-6], dtype=ref.state_dtype(dtype))
    step = torch.tensor(steps)
    p0, m0 = p.clone(), m.clone()
    adax([p], [g], [m], [v], [step], lr=1e-3, beta1=0.9, beta2=1e-4, weight_decay=0.0,
         eps=1e-12, decoupled=True, maximize=False, **flags)
    assert ref.inverse_bias_correction(step.item(), 1e-4) == 0.0  # v_hat is frozen
    m_new = m0 + 0.1 * (g.to(m0.dtype) - m0)
    expected = p0.double() - 1e-3 * m_new.double() / v.double().sqrt()
    expected[:2] = p0[:2].double()
    assert torch.isfinite(p).all() and torch.equal(p[:2], p0[:2])
    assert_close(p, expected.to(dtype))


@pytest.mark.parametrize("path", list(PATHS))
def test_embedding_padding_row_stays_finite_after_long_training(path):
    """The padding row's gradient is always 0; at beta2 = 1e-3 its eps term underflows in
    float32 after ~153K steps."""
    flags = path_flags(path)
    embedding = torch.nn.Embedding(10, 4, padding_idx=0)
    optimizer = kxops.optim.AdaXW(embedding.parameters(), betas=(0.9, 1e-3), **flags)
    padding = embedding.weight[0].detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        embedding(torch.tensor([0, 3, 5, 0])).square().sum().backward()
        optimizer.step()
        optimizer.state[embedding.weight]["step"].fill_(200_000)
    weight = embedding.weight.detach()
    assert torch.isfinite(weight).all()
    decay = (1 - optimizer.defaults["lr"] * optimizer.defaults["weight_decay"]) ** 2
    assert_close(weight[0], padding * decay)


def _steps_of(optimizer_factory, params_factory, grads, steps=3):
    params = params_factory()
    optimizer = optimizer_factory(params)
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("path", ["fused", "foreach", "capturable"])
@pytest.mark.parametrize("cls", [kxops.optim.AdaX, kxops.optim.AdaXW])
def test_every_layout_torch_accepts_gives_the_loops_numbers(path, cls):
    flags = path_flags(path)
    torch.manual_seed(0)
    base = [torch.randn(2, 3, 4, 5), torch.randn(5, 3), torch.randn(4, 6), torch.randn(3, 4),
            torch.randn(7, 5), torch.randn(3, 1, 4)]

    def make_params():
        return [
            torch.nn.Parameter(base[0].clone().to(memory_format=torch.channels_last)),
            torch.nn.Parameter(base[1].clone().t()),   # transposed: dense, not contiguous
            base[2].clone()[:, ::2].requires_grad_(),  # strided: not dense
            torch.nn.Parameter(base[3].clone()),
            torch.nn.Parameter(base[4].clone()),
            torch.nn.Parameter(base[5].clone()),
        ]

    grads = [
        torch.randn(2, 3, 4, 5),                       # contiguous for a channels_last param
        torch.randn(3, 5),
        torch.randn(4, 3),
        torch.randn(1, 4).expand(3, 4),                # expanded
        torch.randn(5, 7).t(),                         # transposed
        torch.randn(3, 4).unsqueeze(1),                # size-1 dim with other strides
    ]
    grads_before = [g.clone() for g in grads]
    got, _ = _steps_of(lambda ps: cls(ps, lr=1e-2, **flags), make_params, grads)
    want, _ = _steps_of(lambda ps: cls(ps, lr=1e-2, **PATHS["loop"]), make_params, grads)
    for a, b in zip(got, want):
        assert a.stride() == b.stride()
        assert_close(a.detach(), b.detach())
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))


@pytest.mark.parametrize("path", list(PATHS))
def test_huge_gradient_stays_finite_on_every_path(path):
    """g^2 overflows float32 to inf: v_hat is inf, the update m / inf is 0 (the capturable
    path used to take inf - inf in a lerp at the first step)."""
    flags = path_flags(path)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    optimizer = kxops.optim.AdaXW([p], lr=1e-2, **flags)
    p.grad = torch.tensor([1e30, 1.0, -1e30, 0.0])
    optimizer.step()
    loop = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    loop_optimizer = kxops.optim.AdaXW([loop], lr=1e-2, **PATHS["loop"])
    loop.grad = p.grad.clone()
    loop_optimizer.step()
    assert torch.isfinite(p).all()
    assert_close(p.detach(), loop.detach())


@pytest.mark.parametrize("path", list(PATHS))
def test_large_finite_gradient_keeps_the_loops_second_moment(path):
    """w g g, not w (g g): g = 2e19 squares past float32's range, the loop's addcmul does not."""
    flags = path_flags(path)

    def run(flags):
        p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        optimizer = kxops.optim.AdaX([p], **flags)
        for g in (1.0, 1.0, 2e19):
            p.grad = torch.tensor([g, 1.0])
            optimizer.step()
        return p.detach(), optimizer.state[p]["exp_avg_sq"]

    (p, v), (loop_p, loop_v) = run(flags), run(PATHS["loop"])
    assert torch.isfinite(v).all(), v
    assert_close(v, loop_v)
    assert_close(p, loop_p)


@pytest.mark.parametrize("path", list(PATHS))
def test_overlapping_views_of_one_buffer_step_as_the_loop(path):
    """Params that are views of one buffer whose memory meets (one strided) are updated in the
    loop's order; the fused step used to drop one update through its dense working copy."""
    flags = path_flags(path)

    def run(flags):
        buffer = torch.zeros(8)
        first, second = buffer[1::2], buffer[0:4]
        optimizer = kxops.optim.AdaX([first, second], lr=1e-2, **flags)
        first.grad, second.grad = torch.ones(4), -torch.ones(4)
        for _ in range(2):
            optimizer.step()
        return buffer

    assert_close(run(flags), run(PATHS["loop"]))


def test_beta2_whose_reciprocal_overflows_is_refused():
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        kxops.optim.AdaX([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 1e-320))


@pytest.mark.parametrize("path", list(PATHS))
def test_duplicate_params_warn_and_step_as_the_loop(path):
    flags = path_flags(path)
    torch.manual_seed(0)
    start, other, grad = torch.randn(40000), torch.randn(5), torch.randn(40000)

    def run(flags):
        p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(other.clone())
        with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
            optimizer = kxops.optim.AdaXW([p, q, p], lr=1e-2, **flags)
        for _ in range(2):
            p.grad, q.grad = grad, torch.ones(5)
            optimizer.step()
        return p, q, optimizer.state[p]

    p, q, state = run(flags)
    loop_p, loop_q, loop_state = run(PATHS["loop"])
    assert state["step"].item() == loop_state["step"].item() == 4
    assert_close(p.detach(), loop_p.detach())
    assert_close(q.detach(), loop_q.detach())
    assert_close(state["exp_avg_sq"], loop_state["exp_avg_sq"])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [kxops.optim.AdaX, kxops.optim.AdaXW])
def test_complex_params_step_as_their_real_views(path, cls):
    flags = path_flags(path)
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.complex64)
    grads = [torch.randn(3, 4, dtype=torch.complex64) for _ in range(3)]
    complex_param = torch.nn.Parameter(z.clone())
    real_param = torch.nn.Parameter(torch.view_as_real(z).clone())
    complex_opt = cls([complex_param], lr=1e-2, **flags)
    real_opt = cls([real_param], lr=1e-2, **flags)
    for g in grads:
        complex_param.grad, real_param.grad = g, torch.view_as_real(g)
        complex_opt.step()
        real_opt.step()
    assert complex_opt.state[complex_param]["exp_avg"].dtype == torch.complex64
    assert_close(torch.view_as_real(complex_param.detach()), real_param.detach())


def test_state_dict_saves_the_requested_flags_and_loads_without_the_kernel(tmp_path):
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 2)
    assert optimizer.state_dict()["param_groups"][0]["fused"] is None
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "checkpoint.pt")
    result = run_isolated(f"""
        import torch, kxops
        from kxops import _ext
        assert not _ext.LOADED
        from tests.adax.test_adax import _model, _train
        checkpoint = torch.load({str(tmp_path / "checkpoint.pt")!r})
        model = _model()
        model.load_state_dict(checkpoint["model"])
        optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
        optimizer.load_state_dict(checkpoint["optimizer"])
        _train(model, optimizer, 2)
        print(optimizer.state[next(model.parameters())]["step"].item())
    """, env={"KXOPS_DISABLE_EXT": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "4.0"
    # A foreach optimizer stays one through a checkpoint.
    foreach = kxops.optim.AdaXW(model.parameters(), lr=1e-2, foreach=True)
    foreach.load_state_dict(kxops.optim.AdaXW(model.parameters(), foreach=True).state_dict())
    assert foreach.param_groups[0]["foreach"] is True and foreach.param_groups[0]["fused"] is None


@pytest.mark.parametrize("path", list(PATHS))
def test_plain_number_step_in_a_loaded_state_dict(path):
    flags = path_flags(path)
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2, **flags)
    _train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())
    expected = copy.deepcopy(model)
    expected_opt = kxops.optim.AdaXW(expected.parameters(), lr=1e-2, **flags)
    expected_opt.load_state_dict(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    _train(model, optimizer, 2, seed=3)
    _train(expected, expected_opt, 2, seed=3)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    assert all(isinstance(s["step"], torch.Tensor) and s["step"].item() == 4
               for s in optimizer.state.values())


def test_fused_with_meta_params_builds_and_raises_torchs_error_at_step():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    optimizer = kxops.optim.AdaXW([p], fused=True)
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating "
                                           "point Tensors of supported devices"):
        optimizer.step()


@pytest.mark.parametrize("params", [torch.nn.Parameter(torch.randn(3, 4)), torch.randn(3, 4)])
def test_one_tensor_as_params_is_a_type_error(params):
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an "
                                        "iterable of Tensors or dicts"):
        kxops.optim.AdaX(params)


@pytest.fixture
def default_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("path, step_dtype", [("fused", torch.float32),
                                              ("capturable", torch.float32),
                                              ("foreach", torch.float64),
                                              ("loop", torch.float64)])
def test_step_dtype_follows_torch_under_default_float64(default_float64, path, step_dtype):
    flags = path_flags(path)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
    optimizer = kxops.optim.AdaXW([p], **flags)
    p.grad = torch.randn(3, dtype=torch.float32)
    optimizer.step()
    assert optimizer.state[p]["step"].dtype == step_dtype


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-1e-3)), "Invalid learning rate"),
    (dict(betas=(0.9, math.inf)), "Invalid beta parameter at index 1"),
    (dict(weight_decay=math.inf), "Invalid weight_decay value: inf"),
    (dict(eps=math.nan), "Invalid epsilon value"),
])
def test_hyperparameters_torch_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kxops.optim.AdaXW([torch.nn.Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize("cls", [kxops.optim.AdaX, kxops.optim.AdaXW])
@pytest.mark.parametrize("maximize", [False, True])
def test_differentiable_step_passes_gradcheck(cls, maximize):
    """As torch's own differentiable-optimizer tests: the step as a function of the param,
    its grad and the moments."""
    torch.manual_seed(0)
    p = torch.rand(10, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(10, dtype=torch.float64, requires_grad=True)
    exp_avg = torch.rand(10, dtype=torch.float64, requires_grad=True)
    exp_avg_sq = torch.rand(10, dtype=torch.float64, requires_grad=True)

    def step(p, grad, exp_avg, exp_avg_sq):
        p = p.clone()
        p.grad = grad
        optimizer = cls([p], lr=1e-2, weight_decay=0.1, maximize=maximize, differentiable=True)
        optimizer.state[p].update(step=torch.tensor(3.0), exp_avg=exp_avg.clone(),
                                  exp_avg_sq=exp_avg_sq.clone())
        optimizer.step()
        state = optimizer.state[p]
        return p, state["exp_avg"], state["exp_avg_sq"]

    assert torch.autograd.gradcheck(step, (p, grad, exp_avg, exp_avg_sq))


def test_capturable_tensor_lr_follows_a_scheduler():
    """The capturable step reads lr from its tensor at each step (what a CUDA-graph replay
    does); StepLR updates that tensor in place."""
    def run(lr, flags):
        model = _model()
        optimizer = kxops.optim.AdaXW(model.parameters(), lr=lr, **flags)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(4):
            _train(model, optimizer, 1)
            scheduler.step()
        return model

    captured = run(torch.tensor(1e-2), dict(foreach=True, capturable=True))
    floats = run(1e-2, PATHS["loop"])
    for a, b in zip(captured.parameters(), floats.parameters()):
        assert_close(a.detach(), b.detach())


def test_capture_rejects_an_lr_tensor_on_another_device(monkeypatch):
    """Under capture, an lr tensor not on the params' device cannot reach the replays."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="lr is a Tensor on cpu but the params are on meta"):
        adax([p], [torch.empty_like(p)], [torch.empty_like(p)], [torch.empty_like(p)],
             [torch.zeros((), device="meta")], foreach=True, capturable=True,
             lr=torch.tensor(1e-2), beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-8,
             decoupled=True, maximize=False)


def test_op_with_one_meta_tensor_is_refused():
    """A meta tensor among real ones reaches the fake kernel: it refuses the mix instead of
    returning with nothing stepped."""
    p, g, m, v, s = [torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], \
        [torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match="lr is on meta but params\\[0\\] is on cpu"):
        torch.ops.kxops.adax_.tensor_lr(p, g, m, v, s, lr=torch.tensor(1e-3, device="meta"),
                                        beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-8,
                                        decoupled=False, maximize=False)
    with pytest.raises(RuntimeError, match="grads\\[0\\] is on meta"):
        torch.ops.kxops.adax_(p, [g[0].to("meta")], m, v, s, lr=1e-3, beta1=0.9, beta2=1e-4,
                              weight_decay=0.0, eps=1e-8, decoupled=False, maximize=False)


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_foreach_step_with_low_precision_params(capturable):
    """Under torch.compile torch's grouping helper returns one (None, None) group; the
    low-precision staging still needs each group's dtype."""
    def run(compiled):
        params = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)),
                  torch.nn.Parameter(torch.ones(2))]
        optimizer = kxops.optim.AdaX(params, foreach=True, capturable=capturable)
        for p in params:
            p.grad = torch.ones_like(p)
        (torch.compile(optimizer.step) if compiled else optimizer.step)()
        return params

    for ours, eager in zip(run(True), run(False)):
        torch.testing.assert_close(ours.detach(), eager.detach(), atol=0, rtol=0)


def _multi_tensor_ops(step):
    """The torch._foreach_* calls of one call of step(), in order."""
    return [name for name in dispatched_ops(step) if name.startswith("_foreach_")]


@pytest.mark.parametrize("cls, torch_cls", [(kxops.optim.AdaXW, torch.optim.AdamW),
                                            (kxops.optim.AdaX, torch.optim.Adam)])
def test_foreach_step_is_as_lean_as_torchs_foreach_adam(cls, torch_cls):
    """The foreach step (what foreach=True and the fallback run) makes no more passes over the
    tensors than torch's foreach Adam(W), and no more param-sized temporaries (out-of-place
    ops): it used to make two (the denominator and the update)."""
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    counts = []
    for optimizer in (cls(params, foreach=True), torch_cls(params, foreach=True,
                                                          weight_decay=0.05)):
        optimizer.step()  # the state is created on the first step
        ops = _multi_tensor_ops(optimizer.step)
        counts.append((len(ops), sum(not op.endswith("_") for op in ops)))
    (ours, our_temporaries), (theirs, their_temporaries) = counts
    assert ours <= theirs and our_temporaries <= their_temporaries, counts


# Each: (name, the error, its message without the op's prefix, the bad grads of a param [3]).
BAD_LISTS = [
    ("lengths", ValueError, "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the "
     "same length, got 1, 2, 1, 1, 1", "[torch.randn(3)] * 2"),
    ("grad shape", ValueError, "grads[0] has shape (4,) but params[0] has shape (3,)",
     "[torch.randn(4)]"),
]


@pytest.mark.parametrize("path", [dict(fused=True), dict(foreach=True),
                                  dict(fused=False, foreach=False)])
@pytest.mark.parametrize("name, error, message, grads", BAD_LISTS,
                         ids=[case[0] for case in BAD_LISTS])
def test_bad_lists_are_refused_in_the_ops_words(path, name, error, message, grads):
    """Every path, the compiled op's (C++) included, refuses unequal lists and a grad of
    another shape with the op's message and its prefix kxops.adax_ (the for-loop and foreach
    paths used to say it their own way)."""
    if path.get("fused"):
        needs_kernel("adax_", "cpu")
    p = [torch.randn(3)]
    with pytest.raises(error) as raised:
        adax(p, eval(grads), [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())],
             **path, decoupled=True, maximize=False, **HYPER)
    assert str(raised.value) == "kxops.adax_: " + message


@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", -1.0), ("eps", float("nan")),
                                        ("weight_decay", float("inf")), ("betas", (0.9, 0.0)),
                                        ("betas", (1.0, 1e-4))])
def test_a_param_group_edited_after_construction_is_refused_on_every_path(key, value):
    """A hyperparameter set in param_groups after construction (the constructor's checks do
    not see it): every path refuses it before anything changes, in the fused op's words (the
    for-loop and foreach paths used to step with it: NaN params for lr=nan, a bare
    ZeroDivisionError for beta2=0)."""
    needs_kernel("adax_", "cpu")
    messages = set()
    for path in (dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)):
        w = torch.nn.Parameter(torch.randn(4))
        w.grad = torch.randn(4)
        before = w.detach().clone()
        optimizer = kxops.optim.AdaX([w], **path)
        optimizer.param_groups[0][key] = value
        with pytest.raises(ValueError, match=r"^kxops\.adax_: ") as raised:
            optimizer.step()
        assert torch.equal(w.detach(), before), path
        messages.add(str(raised.value))
    assert len(messages) == 1, messages


# --- compact state: bf16 and 8-bit moments, stochastic rounding -----------------------------

COMPACT_CASES = [(torch.float32, torch.bfloat16), (torch.float32, torch.uint8),
                 (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.uint8),
                 (torch.float16, torch.uint8), (torch.bfloat16, torch.float32),
                 (torch.float16, torch.float32)]
COMPACT_SHAPES = [(3, 4), (7,), (1,), (0,), (33000,), (300, 5)]


def _compact_lists(param_dtype, state_dtype, shapes=COMPACT_SHAPES, seed=0):
    """Params, grads spanning six decades, compact state, steps, scales and seeds."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * torch.logspace(-6, 0, math.prod(s)).view(s))
             .to(param_dtype) for s in shapes]
    moments = [[torch.zeros(s, dtype=state_dtype) for s in shapes] for _ in range(2)]
    steps = [torch.zeros(()) for _ in shapes]
    scales = [[torch.zeros(ref.blocks_of(math.prod(s))) for s in shapes] for _ in range(2)]
    seeds = [2**62 + 12345 * i for i in range(len(shapes))]
    return params, grads, moments[0], moments[1], steps, scales[0], scales[1], seeds


def _run_compact(lists, path, steps=4, stochastic=True, **flags):
    params, grads, m, v, st, m_scales, v_scales, seeds = lists
    hyper = dict(HYPER, decoupled=True, maximize=False)
    hyper.update(flags)
    for _ in range(steps):
        adax(params, grads, m, v, st, **path, **hyper, exp_avg_scales=m_scales,
             exp_avg_sq_scales=v_scales, seeds=seeds, stochastic_rounding=stochastic)


def _assert_same_state(got, want, exact_params=True):
    """Compact moments, scales and steps bit for bit; params (and fp32 moments) bit for bit, or
    close (the fused kernel computes p - m / d * lr, the loop p - (m lr) / d)."""
    for i in (2, 3, 4, 5, 6):
        for a, b in zip(got[i], want[i]):
            if a.dtype == torch.float32 and i in (2, 3) and not exact_params:
                assert_close(a, b)
            else:
                assert torch.equal(a.view(-1).float().nan_to_num(7),
                                   b.view(-1).float().nan_to_num(7))
    for a, b in zip(got[0], want[0]):
        if exact_params:
            assert torch.equal(a, b)
        else:
            assert_close(a, b)


@pytest.mark.parametrize("param_dtype, state_dtype", COMPACT_CASES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_compact_state_matches_the_reference(param_dtype, state_dtype, stochastic,
                                                   maximize, cpu_kernel):
    needs_kernel("adax_", "cpu")
    fused, loop = _compact_lists(param_dtype, state_dtype), _compact_lists(param_dtype,
                                                                           state_dtype)
    _run_compact(fused, dict(fused=True), stochastic=stochastic, maximize=maximize)
    _run_compact(loop, dict(foreach=False, fused=False), stochastic=stochastic,
                 maximize=maximize)
    _assert_same_state(fused, loop, exact_params=False)


def _every_octave_grads():
    """Blocks of 128 whose values fall in every octave below their largest (1.0, or a
    subnormal one), each with mantissas that round up into the next octave, plus blocks of
    zeros (both signs) and of a NaN."""
    gen = torch.Generator().manual_seed(3)
    exponents = torch.arange(128) % 48
    mantissas = torch.randint(0, 2**23, (128,), generator=gen)
    mantissas[::3] = 2**23 - 1  # rounds up into the octave above at any kept width
    bits = ((127 - exponents) << 23) | mantissas
    octaves = bits.int().view(torch.float32) * torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0)
    octaves[0] = 1.0
    tiny = octaves * 2.0**-140  # subnormal: the block's scale at its floor
    zeros = torch.zeros(128)
    zeros[1::2] = -0.0
    special = torch.randn(128, generator=gen)
    special[77] = math.nan  # (an inf gradient makes m NaN by torch.lerp's formula, inf by the
    # kernels' m + (1 - beta1)(g - m): both store the largest code, with different signs)
    return torch.cat([octaves, tiny, zeros, special, octaves[:61]])


@pytest.mark.parametrize("stochastic", [False, True])
def test_eight_bit_codes_of_every_octave_as_the_reference(stochastic, cpu_kernel):
    """The vector encoders (table lookups, no clamps) against the reference's formula, where
    their reasoning is thinnest: every octave, mantissas that carry into the octave above,
    subnormals, signed zeros (a zero code has no sign) and NaN; beta1 = 0 so that m is the
    gradient."""
    needs_kernel("adax_", "cpu")
    grads = _every_octave_grads()
    runs = []
    for path in (dict(fused=True), dict(foreach=False, fused=False)):
        lists = list(_compact_lists(torch.float32, torch.uint8, shapes=[grads.shape]))
        lists[1] = [grads.clone()]
        _run_compact(lists, path, steps=3, stochastic=stochastic, beta1=0.0)
        runs.append(lists)
    assert runs[0][2][0].unique().numel() > 32  # the codes spread over the map
    _assert_same_state(*runs, exact_params=False)


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_first_moment_is_torchs_lerp_for_every_beta1(beta1, decoupled, cpu_kernel):
    """One step from the same fp32 state: m bit for bit as the loop's torch.lerp(m, g, 1 -
    beta1) (one rounding; m + w (g - m) below w = 0.5, g + (w - 1)(g - m) from there) of the
    gradient with AdaX's L2 term g + wd p (one rounding, as add(alpha=)). The kernel used m +
    w (g - m) for every w and rounded wd p first: m off in the last bit in about a third of the
    elements for beta1 <= 0.5 or weight decay in the gradient, which compact state stores as
    other codes now and then."""
    needs_kernel("adax_", "cpu")
    gen = torch.Generator().manual_seed(11)
    n = 4099  # vectors of both copies and a scalar tail
    param = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)
    exp_avg = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)
    exp_avg_sq = torch.rand(n, generator=gen)
    results = []
    for path in (dict(fused=True), dict(foreach=False, fused=False)):
        m = exp_avg.clone()
        adax([param.clone()], [grad], [m], [exp_avg_sq.clone()], [torch.tensor(3.0)], **path,
             lr=1e-2, beta1=beta1, beta2=1e-4, weight_decay=0.05, eps=1e-8, decoupled=decoupled,
             maximize=False)
        results.append(m)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("scale", [1000.0, 3.0, 1024.0, 0.0, math.inf])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_gradient_divided_by_the_grad_scale_as_the_loop(scale, maximize, cpu_kernel):
    """The loop's g / grad_scale (then -g for maximize), bit for bit: the kernels multiplied by
    1 / grad_scale, which differs in the last bit in about half the elements unless the scale is
    a power of two (GradScaler's own scales are; init_scale=1000 is not)."""
    needs_kernel("adax_", "cpu")
    grad = torch.randn(4099, generator=torch.Generator().manual_seed(12))
    grad[:3] = torch.tensor([0.0, math.inf, -math.inf])
    results = []
    for path in (dict(fused=True), dict(foreach=False, fused=False)):
        m = torch.zeros(4099)
        adax([torch.zeros(4099)], [grad], [m], [torch.zeros(4099)], [torch.tensor(0.0)], **path,
             grad_scale=torch.tensor(scale), lr=1e-2, beta1=0.0, beta2=1e-4, weight_decay=0.0,
             eps=1e-8, decoupled=True, maximize=maximize)
        results.append(m)
    assert torch.equal(results[0].nan_to_num(7), results[1].nan_to_num(7))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_fused_beta1_zero_keeps_a_gradient_far_below_the_old_mean(state_dtype, cpu_kernel):
    """beta1 = 0: m is the gradient, also after a step whose m was far larger (the kernel's m +
    (g - m) gave 0 there: 1e-9 - 1 rounds to -1), as the loop's torch.lerp."""
    needs_kernel("adax_", "cpu")
    runs = []
    for path in (dict(fused=True), dict(foreach=False, fused=False)):
        lists = list(_compact_lists(torch.float32, state_dtype, shapes=[(40,)]))
        for grad in (torch.ones(40), torch.full((40,), 1e-9)):
            lists[1] = [grad]
            _run_compact(lists, path, steps=1, stochastic=False, beta1=0.0)
        runs.append(lists)
    _assert_same_state(*runs, exact_params=False)
    assert torch.equal(runs[0][2][0], runs[1][2][0])  # fp32 m too, bit for bit
    if state_dtype == torch.float32:
        assert (runs[0][2][0] == torch.tensor(1e-9)).all()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_cpu_kernel_copies_give_the_same_bits(state_dtype):
    """Every copy of the CPU kernel this CPU runs: compact moments, codes and scales bit for
    bit; params and fp32 moments close (an element in one copy's vector tail is in a vector of
    the other's, and the vector and scalar updates may round differently, as against the
    reference)."""
    needs_kernel("adax_", "cpu")
    results = {}
    try:
        for kernel in CPU_KERNELS:
            try:
                torch.ops.kxops._set_adax_cpu_kernel(kernel)
            except ValueError:
                continue
            assert torch.ops.kxops._adax_cpu_kernel() == kernel
            lists = _compact_lists(torch.float32, state_dtype,
                                   shapes=[*COMPACT_SHAPES, (129,), (16385,)])
            _run_compact(lists, dict(fused=True), steps=6)
            results[kernel] = lists
    finally:
        torch.ops.kxops._set_adax_cpu_kernel("auto")
    first, *others = results.values()
    for other in others:
        _assert_same_state(other, first, exact_params=False)


def test_cpu_kernel_choice_follows_aten_cpu_capability():
    """ATEN_CPU_CAPABILITY lowers the choice as it does torch's kernels; the AVX-512 copy is
    picked where torch would pick AVX-512 and the build has it; the switch refuses a bad name."""
    needs_kernel("adax_", "cpu")
    code = """
        import torch, kxops
        print(torch.ops.kxops._adax_cpu_kernel(), torch.backends.cpu.get_cpu_capability())
        """
    forced = run_isolated(code, env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert forced.stdout.split()[:2] == ["AVX2", "AVX2"]
    chosen = run_isolated(code)
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    kernel, capability = chosen.stdout.split()[:2]
    try:
        torch.ops.kxops._set_adax_cpu_kernel("AVX512")
        available = True
    except ValueError:
        available = False
    finally:
        torch.ops.kxops._set_adax_cpu_kernel("auto")
    want = "AVX512" if available and capability.startswith("AVX512") else "AVX2"
    assert kernel == want
    with pytest.raises(ValueError, match="kernel must be 'auto', 'AVX2' or 'AVX512'"):
        torch.ops.kxops._set_adax_cpu_kernel("avx1024")


@pytest.mark.parametrize("param_dtype, state_dtype", COMPACT_CASES)
@pytest.mark.parametrize("capturable", [False, True])
def test_foreach_compact_state_gives_the_references_numbers(param_dtype, state_dtype,
                                                            capturable):
    foreach, loop = _compact_lists(param_dtype, state_dtype), _compact_lists(param_dtype,
                                                                             state_dtype)
    _run_compact(foreach, dict(foreach=True, capturable=capturable))
    _run_compact(loop, dict(foreach=False, fused=False))
    _assert_same_state(foreach, loop)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8])
def test_fused_compact_state_is_independent_of_the_thread_count(state_dtype):
    needs_kernel("adax_", "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            lists = _compact_lists(torch.bfloat16, state_dtype, shapes=[(100_000,), (333,)])
            _run_compact(lists, dict(fused=True))
            results.append(lists)
    finally:
        torch.set_num_threads(threads)
    _assert_same_state(results[0], results[1])


def _train_compact(state_dtype, seed, steps=5, **flags):
    torch.manual_seed(seed)
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2, state_dtype=state_dtype,
                                  **flags)
    _train(model, optimizer, steps)
    return model, optimizer


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8])
def test_stochastic_rounding_is_reproducible_from_the_seed(path, state_dtype):
    flags = path_flags(path)
    a, opt_a = _train_compact(state_dtype, 0, **flags)
    b, opt_b = _train_compact(state_dtype, 0, **flags)
    nearest, _ = _train_compact(state_dtype, 0, stochastic_rounding=False, **flags)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    seeds_a = [s["rounding_seed"] for s in opt_a.state.values()]
    assert seeds_a == [s["rounding_seed"] for s in opt_b.state.values()]
    assert all(isinstance(s, int) for s in seeds_a) and len(set(seeds_a)) == len(seeds_a)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), nearest.parameters()))


def test_nothing_is_drawn_when_nothing_is_rounded():
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), state_dtype=torch.float32)
    before = torch.get_rng_state()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(before, torch.get_rng_state())
    assert all("rounding_seed" not in s for s in optimizer.state.values())


def test_stochastic_bfloat16_is_unbiased_and_round_to_nearest_is_not():
    # Values a quarter of a bf16 step above 1: round to nearest always gives 1.
    x = torch.full((1 << 16,), 1.0 + 2.0**-9)
    words = ref.random_words(7, 3, 0, x.numel(), x.device)
    rounded = ref.stochastic_bfloat16(x, (words << 16) & 0xFFFFFFFF)
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(rounded.double().mean().item() - (1.0 + 2.0**-9)) < 2e-5
    assert torch.equal(x.bfloat16().float(), torch.ones_like(x))


def _v_hat_quality(state_dtype, stochastic, path):
    """Mean relative error of the decoded v_hat against float64 after 3000 steps whose
    gradient scale triples after 1000; magnitudes span five decades across blocks."""
    gen = torch.Generator().manual_seed(0)
    numel = 128 * 40
    block_scale = torch.logspace(-5, 0, 40).repeat_interleave(128)
    param64 = torch.nn.Parameter(torch.zeros(numel, dtype=torch.float64))
    param = torch.nn.Parameter(torch.zeros(numel))
    exact = kxops.optim.AdaX([param64], lr=0.0, weight_decay=0.0, betas=(0.9, 1e-3), **path)
    compact = kxops.optim.AdaX([param], lr=0.0, weight_decay=0.0, betas=(0.9, 1e-3),
                               state_dtype=state_dtype, stochastic_rounding=stochastic, **path)
    for t in range(3000):
        g = torch.randn(numel, generator=gen, dtype=torch.float64) * block_scale
        g *= 3.0 if t >= 1000 else 1.0
        param64.grad, param.grad = g, g.float()
        exact.step()
        compact.step()
    state = compact.state[param]
    scales = (state.get("exp_avg_scales"), state.get("exp_avg_sq_scales"))
    _, v = ref.load_moments(param, state["exp_avg"], state["exp_avg_sq"], scales)
    want = exact.state[param64]["exp_avg_sq"]
    return ((v.double() - want).abs() / want).mean().item()


@pytest.mark.parametrize("path", ["fused", "foreach"])
@pytest.mark.parametrize("state_dtype, bound", [(torch.bfloat16, 0.05), (torch.uint8, 0.10)])
def test_v_hat_follows_float64_through_a_gradient_scale_change(path, state_dtype, bound):
    assert _v_hat_quality(state_dtype, None, path_flags(path)) < bound


def test_round_to_nearest_freezes_a_bf16_v_hat():
    # What stochastic_rounding=False is documented to do: the x3 change never reaches v_hat.
    assert _v_hat_quality(torch.bfloat16, False, path_flags("foreach")) > 0.15


@pytest.mark.parametrize("path", ["fused", "foreach"])
def test_8bit_updates_stay_within_a_few_times_fp32_with_six_decades_in_one_block(path):
    flags = path_flags(path)
    magnitudes = torch.logspace(-6, 0, 128)
    params = [torch.nn.Parameter(torch.zeros(128)) for _ in range(2)]
    fp32 = kxops.optim.AdaX([params[0]], lr=1e-3, weight_decay=0.0, **flags)
    int8 = kxops.optim.AdaX([params[1]], lr=1e-3, weight_decay=0.0, state_dtype=torch.uint8,
                            **flags)
    gen = torch.Generator().manual_seed(0)
    largest = [torch.zeros(128), torch.zeros(128)]  # each element's largest update
    for _ in range(300):
        g = torch.randn(128, generator=gen) * magnitudes
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = g.clone()
        fp32.step()
        int8.step()
        for k, (p, b) in enumerate(zip(params, before)):
            largest[k] = torch.maximum(largest[k], (p.detach() - b).abs())
        v = int8.state[params[1]]
        decoded = ref.load_moments(params[1], v["exp_avg"], v["exp_avg_sq"],
                                   (v["exp_avg_scales"], v["exp_avg_sq_scales"]))[1]
        assert (decoded > 0).all()  # a non-zero v_hat never rounds to 0
        for p in params:
            p.data.copy_(before[0])  # compare single steps from the same params
    assert (largest[1] <= 4.0 * largest[0]).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_compact_state_with_grad_scale_and_found_inf(path):
    flags = path_flags(path)
    start = torch.randn(300)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    grads = torch.randn(300)
    opts = [kxops.optim.AdaXW([p], state_dtype=torch.uint8, **flags) for p in params]
    torch.manual_seed(0)
    params[0].grad = grads.clone()
    opts[0].step()
    torch.manual_seed(0)
    params[1].grad = grads * 1024.0
    opts[1].grad_scale = torch.tensor(1024.0)
    opts[1].found_inf = torch.tensor(0.0)
    opts[1].step()
    assert torch.equal(params[0], params[1])
    state = copy.deepcopy(opts[1].state[params[1]])
    opts[1].found_inf = torch.tensor(1.0)
    opts[1].step()
    for key, value in state.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(opts[1].state[params[1]][key]))


@pytest.mark.parametrize("path", list(PATHS))
def test_param_groups_with_different_state_dtypes(path):
    flags = path_flags(path)
    dtypes = [None, torch.float32, torch.bfloat16, torch.uint8]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(200)) for _ in dtypes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grouped = kxops.optim.AdaXW([dict(params=[p], state_dtype=d) for p, d in zip(params, dtypes)],
                                **flags)
    separate = [kxops.optim.AdaXW([p], state_dtype=d, **flags) for p, d in zip(alone, dtypes)]
    for step in range(3):
        g = [torch.randn(200) for _ in params]
        for p, q, gi in zip(params, alone, g):
            p.grad, q.grad = gi, gi.clone()
        torch.manual_seed(step)
        grouped.step()
        torch.manual_seed(step)
        for opt in separate:
            opt.step()
    want = [torch.float32, torch.float32, torch.bfloat16, torch.uint8]
    for p, d in zip(params, want):
        assert grouped.state[p]["exp_avg"].dtype == d
    # Seeds are drawn per group in one optimizer, per optimizer apart: same where none rounds.
    assert torch.equal(params[0], alone[0]) and torch.equal(params[1], alone[1])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8])
def test_complex_params_with_compact_state_step_as_their_real_views(path, state_dtype):
    flags = path_flags(path)
    z = torch.randn(3, 50, dtype=torch.complex64)
    complex_param = torch.nn.Parameter(z.clone())
    real_param = torch.nn.Parameter(torch.view_as_real(z).clone())
    opts = [kxops.optim.AdaXW([p], lr=1e-2, state_dtype=state_dtype, **flags)
            for p in (complex_param, real_param)]
    for _ in range(3):
        g = torch.randn(3, 50, dtype=torch.complex64)
        complex_param.grad, real_param.grad = g, torch.view_as_real(g).clone()
        for opt in opts:
            torch.manual_seed(0)
            opt.step()
    assert opts[0].state[complex_param]["exp_avg"].shape == (3, 50, 2)
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach())


@pytest.mark.parametrize("flags, state_dtype", [(dict(fused=True), torch.bfloat16),
                                                (dict(fused=True), torch.uint8),
                                                (dict(foreach=True), torch.bfloat16)])
def test_torch_compile_step_with_compact_state(flags, state_dtype):
    if flags.get("fused"):
        needs_kernel("adax_", "cpu")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(2)]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [kxops.optim.AdaXW(ps, state_dtype=state_dtype, **flags) for ps in (params, eager)]
    for ps in (params, eager):
        for p in ps:
            p.grad = torch.randn(300, generator=torch.Generator().manual_seed(1))
    for opt in opts:  # the first step draws the seeds (eagerly)
        torch.manual_seed(0)
        opt.step()
    compiled = torch.compile(opts[0].step)
    for _ in range(2):
        compiled()
        opts[1].step()
    for a, b in zip(params, eager):  # Inductor may contract the fp32 math differently
        assert_close(a.detach(), b.detach())


def test_bad_state_options():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=re.escape("state_dtype must be None, torch.float32, "
                                                   "torch.bfloat16 or torch.uint8")):
        kxops.optim.AdaX(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        kxops.optim.AdaXW(p, state_dtype="bf16")
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match="stochastic_rounding must be None, True or False"):
            kxops.optim.AdaX(p, stochastic_rounding=bad)
    optimizer = kxops.optim.AdaXW(p, state_dtype=torch.uint8, stochastic_rounding=False)
    assert optimizer.param_groups[0]["state_dtype"] is torch.uint8
    assert optimizer.param_groups[0]["stochastic_rounding"] is False


BAD_COMPACT_OP_ARGUMENTS = [
    ("no scales", dict(exp_avg_scales=None), ValueError, "uint8 state needs exp_avg_scales"),
    ("scale count", dict(exp_avg_scales=[torch.zeros(2)]), ValueError,
     r"exp_avg_scales\[0\] must have shape \(1,\)"),
    ("scale dtype", dict(exp_avg_sq_scales=[torch.zeros(1, dtype=torch.float64)]), TypeError,
     r"exp_avg_sq_scales\[0\] must be float32"),
    ("no seeds", dict(seeds=[], stochastic_rounding=True), ValueError, "one seed per param"),
    ("negative seed", dict(seeds=[-1]), ValueError, r"seeds\[0\] must be >= 0"),
    ("mixed moments", dict(exp_avg_sqs=[torch.zeros(5, dtype=torch.bfloat16)]), TypeError,
     r"exp_avg_sqs\[0\] has dtype torch.bfloat16 but must be torch.uint8"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_COMPACT_OP_ARGUMENTS,
                         ids=[case[0] for case in BAD_COMPACT_OP_ARGUMENTS])
def test_compact_op_checks_its_arguments_before_touching_memory(name, change, error, message):
    needs_kernel("adax_", "cpu")
    args = dict(params=[torch.ones(5)], grads=[torch.ones(5)],
                exp_avgs=[torch.zeros(5, dtype=torch.uint8)],
                exp_avg_sqs=[torch.zeros(5, dtype=torch.uint8)], state_steps=[torch.zeros(())],
                exp_avg_scales=[torch.zeros(1)], exp_avg_sq_scales=[torch.zeros(1)], seeds=[1],
                stochastic_rounding=True)
    args.update(change)
    before = {k: [t.clone() for t in v] for k, v in args.items()
              if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)}
    with pytest.raises(error, match=message):
        torch.ops.kxops.adax_(**args, lr=0.1, beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-8,
                              decoupled=True, maximize=False)
    for key, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(args[key], tensors))


# --- compact state in checkpoints -------------------------------------------------------------

def _saved(state_dtype, steps=3, **flags):
    model, optimizer = _train_compact(state_dtype, 0, steps=steps, **flags)
    return model, optimizer, copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8])
def test_compact_state_dict_resumes_bit_for_bit(path, state_dtype, tmp_path):
    flags = path_flags(path)
    model, optimizer, saved = _saved(state_dtype, **flags)
    state = next(iter(saved["state"].values()))
    assert state["exp_avg"].dtype == state_dtype and isinstance(state["rounding_seed"], int)
    if state_dtype == torch.uint8:
        assert state["exp_avg_scales"].dtype == torch.float32
    torch.save(saved, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    saved_model = copy.deepcopy(model.state_dict())
    _train(model, optimizer, 3, seed=2)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    resumed_opt = kxops.optim.AdaXW(resumed.parameters(), lr=1e-2, state_dtype=state_dtype,
                                    **flags)
    resumed_opt.load_state_dict(loaded)
    _train(resumed, resumed_opt, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved_dtype", [None, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("loading_dtype", [None, torch.float32, torch.bfloat16, torch.uint8])
def test_load_state_dict_converts_to_the_loading_optimizers_state_dtype(saved_dtype,
                                                                      loading_dtype):
    model, optimizer, saved = _saved(saved_dtype)
    loading = kxops.optim.AdaXW(model.parameters(), lr=1e-2, state_dtype=loading_dtype)
    loading.load_state_dict(saved)
    assert loading.param_groups[0]["state_dtype"] is loading_dtype
    for p in model.parameters():
        state, original = loading.state[p], optimizer.state[p]
        assert state["exp_avg"].dtype == ref.state_dtype(p.dtype, loading_dtype)
        assert state["step"].item() == 3
        got = ref.load_moments(p, state["exp_avg"], state["exp_avg_sq"],
                               (state.get("exp_avg_scales"), state.get("exp_avg_sq_scales")))
        want = ref.load_moments(p, original["exp_avg"], original["exp_avg_sq"],
                                (original.get("exp_avg_scales"),
                                 original.get("exp_avg_sq_scales")))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.07, atol=1e-6 * b.abs().max())
    _train(model, loading, 1)


@pytest.mark.parametrize("key, bad", [("exp_avg_scales", torch.zeros(3)),
                                      ("exp_avg_sq_scales", None),
                                      ("exp_avg", torch.zeros(2, dtype=torch.uint8))])
def test_mismatching_compact_state_is_refused_before_anything_changes(key, bad):
    model, _, saved = _saved(torch.uint8)
    target = kxops.optim.AdaXW(model.parameters(), lr=1e-2, state_dtype=torch.uint8)
    _train(model, target, 1)
    before = copy.deepcopy(target.state_dict())
    first = next(iter(saved["state"]))
    if bad is None:
        del saved["state"][first][key]
    else:
        saved["state"][first][key] = bad
    saved["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=re.escape(f"['{key}']")):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, state in before["state"].items():
        for k, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][i][k]))


# --- what an attack found ---------------------------------------------------------------------

def _set_moments_dtype(state, dtype):
    state["exp_avg"], state["exp_avg_sq"] = (state[k].to(dtype) for k in ("exp_avg", "exp_avg_sq"))


def _set_first_scale(bits):
    def corrupt(state):
        state["exp_avg_sq"].view(-1)[0] = 200  # a nonzero code under the block's scale
        state["exp_avg_sq_scales"][0] = torch.tensor([bits], dtype=torch.int64).to(
            torch.int32).view(torch.float32)[0]
    return corrupt


CORRUPT_SAVED_STATE = [
    ("int16 codes", lambda s: _set_moments_dtype(s, torch.int16), "['exp_avg']"),
    ("bool codes", lambda s: _set_moments_dtype(s, torch.bool), "['exp_avg']"),
    ("int scales", lambda s: s.update(exp_avg_scales=s["exp_avg_scales"].int()),
     "['exp_avg_scales'] must be float32"),
    ("negative seed", lambda s: s.update(rounding_seed=-3), "['rounding_seed']"),
    ("seed of 2**64", lambda s: s.update(rounding_seed=2**64), "['rounding_seed']"),
    ("float seed", lambda s: s.update(rounding_seed=1.5), "['rounding_seed']"),
    ("bool seed", lambda s: s.update(rounding_seed=True), "['rounding_seed']"),
    ("str seed", lambda s: s.update(rounding_seed="7"), "['rounding_seed']"),
    ("None seed", lambda s: s.update(rounding_seed=None), "['rounding_seed']"),
    ("tensor seed", lambda s: s.update(rounding_seed=torch.tensor(float(s["rounding_seed"]))),
     "['rounding_seed']"),
    # Scales the optimizer never writes, which the fused tables and the formula decode apart.
    *((f"scale {name}", _set_first_scale(bits), "['exp_avg_sq_scales'][0]")
      for name, bits in [("negative", 0xBF800000), ("with mantissa bits", 0x3FC00000),
                         ("denormal", 0x00400000), ("below 2**-100", 0x0B800000),
                         ("0 over codes", 0)]),
]


@pytest.mark.parametrize("loading_dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("name, corrupt, message", CORRUPT_SAVED_STATE,
                         ids=[case[0] for case in CORRUPT_SAVED_STATE])
def test_corrupt_saved_state_is_refused_before_anything_changes(name, corrupt, message,
                                                                loading_dtype):
    # Codes of another integer dtype were read as moments (or failed half-way through the
    # load), and a seed that is no int in [0, 2^63) was truncated, kept, or raised after the
    # base class had replaced the state.
    model, _, saved = _saved(torch.uint8)
    target = kxops.optim.AdaXW(model.parameters(), lr=1e-2, state_dtype=loading_dtype)
    _train(model, target, 1)
    before = copy.deepcopy(target.state_dict())
    corrupt(saved["state"][len(saved["state"]) - 1])
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, state in before["state"].items():
        assert state.keys() == after["state"][i].keys()
        for k, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][i][k]))


def test_bad_state_options_of_a_param_group():
    # A group's own state_dtype / stochastic_rounding (constructor groups, add_param_group, or
    # changed later) went unchecked: fp16 state, or torch's foreach error after the state was
    # already created.
    p, q = (torch.nn.Parameter(torch.randn(3)) for _ in range(2))
    with pytest.raises(ValueError, match="state_dtype must be None"):
        kxops.optim.AdaX([{"params": [p], "state_dtype": torch.float16}])
    with pytest.raises(TypeError, match="stochastic_rounding must be None, True or False"):
        kxops.optim.AdaX([{"params": [p], "stochastic_rounding": "yes"}])
    optimizer = kxops.optim.AdaXW([p], foreach=True)
    with pytest.raises(ValueError, match="state_dtype must be None"):
        optimizer.add_param_group({"params": [q], "state_dtype": torch.int8})
    optimizer.add_param_group({"params": [q], "state_dtype": torch.uint8})
    optimizer.param_groups[1]["state_dtype"] = torch.float16
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    before = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(ValueError, match="state_dtype must be None"):
        optimizer.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    assert len(optimizer.state) == 0
    with pytest.raises(ValueError, match="state_dtype must be None"):  # no numpy __eq__ error
        kxops.optim.AdaX([p], state_dtype=__import__("numpy").array([1, 2]))


@pytest.mark.parametrize("path", list(PATHS))
def test_block_scales_are_float32_whatever_the_default_dtype(path):
    # The scales were made in the default dtype: float64 scales (2.125 bytes per param, and
    # the fused kernel refused them with a TypeError).
    flags = path_flags(path)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.nn.Parameter(torch.randn(300, dtype=torch.float32))
        p.grad = torch.randn(300, dtype=torch.float32)
        optimizer = kxops.optim.AdaXW([p], state_dtype=torch.uint8, **flags)
        optimizer.step()
        loading = kxops.optim.AdaXW([p], state_dtype=torch.uint8, **flags)
        loading.load_state_dict(optimizer.state_dict())
    finally:
        torch.set_default_dtype(default)
    for state in (optimizer.state[p], loading.state[p]):
        assert state["exp_avg_scales"].dtype == state["exp_avg_sq_scales"].dtype == torch.float32


@pytest.mark.parametrize("state_dtype, stochastic", [(torch.uint8, False),
                                                     (torch.float32, True)])
def test_op_refuses_a_seed_list_of_another_length(state_dtype, stochastic):
    needs_kernel("adax_", "cpu")
    result = run_isolated(f"""
        import torch, kxops
        n = 3
        params = [torch.randn(300) for _ in range(n)]
        scales = [torch.zeros(3) for _ in range(n)]
        try:
            torch.ops.kxops.adax_(
                params, [torch.randn(300) for _ in range(n)],
                [torch.zeros(300, dtype={state_dtype}) for _ in range(n)],
                [torch.zeros(300, dtype={state_dtype}) for _ in range(n)],
                [torch.zeros(()) for _ in range(n)], exp_avg_scales=scales,
                exp_avg_sq_scales=[s.clone() for s in scales], seeds=[1],
                stochastic_rounding={stochastic}, lr=0.1, beta1=0.9, beta2=1e-4,
                weight_decay=0.0, eps=1e-8, decoupled=True, maximize=False)
            print("no error")
        except ValueError as e:
            print("ValueError", e)
    """)
    assert result.returncode == 0, result.stderr
    assert "ValueError" in result.stdout and "seed" in result.stdout, result.stdout


_EVERY_LIST_ELEMENT_WRONG = """
import torch, kxops
WRONG = {"int": lambda t: t.int(), "float64": lambda t: t.double(),
         "bigger": lambda t: torch.zeros([s + 1 for s in t.shape] or [2], dtype=t.dtype),
         "extra dim": lambda t: t[..., None, None], "0-dim": lambda t: t.reshape(-1)[0].clone(),
         "meta": lambda t: t.to("meta"), "empty": lambda t: t.reshape(-1)[:0],
         "expanded": lambda t: torch.zeros(1).expand(3)}
LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")
for name in LISTS + ("lr", "grad_scale", "found_inf"):
    for how, wrong in WRONG.items():
        lists = dict(params=[torch.randn(4), torch.randn(4)],
                     grads=[torch.randn(4), torch.randn(4)],
                     exp_avgs=[torch.zeros(4), torch.zeros(4)],
                     exp_avg_sqs=[torch.zeros(4), torch.zeros(4)],
                     state_steps=[torch.zeros(()), torch.zeros(())])
        kw = dict(lr=torch.tensor(1e-2), grad_scale=torch.tensor(1.0),
                  found_inf=torch.tensor(0.0))
        if name in LISTS:
            lists[name][1] = wrong(lists[name][1])
        else:
            kw[name] = wrong(kw[name])
        before = [t.clone() for k in LISTS if k != "grads" for t in lists[k] if not t.is_meta]
        print(name, how, end=" | ", flush=True)  # names a crashing case
        try:
            torch.ops.kxops.adax_.tensor_lr(*lists.values(), **kw, beta1=0.9, beta2=1e-4,
                                            weight_decay=0.0, eps=1e-8, decoupled=True,
                                            maximize=False)
            print("ok")
        except Exception as e:
            after = [t for k in LISTS if k != "grads" for t in lists[k] if not t.is_meta]
            untouched = all(torch.equal(a, b) for a, b in zip(before, after))
            print(type(e).__name__ + ": " + str(e).splitlines()[0],
                  "" if untouched else "| MODIFIED")
"""


def test_every_argument_wrong_in_turn_never_crashes():
    """Each tensor argument of kxops::adax_ (a list's second element, or lr, grad_scale,
    found_inf) wrong in turn (dtype, shape, rank, meta device, empty, expanded), in a
    subprocess: never a crash, and either accepted or refused by the op's own check (its
    prefix) with every tensor left as it was."""
    needs_kernel("adax_", "cpu")
    result = run_isolated(_EVERY_LIST_ELEMENT_WRONG)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert len(lines) == 8 * 8, result.stdout  # every case ran
    for line in lines:
        said = line.split(" | ")[1]
        assert said == "ok" or said.partition(": ")[2].startswith("kxops.adax_: "), line
        assert "MODIFIED" not in line, line


@pytest.mark.xfail(strict=True, reason="maximize negates the grad as g * -1 in the kernels "
                   "(adax_math.h update: a NaN keeps its sign) but as -g in the reference and "
                   "foreach path (the sign flips): a NaN moment's 8-bit code differs in its sign "
                   "bit (127 vs 255, decoding to +max vs -max). Not fixed: adax_math.h is shared "
                   "with CUDA, and which side should change is a design choice")
@pytest.mark.parametrize("state_dtype", [torch.uint8, torch.bfloat16])
def test_fused_maximize_nan_grad_codes_as_the_reference(state_dtype):
    needs_kernel("adax_", "cpu")
    results = []
    for path in ("AVX2", "AVX512", None):
        if path is not None:
            try:
                torch.ops.kxops._set_adax_cpu_kernel(path)
            except ValueError:
                continue
        try:
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.ones(4))
            opt = kxops.optim.AdaX([p], fused=path is not None, foreach=False if path is None
                                   else None, state_dtype=state_dtype, maximize=True,
                                   stochastic_rounding=False)
            p.grad = torch.tensor([1.0, float("nan"), -2.0, 0.5])
            opt.step()
            m = opt.state[p]["exp_avg"]
            results.append(m.view(torch.int16) if m.dtype == torch.bfloat16 else m)
        finally:
            torch.ops.kxops._set_adax_cpu_kernel("auto")
    *fused, loop = results
    for got in fused:
        assert torch.equal(got, loop)


def _eight_bit_step_from_scales(scale_bits, fused):
    """One step of an fp32 param (two blocks per scale) from every code under the given raw
    scale bits; returns (codes of m, codes of v, m scales, v scales)."""
    n = len(scale_bits)
    p = torch.linspace(-1, 1, 256 * n)
    m = torch.arange(256, dtype=torch.uint8).repeat(n)
    v = m.flip(0).clone()
    scales = torch.tensor(scale_bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    m_scales, v_scales = scales.repeat_interleave(2), scales.repeat_interleave(2).clone()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-12,
                 decoupled=False, maximize=False)
    adax([p], [torch.zeros_like(p)], [m], [v], [torch.tensor(5.0)], **hyper,
         exp_avg_scales=[m_scales], exp_avg_sq_scales=[v_scales], seeds=[1],
         stochastic_rounding=False, **(dict(fused=True) if fused else dict(foreach=False,
                                                                             fused=False)))
    return m, v, m_scales, v_scales


def _in_each_cpu_kernel(run):
    """run()'s results under each copy of the CPU kernel this build and CPU have."""
    results = []
    for kernel in CPU_KERNELS:
        try:
            torch.ops.kxops._set_adax_cpu_kernel(kernel)
        except ValueError:
            continue
        try:
            results.append(run())
        finally:
            torch.ops.kxops._set_adax_cpu_kernel("auto")
    return results


@pytest.mark.parametrize("scale_bits", [0xBF800000, 0x3FC00000, 0x00400000, 0x0B800000, 0],
                         ids=["negative", "mantissa", "denormal", "below_floor", "zero"])
def test_fused_eight_bit_decode_of_noncanonical_scales_as_the_reference(scale_bits):
    """Scales the optimizer never writes (load_state_dict refuses them, the functional adax
    does not scan for them): every path decodes by the scale's exponent bits alone, wrapping
    as decode_magnitude's unsigned arithmetic does (exponent 0: codes near the top decode to
    negative NaNs and infs), and stores the same bits."""
    needs_kernel("adax_", "cpu")
    want = _eight_bit_step_from_scales([scale_bits], fused=False)
    for got in _in_each_cpu_kernel(lambda: _eight_bit_step_from_scales([scale_bits],
                                                                       fused=True)):
        for a, b in zip(got, want):
            assert torch.equal(a.view(-1).float().nan_to_num(7), b.view(-1).float().nan_to_num(7))


def test_fused_eight_bit_decode_of_every_canonical_scale_as_the_reference():
    """Every code under every scale the format writes (2^-100 .. 2^127): the vector decode
    equals the formula, so codes and scales match the reference bit for bit in both copies."""
    needs_kernel("adax_", "cpu")
    scale_bits = [e << 23 for e in range(27, 255)]
    want = _eight_bit_step_from_scales(scale_bits, fused=False)
    for got in _in_each_cpu_kernel(lambda: _eight_bit_step_from_scales(scale_bits, fused=True)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
