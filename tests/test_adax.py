"""AdaX / AdaX-W: the reference against the authors' recurrence, the foreach path against the
reference, the optimizer classes, GradScaler's protocol and bad inputs."""

import copy
import math

import pytest
import torch

import kxops
from kxops import _ext
from kxops.adax import adax
from kxops.reference import adax as ref
from tests.conftest import assert_close, cuda_with_memory

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
    fused_expected = all(_ext.has_kernel("adax_", t.device) for t in p)
    assert adaxw_defaults["fused"] == fused_expected


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
    with pytest.raises(RuntimeError, match="cannot both be True"):
        kxops.optim.AdaXW(params, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        kxops.optim.AdaXW(params, fused=True, differentiable=True)
    if not _ext.has_kernel("adax_", torch.device("cpu")):
        with pytest.raises(RuntimeError, match="no compiled AdaX kernel"):
            kxops.optim.AdaXW(params, fused=True)
    embedding = torch.nn.Embedding(4, 3, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        kxops.optim.AdaXW(embedding.parameters()).step()


# --- the compiled fused step, wherever a kernel is registered -------------------------------

def needs_kernel(device):
    if not _ext.has_kernel("adax_", torch.device(device)):
        pytest.skip(f"no compiled kxops::adax_ kernel for {device} yet")


def _device_states(params, device):
    exp_avgs, exp_avg_sqs, _ = _states(params)
    return exp_avgs, exp_avg_sqs, [torch.zeros((), device=device) for _ in params]


# Odd sizes for the vector tails, one over a CPU slice (16384) and a CUDA chunk boundary.
FUSED_SHAPES = [(3, 4), (7,), (1,), (2, 2, 2), (33000,), (0,)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_matches_for_loop(device, dtype, decoupled, maximize, tensor_lr):
    needs_kernel(device)
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
    needs_kernel(device)
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
    needs_kernel(device)
    p = torch.ones(4, device=device)
    m, v = torch.zeros(4, device=device), torch.full((4,), 0.25, device=device)
    step = torch.tensor(1e7, device=device)
    adax([p], [torch.full((4,), 0.5, device=device)], [m], [v], [step], fused=True, lr=1e-3,
         beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-12, decoupled=True, maximize=False)
    assert torch.isfinite(v).all() and torch.isfinite(p).all()
    assert (1 - p).abs().min() > 1e-6


def test_fused_grad_scale_and_found_inf(device):
    needs_kernel(device)
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
    needs_kernel(device)
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
    needs_kernel(device)
    params = [torch.randn(s, device=device) for s in [(3, 4), (9,)]]
    grads = [torch.randn_like(p) for p in params]
    state = _device_states(params, device)
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=1e-4, weight_decay=0.05, eps=1e-8, decoupled=True,
                  maximize=False)
    torch.library.opcheck(torch.ops.kxops.adax_.default, (params, grads, *state), kwargs)
    kwargs["lr"] = torch.tensor(1e-2, device=device)
    torch.library.opcheck(torch.ops.kxops.adax_.tensor_lr, (params, grads, *state), kwargs)


@pytest.mark.parametrize("make_bad, message", [
    (lambda p, g, m, v, s: (p, g + g, m, v, s), "same length"),
    (lambda p, g, m, v, s: (p, [g[0].double()], m, v, s), "grads\\[0\\] has dtype"),
    (lambda p, g, m, v, s: (p, g, [m[0][:2]], v, s), "shape and strides"),
    (lambda p, g, m, v, s: (p, g, m, v, [s[0].double()]), "float32"),
    (lambda p, g, m, v, s: ([p[0].long()], g, m, v, s), "floating point"),
])
def test_fused_bad_inputs(make_bad, message):
    needs_kernel("cpu")
    p = [torch.randn(4)]
    lists = make_bad(p, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)],
                     [torch.zeros(())])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kxops.adax_(*lists, lr=1e-2, beta1=0.9, beta2=1e-4, weight_decay=0.0,
                              eps=1e-8, decoupled=True, maximize=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_the_fused_step():
    needs_kernel("cuda")
    model = _model().cuda()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2, fused=True, capturable=True)
    eager_model = copy.deepcopy(model)
    eager_opt = kxops.optim.AdaXW(eager_model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 6, device="cuda")
    for m in (model, eager_model):
        m(x).square().mean().backward()
    optimizer.step()  # state is created outside the capture
    eager_opt.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert_close(a.detach(), b.detach())
    assert optimizer.state[next(model.parameters())]["step"].item() == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_hundreds_of_tensors_in_one_step():
    """More tensors than fit in one launch's kernel arguments in PyTorch's fused Adam."""
    needs_kernel("cuda")
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
    needs_kernel("cuda")
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
