"""GlobalPointer + sparse ZLPR without the grid: the compiled op against the materialised path
(the grid + kxops.sparse_zlpr_loss) and a float64 plain formula, the public API, bad inputs,
the memory bound; the GlobalPointer modules against bert4torch's layers."""

import copy
import importlib.util
import math
import os
import sys
import types

import pytest
import torch

import kxops
from benchmarks.harness import peak_rss_growth_bytes
from kxops.reference import global_pointer_zlpr as ref
from tests.utils import (
    assert_close,
    assert_error_rule,
    direct_call_outcomes,
    needs_kernel,
    run_isolated,
)

OP = torch.ops.kxops.global_pointer_zlpr


def make_problem(batch=2, heads=3, length=70, dim=5, *, dtype=torch.float64, start=True,
                 end=True, mask="holes", positives=7, device="cpu"):
    """Random inputs; the mask has padding anywhere ("holes"), at the end ("tail") or is None;
    the positives mix valid spans, random ids (some masked or below the diagonal), duplicates
    and ignore_index padding."""
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64) / dim ** 0.25
    k = torch.randn(batch, heads, length, dim, dtype=torch.float64) / dim ** 0.25
    sb = torch.randn(batch, heads, length, dtype=torch.float64) if start else None
    eb = torch.randn(batch, heads, length, dtype=torch.float64) if end else None
    if mask == "holes":
        m = torch.rand(batch, length) < 0.8
    elif mask == "tail":
        m = torch.ones(batch, length, dtype=torch.bool)
        m[-1, length * 2 // 3:] = False
    else:
        m = None
    i = torch.randint(0, max(length, 1), (batch, heads, positives))
    j = torch.randint(0, max(length, 1), (batch, heads, positives))
    pos = torch.minimum(i, j) * length + torch.maximum(i, j)
    if positives >= 4:
        pos[..., 1] = torch.randint(0, max(length * length, 1), (batch, heads))
        pos[..., 2] = pos[..., 0]
        pos[..., 3] = -1
    cast = [None if t is None else t.to(device=device, dtype=dtype) for t in (q, k, sb, eb)]
    return (*cast, pos.to(device), None if m is None else m.to(device))


def materialised(q, k, pos, mask, sb, eb, tril=True, ignore_index=-1, reduction="none"):
    grid = ref.global_pointer_logits(q, k, mask, start_bias=sb, end_bias=eb, tril=tril)
    return kxops.sparse_zlpr_loss(grid.flatten(-2), pos, ignore_index=ignore_index,
                                  reduction=reduction)


def fused(q, k, pos, mask, sb, eb, tril=True, ignore_index=-1, reduction="none", **kwargs):
    return kxops.global_pointer_zlpr_loss(q, k, pos, mask, start_bias=sb, end_bias=eb, tril=tril,
                                          ignore_index=ignore_index, reduction=reduction,
                                          **kwargs)


def loss_and_grads(fn, q, k, pos, mask, sb, eb, *args, **kwargs):
    """fn's loss and the gradients of q, k, sb, eb (None for an absent bias) of a weighted sum
    of the per-row losses (so that each row's own scale is tested)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True)
              for t in (q, k, sb, eb)]
    loss = fn(leaves[0], leaves[1], pos, mask, leaves[2], leaves[3], *args, **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((loss * weights).sum(), present, allow_unused=True))
    return loss.detach(), [None if t is None else next(grads) for t in leaves]


def assert_same(ours, theirs, dtype=None):
    loss, grads = ours
    loss_r, grads_r = theirs
    assert_close(loss, loss_r, dtype)
    for g, g_r in zip(grads, grads_r):
        assert (g is None) == (g_r is None)
        if g is not None:
            assert_close(g, g_r, dtype)


def plain_row_losses(q, k, pos, mask, sb, eb, tril=True, ignore_index=-1):
    """The definition, one (batch, head) at a time over the list of scored spans (float64,
    differentiable)."""
    batch, heads, length, _ = q.shape
    rows = []
    for b in range(batch):
        steps = [i for i in range(length) if mask is None or mask[b, i] != 0]
        spans = [(i, j) for i in steps for j in steps if not tril or i <= j]
        for h in range(heads):
            wanted = {int(p) for p in pos[b, h] if int(p) != ignore_index}
            neg, pos_terms = [torch.zeros((), dtype=q.dtype)], [torch.zeros((), dtype=q.dtype)]
            for i, j in spans:
                s = q[b, h, i] @ k[b, h, j]
                s = s + (0 if sb is None else sb[b, h, i]) + (0 if eb is None else eb[b, h, j])
                (pos_terms if i * length + j in wanted else neg).append(
                    -s if i * length + j in wanted else s)
            rows.append(torch.logsumexp(torch.stack(neg), 0)
                        + torch.logsumexp(torch.stack(pos_terms), 0))
    return torch.stack(rows).reshape(batch, heads) if rows else q.new_zeros(batch, heads)


# ---------------------------------------------------------------------------------------------
# The reference and the compiled op against the definition and the materialised path

@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("mask", ["holes", None])
def test_reference_and_op_match_the_definition(tril, mask):
    problem = make_problem(2, 2, 9, 3, mask=mask)
    q, k, sb, eb, pos, m = problem
    expected = loss_and_grads(plain_row_losses, q, k, pos, m, sb, eb, tril)

    def reference(q, k, pos, mask, sb, eb):
        return ref.global_pointer_zlpr_loss(q, k, pos, mask, start_bias=sb, end_bias=eb,
                                            tril=tril, reduction="none")
    assert_same(loss_and_grads(reference, q, k, pos, m, sb, eb), expected)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, tril), expected)


@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("mask", ["holes", "tail", None])
@pytest.mark.parametrize("biases", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_materialised(tril, mask, biases, dtype):
    # L 150: three row blocks, the last one short.
    q, k, sb, eb, pos, m = make_problem(2, 3, 150, 6, dtype=dtype, start=biases[0],
                                        end=biases[1], mask=mask)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, tril),
                loss_and_grads(materialised, q, k, pos, m, sb, eb, tril))


@pytest.mark.parametrize("tril", [True, False])
def test_long_rows_take_wider_blocks(tril):
    """Past 512 valid steps the row blocks grow (128 rows here): the packing still matches."""
    q, k, sb, eb, pos, m = make_problem(1, 2, 900, 3)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, tril),
                loss_and_grads(materialised, q, k, pos, m, sb, eb, tril))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 100, 4), (3, 1, 60, 4)])
def test_serial_and_threaded_paths(threads, shape):
    """One thread: the serial loop over batches and chunks of heads (CUDA's); more: the CPU's
    split of the (batch, head) rows among threads (each thread's share of every batch's heads,
    or with fewer heads than threads a run of rows), the calls taken from a shared counter.
    Both match the materialised path."""
    q, k, sb, eb, pos, m = make_problem(*shape)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = loss_and_grads(fused, q, k, pos, m, sb, eb, block_bytes=50_000)
    finally:
        torch.set_num_threads(saved)
    assert_same(ours, loss_and_grads(materialised, q, k, pos, m, sb, eb))


def test_positives_on_block_edges():
    """Several row blocks (over 512 valid steps), positives on the blocks' edges, with every
    budget and thread count."""
    q, k, sb, eb, _, _ = make_problem(2, 3, 600, 4, positives=0)
    m = torch.ones(2, 600)
    m[0, ::7] = 0
    m[1, 550:] = 0
    steps = torch.tensor([0, 63, 64, 127, 128, 129, 255, 256, 511, 512, 513, 599])
    pos = torch.cat([steps * 600 + (steps + 1).clamp(max=599), steps * 601], -1)
    pos = pos.expand(2, 3, -1)
    expected = loss_and_grads(reference, q, k, pos, m, sb, eb)
    threads = torch.get_num_threads()
    try:
        for n in {1, max(2, threads)}:
            torch.set_num_threads(n)
            for block_bytes in (None, 1, 100_000):
                assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, block_bytes=block_bytes),
                            expected)
    finally:
        torch.set_num_threads(threads)


def _unusual_inputs():
    """Masks of any nonzero values (2, -1, NaN: kept), a mask of zeros, positives duplicated,
    below the diagonal, at padded steps and expanded, a k with stride 0 along D."""
    q, k, sb, eb, pos, _ = make_problem(2, 3, 9, 4, positives=6)
    m = torch.ones(2, 9)
    m[0, 6:] = 0
    m[1, 0] = m[1, 3] = 0
    odd = m * 2
    odd[0, 1] = -1
    odd[1, 5] = math.nan
    dup = torch.tensor([0, 3 * 9 + 1, 3 * 9 + 1, 2 * 9 + 5, -1, 8 * 9 + 8]).expand(2, 3, 6)
    return {
        "mask 2, -1, NaN": (q, k, pos, odd, sb, eb),
        "mask of zeros": (q, k, pos, torch.zeros(2, 9, dtype=torch.int8), sb, eb),
        "positives duplicated, below the diagonal, expanded": (q, k, dup, m, sb, eb),
        "strides": (q.transpose(0, 1).contiguous().transpose(0, 1), k[..., :1].expand_as(k),
                    pos, m[:, None].expand(2, 2, 9)[:, 0], sb, eb),
    }


@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("case", list(_unusual_inputs()))
def test_unusual_masks_positives_and_strides(case, tril):
    args = _unusual_inputs()[case]
    for reduction in ("none", "mean"):
        assert_same(loss_and_grads(fused, *args, tril, reduction=reduction),
                    loss_and_grads(reference, *args, tril, reduction=reduction))


def test_positives_dominating_exact():
    """Every span scores -60 but the one positive +60: the loss is
    log1p(n_neg e^-60) + log1p(e^-60), exact in fp32 (no 1 + tiny cancellation)."""
    length = 12
    zeros = torch.zeros(1, 1, length, 4)
    start = torch.full((1, 1, length), -30.0)
    end = torch.full((1, 1, length), -30.0)
    start[0, 0, 2], end[0, 0, 7] = 30.0, 90.0  # span (2, 7): 120; (2, j): 0 + end_j ...
    grid = (start[0, 0, :, None] + end[0, 0, None, :]).double().triu()
    keep = torch.ones(length, length, dtype=torch.bool).triu()
    positive = torch.zeros(length, length, dtype=torch.bool)
    positive[2, 7] = True
    exact = (torch.log1p(torch.exp(grid[keep & ~positive]).sum())
             + torch.log1p(torch.exp(-grid[positive]).sum()))
    loss = kxops.global_pointer_zlpr_loss(zeros, zeros, torch.tensor([[[2 * length + 7]]]),
                                          start_bias=start, end_bias=end)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_bytes", [1, 50_000, 2**62])
def test_block_budget_changes_nothing(block_bytes):
    """One head per call (a budget below one row), a few heads, all of them."""
    q, k, sb, eb, pos, m = make_problem(3, 5, 80, 4)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, block_bytes=block_bytes),
                loss_and_grads(materialised, q, k, pos, m, sb, eb))


def reference(q, k, pos, mask, sb, eb, tril=True, ignore_index=-1, reduction="none", **kwargs):
    return ref.global_pointer_zlpr_loss(q, k, pos, mask, start_bias=sb, end_bias=eb, tril=tril,
                                        ignore_index=ignore_index, reduction=reduction, **kwargs)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reductions(reduction, dtype):
    """The op returns the loss reduced so (fp32/fp64) and the gradients of that loss (for
    "none", of the rows' sum); the wrapper's loss and gradients follow from them."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 3, 20, 4, dtype=dtype)
    loss, *grads = OP(q, k, pos, m, sb, eb, True, -1, reduction, [True] * 4, None)
    assert loss.dtype == dtype and loss.shape == ((2, 3) if reduction == "none" else ())
    leaves = [t.clone().requires_grad_(True) for t in (q, k, sb, eb)]
    expected = reference(*leaves[:2], pos, m, *leaves[2:], reduction=reduction)
    assert_close(loss, expected.detach())
    for g, g_expected in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        assert_close(g, g_expected)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, reduction=reduction),
                loss_and_grads(reference, q, k, pos, m, sb, eb, reduction=reduction))


@pytest.mark.parametrize("grad_mask", [[True, False, False, False], [False, True, True, False],
                                       [False, False, False, True], [False] * 4])
@pytest.mark.parametrize("biases", [True, False])
def test_grad_mask_returns_what_is_asked(grad_mask, biases):
    """The gradients asked for, bit for bit those of a call that asks for all; empty tensors
    for the others and for a None bias."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 3, 30, 4, start=biases, end=biases)
    everything = OP(q, k, pos, m, sb, eb, True, -1, "mean", [True] * 4, None)
    asked = OP(q, k, pos, m, sb, eb, True, -1, "mean", grad_mask, None)
    assert torch.equal(asked[0], everything[0])
    for wanted, bias, g, g_all in zip(grad_mask, (q, k, sb, eb), asked[1:], everything[1:]):
        if wanted and bias is not None:
            assert torch.equal(g, g_all)
        else:
            assert g.shape == (0,)


def test_wrapper_computes_only_the_gradients_needed():
    """Only k requires grad: the wrapper asks the op for k's gradient alone, which equals the
    reference's."""
    q, k, sb, eb, pos, m = make_problem(2, 3, 30, 4)
    k_leaf = k.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fused(q, k_leaf, pos, m, sb, eb, reduction="sum"), k_leaf)
    k_ref = k.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(q, k_ref, pos, m, sb, eb, reduction="sum"), k_ref)
    assert_close(grad, expected)


@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_float64(tril, reduction):
    q, k, sb, eb, pos, m = make_problem(2, 2, 7, 3)
    args = [t.requires_grad_(True) for t in (q, k, sb, eb)]
    assert torch.autograd.gradcheck(
        lambda q, k, sb, eb: fused(q, k, pos, m, sb, eb, tril, reduction=reduction), args)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("grad_mask", [[True] * 4, [False] * 4, [False, True, True, False]])
def test_opcheck(reduction, grad_mask):
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 2, 10, 3)
    for t in (q, k, sb, eb):
        t.requires_grad_(True)
    torch.library.opcheck(OP, (q, k, pos, m, sb, eb, True, -1, reduction, grad_mask, None))
    torch.library.opcheck(OP, (q, k, pos, None, None, None, False, -1, reduction, grad_mask,
                               100))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("grad_mask", [[False] * 4, [True, False, False, True]])
def test_backward_recomputes_when_the_forward_did_not(reduction, grad_mask):
    """A direct call that did not ask for every gradient still differentiates (the backward
    computes them)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 2, 12, 3)

    def direct(q, k, pos, mask, sb, eb):
        return OP(q, k, pos, mask, sb, eb, True, -1, reduction, grad_mask, None)[0]
    assert_same(loss_and_grads(direct, q, k, pos, m, sb, eb),
                loss_and_grads(materialised, q, k, pos, m, sb, eb, reduction=reduction))


def test_double_backward_is_refused():
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(1, 1, 5, 2)
    q.requires_grad_(True)
    (_grad,) = torch.autograd.grad(fused(q, k, pos, m, sb, eb).sum(), q, create_graph=False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(fused(q, k, pos, m, sb, eb).sum(), q, create_graph=True)


@pytest.mark.parametrize("grad", [True, False])
def test_compile_fullgraph(grad):
    q, k, sb, eb, pos, m = make_problem(2, 2, 12, 4, dtype=torch.float32)
    compiled = torch.compile(lambda q, k, sb, eb: fused(q, k, pos, m, sb, eb, reduction="sum"),
                             fullgraph=True)
    if grad:
        ours = loss_and_grads(lambda q, k, pos, m, sb, eb: compiled(q, k, sb, eb),
                              q, k, pos, m, sb, eb)
        assert_same(ours, loss_and_grads(fused, q, k, pos, m, sb, eb, reduction="sum"))
    else:
        with torch.no_grad():
            assert_close(compiled(q, k, sb, eb), fused(q, k, pos, m, sb, eb, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tril", [True, False])
def test_low_precision_error_rule(dtype, tril):
    """Error against float64 at most twice the materialised path's at that precision."""
    q, k, sb, eb, pos, m = make_problem(2, 3, 90, 16)
    exact = loss_and_grads(materialised, q, k, pos, m, sb, eb, tril)
    low = [None if t is None else t.to(dtype) for t in (q, k, sb, eb)]
    ours = loss_and_grads(fused, low[0], low[1], pos, m, low[2], low[3], tril)
    theirs = loss_and_grads(materialised, low[0], low[1], pos, m, low[2], low[3], tril)
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1])
    assert_error_rule(ours[0], theirs[0], exact[0], dtype)
    for g, g_theirs, g_exact in zip(ours[1], theirs[1], exact[1]):
        assert_error_rule(g, g_theirs, g_exact, dtype)


def test_autocast_runs_in_the_autocast_dtype():
    q, k, sb, eb, pos, m = make_problem(2, 2, 20, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused(q, k, pos, m, sb, eb)
    low = [t.to(torch.bfloat16) for t in (q, k, sb, eb)]
    expected = fused(low[0], low[1], pos, m, low[2], low[3])
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(0, 3, 5, 2), (2, 0, 5, 2), (2, 3, 0, 2), (2, 3, 5, 0),
                                   (1, 1, 1, 1)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_and_tiny(shape, reduction):
    batch, heads, length, _dim = shape
    q = torch.randn(shape, dtype=torch.float64)
    k = torch.randn(shape, dtype=torch.float64)
    sb = torch.randn(shape[:3], dtype=torch.float64)
    pos = torch.full((batch, heads, 2), -1)
    if length:
        pos[..., 0] = 0
    assert_same(loss_and_grads(fused, q, k, pos, None, sb, None, reduction=reduction),
                loss_and_grads(materialised, q, k, pos, None, sb, None, reduction=reduction))


def test_fully_masked_batch_and_no_positives():
    q, k, sb, eb, pos, m = make_problem(3, 2, 30, 4, positives=2)
    m[1] = False
    pos[2] = -1
    ours = loss_and_grads(fused, q, k, pos, m, sb, eb)
    assert_same(ours, loss_and_grads(materialised, q, k, pos, m, sb, eb))
    assert (ours[0][1] == 0).all()
    assert all((g[1] == 0).all() for g in ours[1])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32])
def test_mask_dtypes_agree(mask_dtype):
    q, k, sb, eb, pos, m = make_problem(2, 2, 30, 4)
    expected = fused(q, k, pos, m, sb, eb)
    assert_close(fused(q, k, pos, m.to(mask_dtype), sb, eb), expected)


def test_non_contiguous_inputs():
    """Heads-last projections (GlobalPointer's layout), a q shared by all heads (stride 0, as
    EfficientGlobalPointer passes it), strided mask and positives."""
    batch, heads, length, dim = 2, 3, 40, 4
    q = torch.randn(batch, length, heads, 2 * dim, dtype=torch.float64)[..., :dim]
    q = q.transpose(1, 2)
    k = torch.randn(batch, length, 1, dim, dtype=torch.float64).transpose(1, 2)
    k = k.expand(batch, heads, length, dim)
    sb = torch.randn(batch, length, heads, dtype=torch.float64).transpose(1, 2)
    eb = torch.randn(batch, heads, 2 * length, dtype=torch.float64)[..., ::2]
    m = (torch.rand(length, batch) < 0.8).t()
    pos = torch.randint(0, length * length, (batch, 6, heads)).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, sb, eb, m, pos))
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb),
                loss_and_grads(materialised, q, k, pos, m, sb, eb))


def test_positives_rules():
    """Duplicates once; a positive at a padded step or below the diagonal (tril) is ignored;
    a custom ignore_index and int32 ids."""
    q, k, sb, eb, _, m = make_problem(1, 1, 6, 3, mask=None)
    m = torch.tensor([[True, True, False, True, True, True]])
    base = fused(q, k, torch.tensor([[[1 * 6 + 3]]]), m, sb, eb)
    for extra in ([1 * 6 + 3], [2 * 6 + 4], [4 * 6 + 2], [3 * 6 + 1]):
        pos = torch.tensor([[[1 * 6 + 3, *extra]]])
        assert_close(fused(q, k, pos, m, sb, eb), base)
    pos = torch.tensor([[[100, 1 * 6 + 3, 100]]], dtype=torch.int32)
    assert_close(fused(q, k, pos, m, sb, eb, ignore_index=100), base)
    # Not tril: the span (3, 1) is scored, so its positive counts.
    pos = torch.tensor([[[3 * 6 + 1]]])
    assert_close(fused(q, k, pos, m, sb, eb, tril=False),
                 materialised(q, k, pos, m, sb, eb, tril=False))


def test_ignore_index_extremes():
    """ignore_index anywhere in int64, beyond the positives' dtype too (it then matches none)."""
    q, k, sb, eb, _, m = make_problem(2, 3, 9, 4, positives=0)
    dup = torch.tensor([0, 28, 28, 23, -1, 80]).expand(2, 3, 6)
    for ignore_index in (2**40, 5, -2**63):
        pos = torch.where(dup < 0, ignore_index, dup)
        assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, ignore_index=ignore_index),
                    loss_and_grads(reference, q, k, pos, m, sb, eb, ignore_index=ignore_index))
    with pytest.raises(IndexError):
        fused(q, k, torch.full((2, 3, 1), -1, dtype=torch.int32), m, sb, eb, ignore_index=2**40)
    with pytest.raises(IndexError):
        fused(q, k, torch.full((2, 3, 1), 81), m, sb, eb)


def test_padded_steps_take_no_part():
    """NaN or inf at a padded step of any input changes nothing; its gradient is zero."""
    q, k, sb, eb, pos, m = make_problem(2, 2, 30, 4, mask="tail")
    clean = loss_and_grads(fused, q, k, pos, m, sb, eb)
    dirty = [t.clone() for t in (q, k, sb, eb)]
    for t, value in zip(dirty, (math.nan, math.inf, -math.inf, math.nan)):
        t[-1, :, -1] = value
    ours = loss_and_grads(fused, dirty[0], dirty[1], pos, m, dirty[2], dirty[3])
    assert_same(ours, clean)
    assert all((g[-1, :, -1] == 0).all() for g in ours[1])
    assert_same(ours, loss_and_grads(materialised, dirty[0], dirty[1], pos, m, dirty[2],
                                     dirty[3]))


@pytest.mark.parametrize("which", ["q", "k", "start", "end"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_at_a_valid_step(which, value):
    """As the materialised path: NaN where it has NaN, only in the (batch, head) row hit."""
    q, k, sb, eb, pos, m = make_problem(2, 2, 20, 3, mask=None)
    t = {"q": q, "k": k, "start": sb, "end": eb}[which]
    t[1, 0, 5] = value
    ours = loss_and_grads(fused, q, k, pos, m, sb, eb)
    theirs = loss_and_grads(materialised, q, k, pos, m, sb, eb)
    assert_same(ours, theirs)
    assert torch.isfinite(ours[0][0]).all() and torch.isfinite(ours[0][1, 1])


def test_inputs_are_not_modified():
    q, k, sb, eb, pos, m = make_problem(2, 2, 20, 3)
    m = m.float()
    before = [t.clone() for t in (q, k, sb, eb, pos, m)]
    loss_and_grads(fused, q, k, pos, m, sb, eb)
    OP(q, k, pos, m, sb, eb, True, -1, "mean", [True] * 4, 64)
    for t, t0 in zip((q, k, sb, eb, pos, m), before):
        torch.testing.assert_close(t, t0, atol=0, rtol=0)


def test_falls_back_to_the_reference_under_torch_func():
    q, k, sb, eb, pos, m = make_problem(1, 2, 10, 3)
    grad = torch.func.grad(lambda q: fused(q, k, pos, m, sb, eb, reduction="sum"))(q)
    leaf = q.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(materialised(leaf, k, pos, m, sb, eb).sum(), leaf)
    assert_close(grad, expected)


def test_disabled_extension_runs_the_reference():
    result = run_isolated("""
        import torch, kxops
        q = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
        pos = torch.tensor([[[1, 7], [0, -1]]])
        loss = kxops.global_pointer_zlpr_loss(q, q, pos)
        loss.backward()
        print("OK", bool(torch.isfinite(loss)), bool(torch.isfinite(q.grad).all()))
    """, env={"KXOPS_DISABLE_EXT": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK True True" in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad arguments

PREFIX = "kxops.global_pointer_zlpr: "


def _bad_calls():
    q = torch.randn(2, 3, 4, 5)
    pos = torch.zeros(2, 3, 1, dtype=torch.long)
    bias = torch.randn(2, 3, 4)
    mask = torch.ones(2, 4)
    loss = kxops.global_pointer_zlpr_loss
    return [
        (lambda: loss(q.long(), q, pos), TypeError, "q must be"),
        (lambda: loss([1.0], q, pos), TypeError, "q must be"),
        (lambda: loss(q.to_sparse(), q, pos), TypeError, "q must be a dense"),
        (lambda: loss(q[0], q[0], pos), ValueError, "q must be"),
        (lambda: loss(q, q.double(), pos), TypeError, "k has dtype"),
        (lambda: loss(q, q[:, :2], pos), ValueError, "k must have shape"),
        (lambda: loss(q, q, pos.float()), TypeError, "positives"),
        (lambda: loss(q, q, pos[0]), ValueError, "positives must"),
        (lambda: loss(q, q, pos[:1]), ValueError, "positives must"),
        (lambda: loss(q, q, pos + 16), IndexError, "out of range"),
        (lambda: loss(q, q, pos - 2), IndexError, "out of range"),
        (lambda: loss(q, q, pos, torch.ones(2, 5)), ValueError, "mask must"),
        (lambda: loss(q, q, pos, torch.ones(2, 4, dtype=torch.cfloat)), TypeError, "mask must"),
        (lambda: loss(q, q, pos, mask.to_sparse()), TypeError, "mask must be a dense"),
        (lambda: loss(q, q, pos, torch.quantize_per_tensor(mask, 1.0, 0, torch.quint8)),
         TypeError, "mask must be a dense"),
        (lambda: loss(q, q, pos, start_bias=bias[:1]), ValueError, "start_bias must"),
        (lambda: loss(q, q, pos, end_bias=bias.double()), TypeError, "end_bias has dtype"),
        (lambda: loss(q, q, pos, tril=1), TypeError, "tril"),
        (lambda: loss(q, q, pos, ignore_index=1.0), TypeError, "ignore_index"),
        (lambda: loss(q, q, pos, ignore_index=2**63), ValueError, "ignore_index"),
        (lambda: loss(q, q, pos, reduction="avg"), ValueError, "reduction"),
        (lambda: loss(q, q, pos, block_bytes=0), ValueError, "block_bytes"),
        (lambda: loss(q, q, pos, block_bytes=True), TypeError, "block_bytes"),
        (lambda: loss(q, q, pos, block_bytes=1.5), TypeError, "block_bytes"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments(index):
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=PREFIX + ".*" + message):
        call()


# The arguments of torch.ops.kxops.global_pointer_zlpr after q, k and positives.
REST = "None, None, None, True, -1, 'none', [True] * 4"

DIRECT_BAD_CALLS = {
    # name: (arguments of torch.ops.kxops.global_pointer_zlpr, error type, message pattern)
    "int q": (f"q.long(), q.long(), pos, {REST}", "TypeError", "q must"),
    "3-dim q": (f"q[0], q[0], pos, {REST}", "ValueError", "q must"),
    "k dtype": (f"q, q.double(), pos, {REST}", "TypeError", "k has"),
    "k shape": (f"q, q[:, :, :2], pos, {REST}", "ValueError", "k must have shape"),
    "float positives": (f"q, q, pos.float(), {REST}", "TypeError", "positives"),
    "positives rows": (f"q, q, pos[:1], {REST}", "ValueError", "positives must"),
    "positives dims": (f"q, q, pos[0], {REST}", "ValueError", "positives must"),
    "span id too big": (f"q, q, pos + 16, {REST}", "IndexError", "out of range"),
    "span id negative": ("q, q, pos.int() - 5, None, None, None, True, -1, 'sum', [False] * 4",
                         "IndexError", "out of range"),
    "mask shape": ("q, q, pos, torch.ones(2, 5), None, None, True, -1, 'none', [True] * 4",
                   "ValueError", "mask must"),
    "mask complex": ("q, q, pos, torch.ones(2, 4, dtype=torch.cfloat), None, None, True, -1, "
                     "'none', [True] * 4", "TypeError", "mask must"),
    "start_bias shape": ("q, q, pos, None, q[..., 0].reshape(3, 2, 4), None, True, -1, 'none', "
                         "[True] * 4", "ValueError", "start_bias must"),
    "end_bias dtype": ("q, q, pos, None, None, q[..., 0].double(), True, -1, 'none', [True] * 4",
                       "TypeError", "end_bias has"),
    "reduction": ("q, q, pos, None, None, None, True, -1, 'avg', [True] * 4", "ValueError",
                  "reduction must"),
    "block_bytes": (f"q, q, pos, {REST}, 0", "ValueError", "block_bytes"),
    "grad_filter": (f"q, q, pos, {REST}, None, float('nan')", "ValueError", "grad_filter"),
    # Refused by the dispatcher itself (no sparse kernel), before the driver runs.
    "sparse q": (f"q.to_sparse(), q, pos, {REST}", "TypeError",
                 "q must be a dense (strided) tensor, got layout torch.sparse_coo"),
    "meta k": (f"q, q.to('meta'), pos, {REST}", "RuntimeError", "is on meta"),
}


def test_direct_op_rejects_bad_arguments():
    """torch.ops.kxops.global_pointer_zlpr called directly: a clear error of the wrapper's
    type for every bad argument, never a crash (one subprocess runs them all; a crash shows as
    the case it stopped at)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    outcomes = direct_call_outcomes(
        {name: f"torch.ops.kxops.global_pointer_zlpr({args})"
         for name, (args, _, _) in DIRECT_BAD_CALLS.items()},
        prelude="""
            q = torch.randn(2, 3, 4, 5)
            pos = torch.zeros(2, 3, 1, dtype=torch.long)
        """)
    for name, (_, error, pattern) in DIRECT_BAD_CALLS.items():
        assert outcomes[name].startswith(error + " "), (name, outcomes[name])
        assert pattern in outcomes[name], (name, outcomes[name])
        assert PREFIX in outcomes[name], (name, outcomes[name])


def test_op_and_wrapper_raise_the_same_error():
    """The C++ op and the Python wrapper: the same type, prefix and words for the same bad
    argument."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 3, 6, 4, dtype=torch.float32)
    arguments = dict(q=q, k=k, pos=pos, m=m, sb=sb, eb=eb, reduction="sum", block_bytes=None,
                     grad_filter=0.0)
    cases = [dict(k=k.double()), dict(k=k[:, :2]), dict(pos=pos.float()), dict(pos=pos[0]),
             dict(m=m[:, :3]), dict(m=m.cfloat()), dict(sb=sb[0]), dict(eb=eb.half()),
             dict(k=k.to("meta")), dict(reduction="avg"), dict(block_bytes=0),
             dict(grad_filter=-1.0), dict(pos=pos + 36)]
    for change in cases:
        a = {**arguments, **change}
        with pytest.raises(Exception) as from_op:
            OP(a["q"], a["k"], a["pos"], a["m"], a["sb"], a["eb"], True, -1, a["reduction"],
               [True] * 4, a["block_bytes"], a["grad_filter"])
        with pytest.raises(Exception) as from_wrapper:
            fused(a["q"], a["k"], a["pos"], a["m"], a["sb"], a["eb"], reduction=a["reduction"],
                  block_bytes=a["block_bytes"], grad_filter=a["grad_filter"])
        assert from_op.type is from_wrapper.type, (change, from_op.value, from_wrapper.value)
        op_message, wrapper_message = str(from_op.value), str(from_wrapper.value)
        assert op_message.startswith(PREFIX) and wrapper_message.startswith(PREFIX), change
        assert op_message.split()[:3] == wrapper_message.split()[:3], (op_message,
                                                                       wrapper_message)


def test_op_fake_kernel_and_wrapper_words_agree_exactly():
    """The same bad argument through the C++ op (CPU), its fake kernel (every tensor on meta)
    and the wrapper: the same type and the same message, word for word (q's dtype and
    block_bytes used to be worded differently by the wrapper and the fake kernel; q None
    reached the fake kernel's device check as an AttributeError)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(2, 3, 6, 4, dtype=torch.float32)
    arguments = dict(q=q, k=k, pos=pos, m=m, sb=sb, eb=eb, block_bytes=None)
    cases = [dict(q=q.long(), k=k.long()), dict(q=q.cfloat()), dict(q=None),
             dict(block_bytes=0), dict(block_bytes=-3), dict(k=k.double())]

    def meta(t):
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    for change in cases:
        a = {**arguments, **change}
        errors = []
        for move in (lambda t: t, meta):
            with pytest.raises(Exception) as info:
                OP(move(a["q"]), move(a["k"]), move(a["pos"]), move(a["m"]), move(a["sb"]),
                   move(a["eb"]), True, -1, "mean", [True] * 4, a["block_bytes"], 0.0)
            errors.append(info)
        if a["q"] is not None:
            with pytest.raises(Exception) as info:
                fused(a["q"], a["k"], a["pos"], a["m"], a["sb"], a["eb"], reduction="mean",
                      block_bytes=a["block_bytes"])
            errors.append(info)
        messages = {(e.type, str(e.value)) for e in errors}
        assert len(messages) == 1, (change, messages)
        assert str(errors[0].value).startswith(PREFIX), (change, errors[0].value)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_op_refuses_a_grad_mask_of_the_wrong_length(device):
    """bool[4] grad_mask: the schema does not fix the list's length. The C++ op refuses 3 or 5
    flags in its words (it was the dispatcher's unboxing RuntimeError); with meta tensors the
    fake kernel does (it returned 4 or 5 outputs instead of the schema's 5)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = (t.to(device) for t in make_problem(2, 3, 6, 4))
    for flags in (3, 5):
        with pytest.raises(ValueError, match=r"^kxops.global_pointer_zlpr: grad_mask must hold "
                                             r"4 flags \(q, k, start_bias, end_bias\)"):
            OP(q, k, pos, m, sb, eb, True, -1, "mean", [True] * flags)


@pytest.mark.parametrize("cls", ["GlobalPointer", "EfficientGlobalPointer"])
@pytest.mark.parametrize("heads, head_size", [(0, 4), (2, 0), (2, 3)])
def test_module_bad_arguments_carry_the_op_prefix(cls, heads, head_size):
    """heads, head_size (odd under RoPE): the modules' errors start with the op's prefix."""
    with pytest.raises(ValueError, match=r"^kxops\.global_pointer_zlpr: "):
        getattr(kxops.nn, cls)(8, heads, head_size)


def test_float8_q_is_a_type_error_of_the_op():
    """float8 q: no kernel and no reference (bmm has no float8) take it; the wrapper used to
    raise torch's NotImplementedError from the reference's bmm, without the prefix."""
    q = torch.randn(1, 1, 3, 2).to(torch.float8_e5m2)
    pos = torch.zeros(1, 1, 1, dtype=torch.long)
    for loss in (kxops.global_pointer_zlpr_loss, kxops.reference.global_pointer_zlpr_loss):
        with pytest.raises(TypeError, match=r"^kxops.global_pointer_zlpr: q must be a float64"):
            loss(q, q, pos)


# Each argument of the op wrong in turn (by its schema position), as the attack of a caller:
# None, a wrong dtype, shape or device, a wrong grad_mask length, a bad reduction.
ATTACKS = {
    0: ["None", "q.long()", "q.cfloat()", "q[0]", "q.to('meta')", "q.to_sparse()"],
    1: ["None", "k.double()", "k[..., :2]", "k.to('meta')", "k.transpose(1, 2)"],
    2: ["None", "pos.float()", "pos.short()", "pos[0]", "pos.to('meta')", "pos + 49",
        "pos - 50"],
    3: ["mask.cfloat()", "mask[:, :3]", "mask.to('meta')", "mask.to_sparse()", "mask[None]"],
    4: ["sb.double()", "sb[0]", "sb.to('meta')", "q"],
    5: ["eb.half()", "eb[:, :, :3]", "eb.to('meta')", "pos"],
    6: ["None", "'yes'"],
    7: ["None", "1.5", "2**63"],
    8: ["None", "'avg'", "''", "3"],
    9: ["None", "[True] * 3", "[True] * 5", "True"],
    10: ["0", "-5", "1.5"],
    11: ["-1.0", "float('nan')", "float('inf')", "None"],
}


def test_attack_each_argument_in_turn():
    """Every argument wrong in turn, through the op and through the wrapper (the wrapper's own
    arguments: all but grad_mask): an exception of the contract's types, never a crash or a
    result (one subprocess runs them all; a crash shows as the case it stopped at). Where
    kxops raises rather than the dispatcher's argument parser, the message has the prefix."""
    needs_kernel("global_pointer_zlpr", "cpu")
    names = ["q", "k", "pos", "mask", "sb", "eb", "True", "-1", "'mean'", "[True] * 4", "None",
             "0.0"]
    keywords = ["", "", "", "", "start_bias=", "end_bias=", "tril=", "ignore_index=",
                "reduction=", None, "block_bytes=", "grad_filter="]
    calls = {}
    for position, values in ATTACKS.items():
        for value in values:
            args = [value if i == position else name for i, name in enumerate(names)]
            calls[f"op {position} {value}"] = (
                f"torch.ops.kxops.global_pointer_zlpr({', '.join(args)})")
            if keywords[position] is not None:
                public = [f"{kw}{arg}" for kw, arg in zip(keywords, args) if kw is not None]
                calls[f"wrapper {position} {value}"] = (
                    f"kxops.global_pointer_zlpr_loss({', '.join(public)})")
    outcomes = direct_call_outcomes(calls, prelude="""
        q = torch.randn(2, 3, 7, 4); k = torch.randn(2, 3, 7, 4)
        sb = torch.randn(2, 3, 7); eb = torch.randn(2, 3, 7)
        pos = torch.randint(0, 49, (2, 3, 5)); mask = torch.ones(2, 7)
    """)
    allowed = ("TypeError ", "ValueError ", "IndexError ", "RuntimeError ")
    assert len(outcomes) == len(calls)
    # torch's argument parser reads None as False for a bool argument: the op never sees it.
    assert outcomes.pop("op 6 None") == "no error"
    for name, outcome in outcomes.items():
        assert outcome.startswith(allowed), (name, outcome)
        parsed_by_dispatcher = "Expected a value of type" in outcome
        if name.startswith("wrapper") or not parsed_by_dispatcher:
            assert PREFIX in outcome, (name, outcome)


# ---------------------------------------------------------------------------------------------
# The memory bound

MEMORY_SETUP = """
import torch, kxops
from kxops.reference.global_pointer_zlpr import global_pointer_logits
# One thread: the growth does not depend on it (beyond one row buffer per thread in the row
# kernel), and a busy machine runs the measurement in seconds.
torch.set_num_threads(1)
torch.manual_seed(0)
B, H, L, D = {shape}
q = (torch.randn(B, H, L, D) / 8).requires_grad_()
k = torch.randn(B, H, L, D).requires_grad_()
positives = torch.randint(0, L * L, (B, H, 6))
mask = torch.ones(B, L, dtype=torch.bool)
mask[-1, L * 3 // 4:] = False
"""


def test_memory_bound_at_the_target_shape():
    """B 4, heads 16, L 2048, D 64 (a 1 GiB fp32 grid): forward + backward grows the peak
    resident memory by less than 0.3 GiB. The materialised path, at a quarter of that size
    (B 1), grows it by more than the bound: the measurement can fail."""
    needs_kernel("global_pointer_zlpr", "cpu")
    bound = 0.3 * 2**30
    step = "kxops.global_pointer_zlpr_loss(q, k, positives, mask).backward()"
    grown = peak_rss_growth_bytes(MEMORY_SETUP.format(shape=(4, 16, 2048, 64)), step)
    materialised_step = ("kxops.sparse_zlpr_loss(global_pointer_logits(q, k, mask).flatten(-2),"
                         " positives).backward()")
    grown_materialised = peak_rss_growth_bytes(MEMORY_SETUP.format(shape=(1, 16, 2048, 64)),
                                               materialised_step)
    assert grown < bound, grown / 2**30
    assert grown_materialised > bound, grown_materialised / 2**30


# ---------------------------------------------------------------------------------------------
# kxops.nn.GlobalPointer / EfficientGlobalPointer: against the grid, and against bert4torch's
# layers

MODULES = [kxops.nn.GlobalPointer, kxops.nn.EfficientGlobalPointer]


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("tril", [True, False])
def test_module_loss_matches_grid_loss(cls, tril):
    torch.manual_seed(0)
    head = cls(16, 3, head_size=8, tril_mask=tril).double()
    twin = copy.deepcopy(head)
    hidden = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    mask[0, 2] = 0
    pos = torch.randint(0, 100, (2, 3, 4))
    pos[0, 0, 0] = -1
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss = head.loss(h1, mask, pos, reduction="sum")
    loss.backward()
    expected = kxops.sparse_zlpr_loss(twin(h2, mask).flatten(-2), pos, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h1.grad, h2.grad)
    for (name, p1), p2 in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tril", [True, False])
def test_decode_equals_grid_threshold(cls, dtype, tril):
    """decode's spans are the grid's above the threshold, for any threshold (-inf, NaN too)."""
    torch.manual_seed(1)
    head = cls(16, 2, head_size=8, tril_mask=tril).to(dtype)
    hidden = torch.randn(2, 12, 16, dtype=dtype)
    mask = torch.ones(2, 12)
    mask[0, 4] = 0
    mask[1, 9:] = 0
    with torch.no_grad():
        grid = head(hidden, mask)
    finite = grid[torch.isfinite(grid)]
    for threshold in [0.0, -math.inf, math.nan, *finite[:20].tolist()]:
        assert torch.equal(head.decode(hidden, mask, threshold=threshold),
                           (grid > threshold).nonzero()), threshold


def _load_bert4torch_layers():
    """bert4torch 0.6.2's position_encoding.py and global_point.py, loaded as files from the
    installed package (its package import needs tokenizer extras), with the registry decorator
    create_registrar (their only other bert4torch import) stubbed. sys.modules is restored."""
    spec = importlib.util.find_spec("bert4torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bert4torch is not installed (pip install --no-deps bert4torch==0.6.2)")
    layers = os.path.join(spec.submodule_search_locations[0], "layers")
    snippets = types.ModuleType("bert4torch.snippets")
    snippets.create_registrar = lambda registry: lambda *a, **kw: (lambda obj: obj)
    stubs = {"bert4torch": types.ModuleType("bert4torch"), "bert4torch.snippets": snippets,
             "bert4torch.layers": types.ModuleType("bert4torch.layers")}
    saved = {name: sys.modules.get(name) for name in
             [*stubs, "bert4torch.layers.position_encoding", "bert4torch.layers.global_point"]}
    sys.modules.update(stubs)
    try:
        loaded = {}
        for name in ("position_encoding", "global_point"):
            full = f"bert4torch.layers.{name}"
            file_spec = importlib.util.spec_from_file_location(full, os.path.join(layers,
                                                                                  f"{name}.py"))
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[full] = module
            file_spec.loader.exec_module(module)
            loaded[name] = module
        return loaded["global_point"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def bert4torch_layers():
    return _load_bert4torch_layers()


HEAD_PAIRS = [("GlobalPointer", kxops.nn.GlobalPointer),
              ("EfficientGlobalPointer", kxops.nn.EfficientGlobalPointer)]


def _pair(bert4torch_layers, name, ours_cls, rope=True, use_bias=True, tril=True,
          dtype=torch.float64, hidden=12, heads=3, head_size=8):
    theirs = getattr(bert4torch_layers, name)(hidden, heads, head_size, RoPE=rope,
                                               use_bias=use_bias, tril_mask=tril).to(dtype)
    ours = ours_cls(hidden, heads, head_size, rope=rope, use_bias=use_bias, tril_mask=tril,
                    dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(batch=2, length=11, hidden=12, dtype=torch.float64):
    x = torch.randn(batch, length, hidden, dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 8:] = 0
    return x, mask


@pytest.mark.parametrize("name,ours_cls", HEAD_PAIRS)
@pytest.mark.parametrize("rope,use_bias,tril", [(True, True, True), (False, False, True),
                                                (True, True, False)])
def test_heads_score_as_bert4torch(bert4torch_layers, name, ours_cls, rope, use_bias, tril):
    theirs, ours = _pair(bert4torch_layers, name, ours_cls, rope, use_bias, tril)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x, mask = _inputs()
    expected = theirs(x, mask)
    keep = ref.span_keep(mask, x.shape[1], tril, x.device).expand_as(expected)
    for m in (mask, mask.bool(), mask.float()):
        scores = ours(x, m)
        assert_close(scores[keep], expected[keep])
        assert torch.isneginf(scores[~keep]).all()


@pytest.mark.parametrize("name,ours_cls", HEAD_PAIRS)
def test_fused_loss_and_parameter_grads_as_bert4torch(bert4torch_layers, name, ours_cls):
    """The fused loss and the parameter gradients equal sparse ZLPR on bert4torch's scores
    (positives at scored spans: bert4torch's -1e12 below the diagonal is not -inf)."""
    theirs, ours = _pair(bert4torch_layers, name, ours_cls)
    x, mask = _inputs()
    length = x.shape[1]
    i = torch.randint(0, 8, (2, 3, 4))
    j = torch.randint(0, 8, (2, 3, 4))
    pos = torch.minimum(i, j) * length + torch.maximum(i, j)
    pos[0, 0, 1] = -1
    ours_loss = ours.loss(x, mask, pos)
    theirs_loss = kxops.sparse_zlpr_loss(theirs(x, mask).flatten(-2), pos)
    assert_close(ours_loss, theirs_loss)
    ours_grads = torch.autograd.grad(ours_loss, list(ours.parameters()))
    theirs_grads = torch.autograd.grad(theirs_loss, list(theirs.parameters()))
    for g, g_theirs in zip(ours_grads, theirs_grads):
        assert_close(g, g_theirs)


@pytest.mark.parametrize("name,ours_cls", HEAD_PAIRS)
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_decode_as_bert4torch(bert4torch_layers, name, ours_cls, threshold, monkeypatch):
    theirs, ours = _pair(bert4torch_layers, name, ours_cls)
    x, mask = _inputs(length=30)
    # Blocks of 7 start rows.
    monkeypatch.setattr(kxops.nn.global_pointer_zlpr, "_DECODE_SCORES", 3 * 30 * 7)
    spans = ours.decode(x, mask, threshold=threshold)
    expected = (theirs(x, mask) > threshold).nonzero()
    assert spans.dtype == torch.long and len(expected) > 0
    torch.testing.assert_close(spans, expected)
    assert ours.decode(x[:0], mask[:0]).shape == (0, 4)


@pytest.mark.parametrize("name,ours_cls", HEAD_PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads_as_bert4torch(bert4torch_layers, name, ours_cls, dtype):
    """In low precision too (bert4torch builds its RoPE tables in fp32 and casts them)."""
    theirs, ours = _pair(bert4torch_layers, name, ours_cls, dtype=dtype)
    x, mask = _inputs(dtype=dtype)
    expected = theirs(x, mask)
    keep = ref.span_keep(mask, x.shape[1], True, x.device).expand_as(expected)
    exact = _pair(bert4torch_layers, name, ours_cls)[0]
    exact.load_state_dict(theirs.state_dict())
    exact_scores = exact(x.double(), mask)[keep]
    assert_error_rule(ours(x, mask)[keep], expected[keep], exact_scores, dtype)


# ---------------------------------------------------------------------------------------------
# CUDA (the same host driver over cuBLAS and the CUDA row kernel)



@pytest.fixture
def full_fp32_matmul():
    """The materialised path's GEMM in full fp32 (no TF32), so that a difference is ours."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.usefixtures("full_fp32_matmul")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_materialised(dtype, tril):
    needs_kernel("global_pointer_zlpr", "cuda")
    q, k, sb, eb, pos, m = make_problem(2, 3, 150, 16, device="cuda")
    exact = loss_and_grads(materialised, *(t.cpu() if t is not None else None
                                           for t in (q, k, pos, m, sb, eb)), tril)
    low = [t.to(dtype) for t in (q, k, sb, eb)]
    ours = loss_and_grads(fused, low[0], low[1], pos, m, low[2], low[3], tril,
                          block_bytes=100_000)
    theirs = loss_and_grads(materialised, low[0], low[1], pos, m, low[2], low[3], tril)
    if dtype in (torch.float64, torch.float32):
        assert_same(ours, theirs)
        return
    assert_error_rule(ours[0].cpu(), theirs[0].cpu(), exact[0], dtype)
    for g, g_theirs, g_exact in zip(ours[1], theirs[1], exact[1]):
        assert_error_rule(g.cpu(), g_theirs.cpu(), g_exact, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_bound_at_the_target_shape():
    """B 4, heads 16, L 2048, D 64: a full step allocates less than 0.3 GiB above its inputs."""
    needs_kernel("global_pointer_zlpr", "cuda")
    torch.manual_seed(0)
    q = (torch.randn(4, 16, 2048, 64, device="cuda") / 8).requires_grad_()
    k = torch.randn(4, 16, 2048, 64, device="cuda").requires_grad_()
    positives = torch.randint(0, 2048 * 2048, (4, 16, 6), device="cuda")
    mask = torch.ones(4, 2048, dtype=torch.bool, device="cuda")
    mask[-1, 1536:] = False
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kxops.global_pointer_zlpr_loss(q, k, positives, mask).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 0.3 * 2**30


@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("mask", ["holes", None])
@pytest.mark.parametrize("heads", [1, 3])
def test_both_cpu_gemm_engines(cpu_gemm, tril, mask, heads):
    """fp32 through MKL and through oneDNN (csrc/gemm.h): the loss and the four gradients
    against the materialised path, over several row blocks (L 150). With one head most block
    products are contiguous and reach oneDNN; with three, their row blocks are strided views
    that stay with torch's at::bmm under either engine."""
    assert torch.ops.kxops._cpu_gemm_engine().startswith(cpu_gemm + ";")
    q, k, sb, eb, pos, m = make_problem(2, heads, 150, 16, dtype=torch.float32, mask=mask)
    assert_same(loss_and_grads(fused, q, k, pos, m, sb, eb, tril),
                loss_and_grads(materialised, q, k, pos, m, sb, eb, tril))


# ---- grad_filter: the negligible negative spans' gradients dropped ----

FILTER = 2.0**-12


def trained_like(batch=2, heads=3, length=90, dim=16, entities=4, dtype=torch.float64,
                 seed=0):
    """A trained-like grid: every span near -12 (a constant last dimension), each (batch, head)
    row's entity spans near +4 and the spans that end one step off near -2.4; q and k are
    multiples of 1/64 and 1/256, so that every GEMM order gives the logits exactly."""
    gen = torch.Generator().manual_seed(seed)
    q = 0.3 * torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k = 0.05 * torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    q[..., -1], k[..., -1] = 4.0, -3.0
    start = torch.randint(0, length - 12, (batch, heads, entities), generator=gen)
    end = start + torch.randint(1, 10, (batch, heads, entities), generator=gen)
    direction = torch.nn.functional.normalize(
        torch.randn(batch, heads, entities, dim - 1, generator=gen, dtype=torch.float64), dim=-1)
    for b in range(batch):
        for h in range(heads):
            for t in range(entities):
                i, j, r = start[b, h, t], end[b, h, t], direction[b, h, t]
                q[b, h, i, :-1] += 16 * r
                k[b, h, j, :-1] += r
                k[b, h, j - 1, :-1] += 0.6 * r
                k[b, h, j + 1, :-1] += 0.6 * r
    q, k = (q * 64).round() / 64, (k * 256).round() / 256
    mask = torch.ones(batch, length, dtype=torch.bool)
    return q.to(dtype), k.to(dtype), start * length + end, mask


@pytest.mark.parametrize("tril", [True, False])
def test_grad_filter_zero_is_the_call_without_it(tril):
    q, k, sb, eb, pos, m = make_problem(dtype=torch.float32)
    want = loss_and_grads(fused, q, k, pos, m, sb, eb, tril)
    got = loss_and_grads(fused, q, k, pos, m, sb, eb, tril, grad_filter=0.0)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(g, w) for g, w in zip(got[1], want[1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("problem", ["trained", "random"])
def test_grad_filter_matches_the_filtered_reference(dtype, problem):
    """The loss unchanged, the gradients the filtered reference's: sparse products on the
    trained-like grid, the dense GEMMs on the random one (most spans survive there)."""
    if problem == "trained":
        q, k, pos, m = trained_like(dtype=dtype)
        sb = eb = None
    else:
        q, k, sb, eb, pos, m = make_problem(dtype=dtype)
    got = loss_and_grads(fused, q, k, pos, m, sb, eb, grad_filter=FILTER)
    exact = loss_and_grads(fused, q, k, pos, m, sb, eb)
    def reference(q, k, pos, mask, sb, eb, **kwargs):
        return ref.global_pointer_zlpr_loss(q, k, pos, mask, start_bias=sb, end_bias=eb,
                                            reduction="none", **kwargs)

    want = loss_and_grads(reference, q, k, pos, m, sb, eb, grad_filter=FILTER)
    assert torch.equal(got[0], exact[0])
    assert_same(got, want)
    assert any(not torch.equal(g, e) for g, e in zip(got[1], exact[1]) if g is not None)


def test_grad_filter_independent_of_chunks_and_threads():
    q, k, pos, m = trained_like(dtype=torch.float32)
    logits = ref.global_pointer_logits(q, k, m).flatten(-2)
    grad = torch.ops.kxops.sparse_zlpr(logits, pos, -1, [True], "none", FILTER)[1]
    assert 0 < (grad != 0).float().mean() < 0.02  # the sparse products run
    want = loss_and_grads(fused, q, k, pos, m, None, None, grad_filter=FILTER)
    saved = torch.get_num_threads()
    try:
        for threads, block_bytes in ((1, None), (1, 1), (saved, 1), (saved, 2**62)):
            torch.set_num_threads(threads)
            got = loss_and_grads(fused, q, k, pos, m, None, None, grad_filter=FILTER,
                                 block_bytes=block_bytes)
            assert all(torch.equal(g, w) for g, w in zip(got[1][:2], want[1][:2]))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_filter_sparse_kernel_route_is_the_dense_route(biases, masked):
    """The filtered gradient taken in sparse form straight from the row kernel gives the bits
    of the kernel's dense gradient scanned block by block: a dense first batch (a random grid,
    most spans surviving) sends the chunks after it to the dense route, whose products of the
    second (trained-like) batch must equal that batch's alone (the sparse kernel route)."""
    q, k, pos, m = trained_like(batch=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    q[0] = 0.3 * torch.randn(q[0].shape, generator=gen)
    k[0] = torch.randn(k[0].shape, generator=gen)
    logits = ref.global_pointer_logits(q, k, m).flatten(-2)
    grad = torch.ops.kxops.sparse_zlpr(logits, pos, -1, [True], "none", FILTER)[1]
    assert (grad[0] != 0).float().mean() > 0.1 and (grad[1] != 0).float().mean() < 0.01
    sb = eb = None
    if biases:
        sb = torch.randn(q.shape[:3], generator=gen) / 8
        eb = torch.randn(q.shape[:3], generator=gen) / 8
    if masked:
        m[1, -7:] = False
    def loss_and_sum_grads(batches, **kwargs):
        leaves = [None if t is None else t[batches].clone().requires_grad_(True)
                  for t in (q, k, sb, eb)]
        loss = fused(leaves[0], leaves[1], pos[batches], m[batches], leaves[2], leaves[3],
                     **kwargs)
        loss.sum().backward()
        return loss.detach(), [None if t is None else t.grad for t in leaves]

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one chunk after the other, batch 0 first
        both = loss_and_sum_grads(slice(0, 2), grad_filter=FILTER)
        alone = loss_and_sum_grads(slice(1, 2), grad_filter=FILTER)
        exact = loss_and_sum_grads(slice(1, 2))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(both[0][1:], alone[0])
    for g, g_alone in zip(both[1], alone[1]):
        if g is not None:
            assert torch.equal(g[1:], g_alone)
    assert any(not torch.equal(g, e) for g, e in zip(alone[1], exact[1]) if g is not None)


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_filter_one_dense_block(threads):
    """Few surviving spans in all, but all in the last row block (more than 5% of it): that
    block takes the dense GEMMs, the others the sparse products."""
    gen = torch.Generator().manual_seed(4)
    length = 300
    q = 0.05 * torch.randn(1, 2, length, 8, generator=gen, dtype=torch.float64)
    k = 0.05 * torch.randn(1, 2, length, 8, generator=gen, dtype=torch.float64)
    q[..., -1], k[..., -1] = 4.0, -3.0
    q[:, :, 256:, -1] = 0.0  # the spans of the last block (rows 256..) near 0: they survive
    pos = torch.tensor([[[3 * length + 10, 270 * length + 280]] * 2])
    logits = ref.global_pointer_logits(q, k, None).flatten(-2)
    grad = torch.ops.kxops.sparse_zlpr(logits, pos, -1, [True], "none", FILTER)[1]
    assert 0 < (grad != 0).double().mean() < 0.05
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = loss_and_grads(fused, q, k, pos, None, None, None, grad_filter=FILTER)
    finally:
        torch.set_num_threads(saved)
    want = loss_and_grads(lambda *a, **kw: ref.global_pointer_zlpr_loss(
        *a[:4], start_bias=a[4], end_bias=a[5], reduction="none", **kw),
        q, k, pos, None, None, None, grad_filter=FILTER)
    assert_same(got, want)


def assert_same_bits(got, want):
    """Bit for bit, NaN where NaN."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g.isnan(), w.isnan())
            assert torch.equal(g.masked_fill(g.isnan(), 0), w.masked_fill(w.isnan(), 0))


def filtered_runs(q, k, pos, m, sb, eb, tril, cases):
    """The losses and gradients of the filtered op for each (reduction, block_bytes, which
    inputs require grad) case, flattened."""
    out = []
    for reduction, block_bytes, wanted in cases:
        leaves = [None if t is None else t.detach().clone().requires_grad_(i in wanted)
                  for i, t in enumerate((q, k, sb, eb))]
        loss = fused(leaves[0], leaves[1], pos, m, leaves[2], leaves[3], tril,
                     reduction=reduction, grad_filter=FILTER, block_bytes=block_bytes)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weights).sum().backward()
        out += [loss.detach()] + [t.grad for t in leaves if t is not None and t.requires_grad]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tril", [True, False])
def test_grad_filter_portable_route_same_bits(monkeypatch, dtype, tril):
    """The route CUDA takes (the dense filtered gradient of a chunk of heads converted at once
    with at:: ops, its entries re-keyed by a stable sort for the product kernel: one device
    sync per chunk), forced on the CPU with KXOPS_SPARSE_GRAD_PORTABLE=1: bit for bit the CPU's
    own route (its kernel's sparse output and packed_products), over ragged masks, biases, three
    row blocks, chunks of one, two and all heads, every reduction, gradient subsets and
    non-finite logits; the dense GEMMs (KXOPS_SPARSE_GRAD_MAX_DENSITY=0) give other bits, so the
    sparse products ran. Each output row sums many entries of random values, in an order that
    changes its bits: an unstable sort fails this test."""
    q, k, pos, m = trained_like(batch=2, heads=3, length=150, entities=6, dtype=dtype)
    m[0, 5:9] = False
    m[1, -20:] = False  # ragged: 146 and 130 valid steps, three row blocks each
    gen = torch.Generator().manual_seed(5)
    sb = (torch.randn(q.shape[:3], generator=gen, dtype=dtype) / 8).requires_grad_()
    eb = (torch.randn(q.shape[:3], generator=gen, dtype=dtype) / 8).requires_grad_()
    q_bad = q.clone()
    q_bad[0, 1, 3, 0] = torch.nan
    q_bad[1, 2, 10, 0] = torch.inf
    cases = [("none", None, {0, 1, 2, 3}), ("sum", 1, {0, 1, 2, 3}),
             ("mean", 300_000, {0, 1, 2, 3}), ("none", 1, {1}), ("sum", None, {0, 3})]

    def run():
        return (filtered_runs(q, k, pos, m, sb, eb, tril, cases)
                + filtered_runs(q, k, pos, m, None, None, tril, cases[:2])
                + filtered_runs(q_bad, k, pos, m, sb, eb, tril, cases[:1]))

    want = run()
    assert any(g.isnan().any() for g in want)
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_PORTABLE", "1")
    assert_same_bits(run(), want)
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", "0")
    dense = run()
    assert any(not torch.equal(g, w) for g, w in zip(dense[:5], want[:5]))


def test_grad_filter_portable_route_dense_blocks(monkeypatch):
    """A block too dense takes the dense GEMMs on both routes, the blocks around it the sparse
    products (grad k~ summed block after block across the two); a chunk whose every block is
    too dense is the dense route's result exactly."""
    gen = torch.Generator().manual_seed(4)
    length = 300  # five row blocks of 64
    q = 0.05 * torch.randn(1, 2, length, 8, generator=gen)
    k = 0.05 * torch.randn(1, 2, length, 8, generator=gen)
    q[..., -1], k[..., -1] = 4.0, -3.0
    q[:, :, 128:141, -1] = 0.0  # about a fifth of block 2's spans survive, few elsewhere
    pos = torch.tensor([[[3 * length + 10, 270 * length + 280]] * 2])
    sb = torch.randn(1, 2, length, generator=gen) / 8
    small = (q[..., :40, :].clone(), k[..., :40, :].clone(), pos.clamp(max=39))
    small[0][..., -1] = 0.0  # one block, most spans survive

    def run(args, sb):
        out = []
        for tril in (True, False):
            out += filtered_runs(*args, None, sb, None, tril, [("none", None, {0, 1, 2})])
        return out

    results = {}
    for portable, density in (("0", None), ("1", None), ("0", "0"), ("1", "0"), ("0", "1")):
        monkeypatch.setenv("KXOPS_SPARSE_GRAD_PORTABLE", portable)
        if density is None:
            monkeypatch.delenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", raising=False)
        else:
            monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", density)
        results[portable, density] = run((q, k, pos), sb), run(small, None)
    own, portable = results["0", None], results["1", None]
    dense, sparse = results["0", "0"], results["0", "1"]
    assert_same_bits(portable[0], own[0])
    assert_same_bits(portable[1], own[1])
    assert_same_bits(results["1", "0"][0], dense[0])
    assert_same_bits(own[1], dense[1])  # the small problem: the GEMMs only
    # The mixed problem's grad k (tril; without it too): neither all GEMMs nor all sparse.
    for i in (2, 6):
        assert not torch.equal(own[0][i], dense[0][i])
    assert not torch.equal(own[0][6], sparse[0][6])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", None])
def test_grad_filter_errors_name_it(bad):
    q, k, sb, eb, pos, m = make_problem()
    with pytest.raises(ValueError, match="grad_filter"):
        fused(q, k, pos, m, sb, eb, grad_filter=bad)
    with pytest.raises(ValueError, match="grad_filter"):
        OP(q, k, pos, m, sb, eb, True, -1, "none", [True] * 4, None, -1.0)
    for module in (kxops.nn.GlobalPointer, kxops.nn.EfficientGlobalPointer):
        with pytest.raises(ValueError, match="grad_filter"):
            module(8, 2, 4, grad_filter=bad)
        if bad is None:  # .loss's None: the constructor's filter
            continue
        head = module(8, 2, 4)
        with pytest.raises(ValueError, match="grad_filter"):
            head.loss(torch.randn(1, 5, 8), None, torch.zeros(1, 2, 1, dtype=torch.long),
                      grad_filter=bad)


@pytest.mark.parametrize("module", ["GlobalPointer", "EfficientGlobalPointer"])
def test_grad_filter_on_the_modules(module):
    torch.manual_seed(0)
    head = getattr(kxops.nn, module)(8, 2, 4, grad_filter=FILTER).double()
    hidden = torch.randn(2, 30, 8, dtype=torch.float64)
    positives = torch.randint(0, 900, (2, 2, 3))
    grads = []
    for kwargs in ({}, {"grad_filter": FILTER}):
        head.zero_grad()
        (head.loss(hidden, None, positives, **kwargs) * 1).backward()
        grads.append([p.grad.clone() for p in head.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    head.zero_grad()
    head.loss(hidden, None, positives, grad_filter=0.0).backward()
    assert any(not torch.equal(a, p.grad) for a, p in zip(grads[0], head.parameters()))
    # In the repr, as LinearZLPR's (only when set).
    assert f"grad_filter={FILTER}" in repr(head)
    assert "grad_filter" not in repr(getattr(kxops.nn, module)(8, 2, 4))


def test_grad_filter_opcheck():
    q, k, pos, m = trained_like(length=40)
    torch.library.opcheck(OP, (q, k, pos, m, None, None, True, -1, "mean", [True] * 4, None,
                               FILTER))


def test_grad_filter_compile_fullgraph():
    q, k, pos, m = trained_like(length=40, dtype=torch.float32)

    def loss(q, k, pos, mask, sb, eb):
        return fused(q, k, pos, mask, sb, eb, grad_filter=FILTER)

    compiled = torch.compile(loss, fullgraph=True)
    assert_same(loss_and_grads(compiled, q, k, pos, m, None, None),
                loss_and_grads(loss, q, k, pos, m, None, None))


def crowded(q, k, batch, gen):
    """Batch `batch` of q, k (float32) made a row whose spans all score near 0 but a few near
    +3 (negatives far above the rest) and its positives near +4: with more than 1/FILTER spans
    per row, a span near 0 is a filter candidate (e^{s - max} >= FILTER) yet below the filter
    (its gradient 1 / (1 + Z) < FILTER), so the row kernel's candidates overflow and the whole
    row is scanned against the exact bound; the spans near +3 survive."""
    q[batch] = 0.02 * torch.randn(q[batch].shape, generator=gen)
    k[batch] = 0.02 * torch.randn(k[batch].shape, generator=gen)
    q[batch, :, 10:14, 0], k[batch, :, 40:44, 0] = 2.0, 1.5


@pytest.mark.parametrize("second", ["trained", "crowded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_filter_sparse_kernel_route_at_block_sizes_and_threads(second, dtype):
    """The filtered gradient from the GlobalPointer row kernel's sparse output (the default
    route) is the filtered reference's, and bit for bit the same at every budget (one head per
    call, every head at once) and thread count; "crowded" takes its whole-row scan."""
    q, k, pos, m = trained_like(dtype=dtype)
    if second == "crowded":
        crowded(q, k, 1, torch.Generator().manual_seed(5))
        logits = ref.global_pointer_logits(q, k, m).flatten(-2)
        grad = torch.ops.kxops.sparse_zlpr(logits, pos, -1, [True], "none", FILTER)[1]
        assert 0 < (grad[1] != 0).double().mean() < 0.01
        relative = logits[1] - logits[1].amax(-1, keepdim=True)
        assert (relative > math.log(FILTER)).double().mean() > 0.5
    want = loss_and_grads(lambda *a, **kw: ref.global_pointer_zlpr_loss(
        *a[:4], start_bias=a[4], end_bias=a[5], reduction="none", **kw),
        q, k, pos, m, None, None, grad_filter=FILTER)
    first = None
    saved = torch.get_num_threads()
    try:
        for threads, block_bytes in ((1, None), (1, 1), (2, None), (2, 1), (2, 2**40)):
            torch.set_num_threads(threads)
            got = loss_and_grads(fused, q, k, pos, m, None, None, grad_filter=FILTER,
                                 block_bytes=block_bytes)
            assert_same(got, want)
            first = first or got
            assert torch.equal(got[0], first[0])
            assert all(torch.equal(g, w) for g, w in zip(got[1][:2], first[1][:2]))
    finally:
        torch.set_num_threads(saved)


def test_grad_filter_crowded_row_is_the_dense_route():
    """The whole-row scan (crowded row) gives the bits of the kernel's dense gradient, as
    test_grad_filter_sparse_kernel_route_is_the_dense_route checks for the candidates' route."""
    q, k, pos, m = trained_like(batch=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    q[0] = 0.3 * torch.randn(q[0].shape, generator=gen)
    k[0] = torch.randn(k[0].shape, generator=gen)
    crowded(q, k, 1, gen)

    def loss_and_sum_grads(batches, **kwargs):
        leaves = [t[batches].clone().requires_grad_(True) for t in (q, k)]
        loss = fused(leaves[0], leaves[1], pos[batches], m[batches], None, None, **kwargs)
        loss.sum().backward()
        return loss.detach(), [t.grad for t in leaves]

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # batch 0 (dense) first: batch 1 then takes the dense route
        both = loss_and_sum_grads(slice(0, 2), grad_filter=FILTER)
        alone = loss_and_sum_grads(slice(1, 2), grad_filter=FILTER)
        exact = loss_and_sum_grads(slice(1, 2))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(both[0][1:], alone[0]) and torch.equal(alone[0], exact[0])
    assert all(torch.equal(g[1:], g_alone) for g, g_alone in zip(both[1], alone[1]))
    assert not torch.equal(alone[1][0], exact[1][0])


@pytest.mark.parametrize("which", ["q", "k", "start"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_grad_filter_non_finite_rows(which, value):
    """A row the sparse kernel cannot sum (NaN, +inf) goes through the row kernel's exact path;
    -inf spans are masked ones. Other rows keep the sparse kernel's route."""
    q, k, pos, m = trained_like(dtype=torch.float32)
    sb = torch.zeros(q.shape[:3])
    t = {"q": q, "k": k, "start": sb}[which]
    t[1, 0, 5] = value
    ours = loss_and_grads(fused, q, k, pos, m, sb, None, grad_filter=FILTER)
    theirs = loss_and_grads(lambda *a, **kw: ref.global_pointer_zlpr_loss(
        *a[:4], start_bias=a[4], end_bias=a[5], reduction="none", **kw),
        q, k, pos, m, sb, None, grad_filter=FILTER)
    assert_same(ours, theirs)
    assert torch.isfinite(ours[0][0]).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_of_one_returns_the_op_gradients(masked, reduction):
    """loss.backward() (upstream gradient 1) takes the op's gradients as they are: the bits of
    any other upstream gradient's path (2, then halved: exact in binary), zeros at padded
    steps; retain_graph's second backward adds the same again (nothing aliased)."""
    q, k, sb, eb, pos, m = make_problem(dtype=torch.float32, mask="tail" if masked else None)
    grads = []
    for upstream in (None, torch.tensor(2.0)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, sb, eb)]
        loss = kxops.global_pointer_zlpr_loss(leaves[0], leaves[1], pos, m, start_bias=leaves[2],
                                              end_bias=leaves[3], reduction=reduction)
        loss.backward(upstream, retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        grads.append([g if upstream is None else g / 2 for g in first])
        loss.backward(upstream)
        assert all(torch.equal(t.grad, 2 * g) for t, g in zip(leaves, first))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    if masked:
        padded = (m == 0)[:, None, :]
        assert all((g.masked_select(padded if g.dim() == 3 else padded[..., None]) == 0).all()
                   for g in grads[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients(reduction):
    """torch.autograd.grad(..., is_grads_batched=True): the backward's upstream gradient is a
    (legacy) batched tensor, a plain torch.Tensor by type whose values cannot be read; the
    backward takes the scaling path for it (it raised "Batching rule not implemented for
    aten::item / is_nonzero" where it asked whether the upstream gradient is 1)."""
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, sb, eb, pos, m = make_problem(length=9, dtype=torch.float64)
    q.requires_grad_(True)
    loss = kxops.global_pointer_zlpr_loss(q, k, pos, m, start_bias=sb, end_bias=eb,
                                          reduction=reduction)
    one = torch.autograd.grad(loss, q, torch.ones_like(loss), retain_graph=True)[0]
    upstream = torch.stack([torch.ones_like(loss), torch.full_like(loss, 2.0)])
    batched = torch.autograd.grad(loss, q, upstream, is_grads_batched=True)[0]
    assert torch.equal(batched[0], one) and torch.equal(batched[1], 2 * one)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_gradients_are_not_the_saved_ones(reduction):
    """torch.autograd.grad(..., retain_graph=True) with an upstream gradient of 1: the caller's
    gradient is not the graph's saved one (it was, as it is, where k's gradient went unasked):
    changing it in place neither breaks the next backward ("modified by an inplace
    operation") nor, through .data, changes what it returns."""
    needs_kernel("global_pointer_zlpr", "cpu")
    # No bias: one present without requires_grad would have the backward recompute.
    q, k, _, _, pos, m = make_problem(length=9, dtype=torch.float64, start=False, end=False)
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = kxops.global_pointer_zlpr_loss(q, k, pos, m, reduction=reduction)
    upstream = torch.ones_like(loss)
    first = torch.autograd.grad(loss, q, upstream, retain_graph=True)[0]
    expected = first.clone()
    first.data.zero_()
    second = torch.autograd.grad(loss, q, upstream, retain_graph=True)[0]
    assert torch.equal(second, expected)
    second.mul_(3)
    loss.backward(upstream)
    assert torch.equal(q.grad, expected)
