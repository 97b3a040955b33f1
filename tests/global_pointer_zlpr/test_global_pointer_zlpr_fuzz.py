"""GlobalPointer + sparse ZLPR fuzz: the compiled op against the materialised path (the grid +
kxops.sparse_zlpr_loss) over random shapes, masks, biases, budgets, positives, reductions,
gradient filters and NaN/inf at random positions (loss and gradients). The hypothesis profile
is set in conftest."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kxops
from kxops.reference import global_pointer_zlpr as ref
from tests.utils import assert_close, needs_kernel

pytestmark = pytest.mark.fuzz

SPECIALS = [math.nan, math.inf, -math.inf]
ENV = ("KXOPS_SPARSE_GRAD_PORTABLE", "KXOPS_SPARSE_GRAD_MAX_DENSITY")


@st.composite
def problems(draw):
    batch = draw(st.integers(0, 3))
    heads = draw(st.integers(1, 3))
    # Both sides of the row blocks' quantum (64) and of eight blocks of it (512).
    length = draw(st.sampled_from([0, 1, 2, 5, 63, 64, 65, 100, 130, 513]))
    dim = draw(st.integers(1, 6))
    return dict(
        shape=(batch, heads, length, dim), tril=draw(st.booleans()),
        start=draw(st.booleans()), end=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "bool", "int", "float"])),
        keep=draw(st.floats(0.0, 1.0)), positives=draw(st.integers(0, 5)),
        block_bytes=draw(st.sampled_from([None, 1, 10_000])),
        specials=draw(st.integers(0, 2)), reduction=draw(st.sampled_from(["none", "sum", "mean"])),
        grad_filter=draw(st.sampled_from([0.0, 2.0**-12, 2.0**-3])),
        seed=draw(st.integers(0, 2**16)))


@given(problems())
def test_op_matches_materialised(p):
    needs_kernel("global_pointer_zlpr", "cpu")
    generator = torch.Generator().manual_seed(p["seed"])
    batch, heads, length, _ = p["shape"]

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    q, k = randn(*p["shape"]), randn(*p["shape"])
    sb = randn(batch, heads, length) if p["start"] else None
    eb = randn(batch, heads, length) if p["end"] else None
    mask = None
    if p["mask"] is not None:
        mask = torch.rand(batch, length, generator=generator) < p["keep"]
        mask = mask.to({"bool": torch.bool, "int": torch.int32, "float": torch.float32}[p["mask"]])
    spans = max(length * length, 1)
    pos = torch.randint(-1, spans, (batch, heads, p["positives"]), generator=generator)
    leaves = [t for t in (q, k, sb, eb) if t is not None]
    special_in_qk = False
    for _ in range(p["specials"]):
        t = leaves[int(torch.randint(0, len(leaves), (1,), generator=generator))]
        if t.numel():
            special_in_qk |= t is q or t is k
            t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=generator))] = SPECIALS[
                int(torch.randint(0, 3, (1,), generator=generator))]
    if length == 0:
        pos.fill_(-1)

    def run(fn, **kwargs):
        copies = [None if t is None else t.clone().requires_grad_(True) for t in (q, k, sb, eb)]
        loss = fn(copies[0], copies[1], pos, mask, start_bias=copies[2], end_bias=copies[3],
                  tril=p["tril"], reduction=p["reduction"], **kwargs)
        present = [t for t in copies if t is not None]
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
        grads = torch.autograd.grad((loss * weights).sum(), present) if loss.numel() else [
            torch.zeros_like(t) for t in present]
        return loss, grads

    def materialised(q, k, pos, mask, *, start_bias, end_bias, tril, reduction, grad_filter):
        grid = ref.global_pointer_logits(q, k, mask, start_bias=start_bias, end_bias=end_bias,
                                         tril=tril)
        return kxops.sparse_zlpr_loss(grid.flatten(-2), pos, reduction=reduction,
                                      grad_filter=grad_filter)

    loss, grads = run(kxops.global_pointer_zlpr_loss, block_bytes=p["block_bytes"],
                      grad_filter=p["grad_filter"])
    expected_loss, expected_grads = run(materialised, grad_filter=p["grad_filter"])
    assert_close(loss, expected_loss)
    for i, (g, g_expected) in enumerate(zip(grads, expected_grads)):
        if i < 2 and special_in_qk:
            # The materialised backward multiplies a masked span's zero gradient by the other
            # factor (0 * inf = NaN) where the fused op never computes the span: it may be NaN
            # where the fused op is not, never the other way round.
            g, g_expected = g[~g_expected.isnan()], g_expected[~g_expected.isnan()]
        assert_close(g, g_expected)


@given(problems(), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from([None, "0.3", "1"]))
def test_portable_route_same_bits(p, dtype, max_density):
    """The filtered step down CUDA's route (KXOPS_SPARSE_GRAD_PORTABLE=1: the chunk's dense
    gradient converted at once, its entries re-keyed for the product kernel) gives the CPU's own
    route's bits, whatever the blocks' densities (KXOPS_SPARSE_GRAD_MAX_DENSITY: the default,
    a looser rule that mixes sparse and dense blocks, every block sparse)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    generator = torch.Generator().manual_seed(p["seed"])
    batch, heads, length, _ = p["shape"]
    q = torch.randn(p["shape"], generator=generator, dtype=dtype)
    k = torch.randn(p["shape"], generator=generator, dtype=dtype)
    sb = torch.randn(batch, heads, length, generator=generator, dtype=dtype) if p["start"] else None
    mask = None if p["mask"] is None else torch.rand(batch, length, generator=generator) < p["keep"]
    pos = torch.randint(-1, max(length * length, 1), (batch, heads, p["positives"]),
                        generator=generator)
    if length == 0:
        pos.fill_(-1)
    if p["specials"] and q.numel():
        q.view(-1)[int(torch.randint(0, q.numel(), (1,), generator=generator))] = SPECIALS[
            p["specials"] - 1]

    def run():
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in (q, k, sb)]
        loss = kxops.global_pointer_zlpr_loss(
            leaves[0], leaves[1], pos, mask, start_bias=leaves[2], tril=p["tril"],
            reduction=p["reduction"], block_bytes=p["block_bytes"],
            grad_filter=max(p["grad_filter"], 2.0**-12))
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
        (loss * weights).sum().backward()
        return [loss.detach()] + [t.grad for t in leaves if t is not None]

    saved = {name: os.environ.get(name) for name in ENV}
    try:
        os.environ.pop(ENV[0], None)
        if max_density is not None:
            os.environ[ENV[1]] = max_density
        want = run()
        os.environ[ENV[0]] = "1"
        got = run()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan())
        assert torch.equal(g.masked_fill(g.isnan(), 0), w.masked_fill(w.isnan(), 0))
