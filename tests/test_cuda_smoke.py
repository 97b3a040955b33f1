"""The first thing a GPU session runs: every op and optimizer path once on small CUDA tensors
against the reference, forward and backward, in seconds. The thorough CUDA tests live beside
each op's CPU tests (marked cuda)."""

import warnings

import pytest
import torch

import kxops
from kxops import _ext

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def full_fp32():
    """The references' convolutions and GEMMs in full fp32 (no TF32), so a difference is ours."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_smoke_backends():
    """Every family runs its compiled kernel on CUDA (not the reference fallback)."""
    for family in _ext.OP_FAMILIES:
        assert _ext.family_has_kernels(family, "cuda"), (family, _ext.LOAD_STATUS)


def outputs_and_grads(fn, *inputs):
    """fn(*inputs) and the gradients of its sum (times a fixed random weight) by every input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * weight).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]


def assert_matches_reference(op, reference, *inputs, atol=1e-5, rtol=1e-5):
    ours = outputs_and_grads(op, *inputs)
    theirs = outputs_and_grads(reference, *inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("projection", [False, True])
def test_cuda_smoke_gated_conv(projection):
    cuda = torch.device("cuda")
    B, T, C = 3, 37, 24
    out = 40 if projection else C
    x = torch.randn(B, T, C, device=cuda)
    w = torch.randn(2 * out, C, 3, device=cuda) / C**0.5
    b = torch.randn(2 * out, device=cuda)
    mask = torch.arange(T, device=cuda)[None] < torch.tensor([[T], [20], [1]], device=cuda)
    extra = []
    if projection:
        extra = [torch.randn(out, C, 1, device=cuda) / C**0.5, torch.randn(out, device=cuda)]

    def call(fn):
        def run(x, w, b, *residual):
            kwargs = dict(residual_weight=residual[0], residual_bias=residual[1]) if residual \
                else {}
            return fn(x, w, b, mask, dilation=2, **kwargs)
        return run

    assert_matches_reference(call(kxops.dilated_gated_conv1d),
                             call(kxops.reference.dilated_gated_conv1d), x, w, b, *extra)


@pytest.mark.parametrize("labels", ["hard", "soft", "sparse"])
@pytest.mark.parametrize("classes", [33, 5000])  # a warp per row, a block per row
def test_cuda_smoke_zlpr(labels, classes):
    cuda = torch.device("cuda")
    logits = torch.randn(6, classes, device=cuda) * 3
    logits[0, :3] = float("-inf")
    if labels == "sparse":
        positives = torch.randint(0, classes, (6, 4), device=cuda)
        positives[1, 2:] = -1
        assert_matches_reference(lambda s: kxops.sparse_zlpr_loss(s, positives, reduction="none"),
                                 lambda s: kxops.reference.sparse_zlpr_loss(
                                     s, positives, reduction="none"), logits)
        return
    target = torch.rand(6, classes, device=cuda)
    target = (target < 0.05).float() if labels == "hard" else target
    assert_matches_reference(lambda s: kxops.zlpr_loss(s, target, reduction="none"),
                             lambda s: kxops.reference.zlpr_loss(s, target, reduction="none"),
                             logits)


FLAGS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
         "for_loop": dict(foreach=False, fused=False),
         "capturable": dict(foreach=True, capturable=True)}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("optimizer", ["AdaX", "AdaXW"])
def test_cuda_smoke_adax(optimizer, flags):
    """Three steps on CUDA (fp32 and bf16 params) against the same steps of the CPU for-loop."""
    shapes = [(5, 7), (1,), (300,), (0,)]
    cpu = [torch.randn(s, dtype=torch.float64) for s in shapes]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    params = [torch.nn.Parameter(p.to("cuda", dtype)) for p, dtype in zip(cpu, dtypes)]
    expected = [torch.nn.Parameter(p.to(dtype).double()) for p, dtype in zip(cpu, dtypes)]
    cls = getattr(kxops.optim, optimizer)
    ours = cls(params, lr=1e-2, **FLAGS[flags])
    theirs = cls(expected, lr=1e-2, foreach=False, fused=False)
    for step in range(3):
        for p, q in zip(params, expected):
            g = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator()
                            .manual_seed(step))
            p.grad, q.grad = g.to("cuda", p.dtype), g.to(p.dtype).double()
        ours.step()
        theirs.step()
    for p, q in zip(params, expected):
        tolerance = 2e-2 if p.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(p.detach().cpu().double(), q.detach(), atol=tolerance,
                                   rtol=tolerance)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("flags", ["fused", "foreach"])
def test_cuda_smoke_adax_low_bit_state(state_dtype, flags):
    """Three steps with bf16 or 8-bit state on CUDA against the same steps of the CPU's fused
    kernel: the same seed, so the same rounding stream (fp32 and bf16 params; sizes around the
    8-bit block of 128)."""
    shapes = [(5, 7), (1,), (300,), (129,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    start = [torch.randn(s).to(dtype) for s, dtype in zip(shapes, dtypes)]
    runs = {}
    for device, path in (("cuda", FLAGS[flags]), ("cpu", FLAGS["fused"])):
        params = [torch.nn.Parameter(p.to(device)) for p in start]
        opt = kxops.optim.AdaXW(params, lr=1e-2, state_dtype=state_dtype, **path)
        torch.manual_seed(0)  # the rounding seed is drawn from here at the first step
        for step in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                p.grad = g.to(device, p.dtype)
            opt.step()
        runs[device] = [p.detach().cpu().float() for p in params]
    for ours, theirs in zip(runs["cuda"], runs["cpu"]):
        torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_smoke_grad_filter(reduction):
    """Both fused heads with the gradient filter on CUDA against their filtered references."""
    cuda = torch.device("cuda")
    x, w, b = torch.randn(9, 16, device=cuda), torch.randn(300, 16, device=cuda) / 4, \
        torch.randn(300, device=cuda) - 4
    positives = torch.randint(0, 300, (9, 3), device=cuda)

    def linear(fn):
        return lambda x, w, b: fn(x, w, positives, b, reduction=reduction, grad_filter=2**-8)

    assert_matches_reference(linear(kxops.linear_sparse_zlpr_loss),
                             linear(kxops.reference.linear_sparse_zlpr_loss), x, w, b)
    q, k = torch.randn(2, 3, 20, 8, device=cuda), torch.randn(2, 3, 20, 8, device=cuda)
    spans = torch.randint(0, 400, (2, 3, 4), device=cuda)

    def pointer(fn):
        return lambda q, k: fn(q, k, spans, reduction=reduction, grad_filter=2**-8)

    assert_matches_reference(pointer(kxops.global_pointer_zlpr_loss),
                             pointer(kxops.reference.global_pointer_zlpr_loss), q, k)


def sparse_product_grads(fn, inputs, device):
    """fn's output and gradients with every input moved to device, back on the CPU."""
    return [t.cpu() for t in outputs_and_grads(fn, *[t.to(device) for t in inputs])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_smoke_grad_filter_sparse_products(monkeypatch, reduction, dtype):
    """The filtered gradients' sparse products on CUDA (CSR through at:: ops, the products in
    cuda/sparse_grad.cu): a trained-like linear head (about 1% of the entries survive) and a
    GlobalPointer forced sparse, against the CPU's filtered gradients and the dense CUDA GEMMs
    (KXOPS_SPARSE_GRAD_MAX_DENSITY=0) on the same filtered gradient; the same bits run twice
    (no atomics)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(2000, 48, generator=gen, dtype=dtype), dim=1)
    positives = torch.randint(0, 2000, (64, 3), generator=gen)
    x = 8 * w[positives].sum(1) + 0.3 * torch.randn(64, 48, generator=gen, dtype=dtype)
    b = torch.full((2000,), -12.0, dtype=dtype)
    grad = torch.ops.kxops.sparse_zlpr(torch.nn.functional.linear(x, w, b), positives, -1,
                                       [True], "none", 2**-12)[1]
    assert 0 < (grad != 0).double().mean() < 0.05  # the default rule picks the sparse products

    def linear(x, w, b):
        return kxops.linear_sparse_zlpr_loss(x, w, positives.to(x.device), b,
                                             reduction=reduction, grad_filter=2**-12,
                                             block_rows=24)

    q, k = torch.randn(2, 3, 20, 8, dtype=dtype) * 2, torch.randn(2, 3, 20, 8, dtype=dtype) * 2
    spans = torch.randint(0, 400, (2, 3, 4))

    def pointer(q, k):
        return kxops.global_pointer_zlpr_loss(q, k, spans.to(q.device), reduction=reduction,
                                              grad_filter=2**-8)

    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    for fn, inputs, density in ((linear, (x, w, b), None), (pointer, (q, k), "1")):
        if density is not None:
            monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", density)
        cpu = sparse_product_grads(fn, inputs, "cpu")
        sparse = sparse_product_grads(fn, inputs, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(sparse, sparse_product_grads(fn, inputs,
                                                                                  "cuda")))
        monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", "0")
        dense = sparse_product_grads(fn, inputs, "cuda")
        monkeypatch.delenv("KXOPS_SPARSE_GRAD_MAX_DENSITY")
        for ours, want in ((sparse, cpu), (sparse, dense)):
            for a, b in zip(ours, want):
                torch.testing.assert_close(a, b, equal_nan=True, **tolerance)


def synchronisations(fn):
    """How many synchronising CUDA operations fn() runs (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_smoke_global_pointer_filtered_chunks(monkeypatch, dtype):
    """The GlobalPointer's filtered step on CUDA over five row blocks, one too dense (its dense
    GEMMs between the sparse products of the others), one head per chunk: one device sync per
    chunk (the (head, block) counts), against the CPU's result and the dense CUDA GEMMs
    (KXOPS_SPARSE_GRAD_MAX_DENSITY=0); the same bits run twice."""
    gen = torch.Generator().manual_seed(4)
    batch, heads, length = 2, 2, 300
    q = 0.05 * torch.randn(batch, heads, length, 8, generator=gen, dtype=dtype)
    k = 0.05 * torch.randn(batch, heads, length, 8, generator=gen, dtype=dtype)
    q[..., -1], k[..., -1] = 4.0, -3.0
    q[:, :, 128:141, -1] = 0.0  # about a fifth of block 2's spans survive, few elsewhere
    pos = torch.tensor([[[3 * length + 10, 270 * length + 280]] * heads] * batch)

    def step(device, grad_filter=2**-12):
        out = torch.ops.kxops.global_pointer_zlpr(
            q.to(device), k.to(device), pos.to(device), None, None, None, True, -1, "sum",
            [True, True, False, False], 1, grad_filter)
        return [t.cpu() for t in out[:3]]

    cpu, sparse = step("cpu"), step("cuda")
    assert all(torch.equal(a, b) for a, b in zip(sparse, step("cuda")))
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", "0")
    dense = step("cuda")
    monkeypatch.delenv("KXOPS_SPARSE_GRAD_MAX_DENSITY")
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    for want in (cpu, dense):
        for a, b in zip(sparse, want):
            torch.testing.assert_close(a, b, **tolerance)
    filtered = synchronisations(lambda: step("cuda"))
    plain = synchronisations(lambda: step("cuda", 0.0))
    assert filtered - plain == batch * heads

