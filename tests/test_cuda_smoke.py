"""The first thing a GPU session runs: every op and optimizer path once on small CUDA tensors
against the reference, forward and backward, in seconds. The thorough CUDA tests live beside
each op's CPU tests (marked cuda)."""

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
    """Every block runs its compiled kernel on CUDA (not the reference fallback)."""
    for block in _ext.BLOCK_OPS:
        assert _ext.block_has_kernels(block, "cuda"), (block, _ext.LOAD_STATUS)


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
