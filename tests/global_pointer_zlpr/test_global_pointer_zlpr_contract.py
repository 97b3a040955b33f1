"""Contract probes of kxops.global_pointer_zlpr_loss, the kxops::global_pointer_zlpr op and the
GlobalPointer heads, written from the contract alone (each test fails where it is broken)."""

import copy

import pytest
import torch

import kxops
from kxops.nn import EfficientGlobalPointer, GlobalPointer
from kxops.reference import global_pointer_zlpr as ref
from tests.utils import TOLERANCES, assert_error_rule, needs_kernel, run_isolated

FUSED = kxops.global_pointer_zlpr_loss
NAN, INF = float("nan"), float("inf")


def _inputs(batch=2, heads=3, length=9, dim=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype)
    start = torch.randn(batch, heads, length, generator=gen, dtype=dtype)
    end = torch.randn(batch, heads, length, generator=gen, dtype=dtype)
    positives = torch.randint(0, length * length, (batch, heads, 6), generator=gen)
    mask = torch.ones(batch, length)
    mask[0, length - 3:] = 0  # a padded tail
    mask[1, 0] = mask[1, 3] = 0  # holes
    return q, k, start, end, positives, mask


def _loss_and_grads(fn, q, k, start, end, positives, mask, upstream=None, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (q, k, start, end)]
    loss = fn(leaves[0], leaves[1], positives, mask, start_bias=leaves[2], end_bias=leaves[3],
              **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _assert_same(ours, theirs, dtype=torch.float64):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ours[0], theirs[0], atol=atol, rtol=rtol, equal_nan=True)
    for name, a, b in zip(("q", "k", "start_bias", "end_bias"), ours[1], theirs[1]):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True, msg=name)


# --- finding: a non-finite upstream gradient reaches the padded steps ---------------------------

@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tril", [True, False])
def test_decode_equals_grid_threshold(cls, dtype, tril):
    torch.manual_seed(1)
    head = cls(16, 2, head_size=8, tril_mask=tril).to(dtype)
    hidden = torch.randn(2, 12, 16, dtype=dtype)
    mask = torch.ones(2, 12)
    mask[0, 4] = 0
    mask[1, 9:] = 0
    with torch.no_grad():
        grid = head(hidden, mask)
    finite = grid[torch.isfinite(grid)]
    for threshold in [0.0, -INF, NAN, *finite[:20].tolist()]:
        assert torch.equal(head.decode(hidden, mask, threshold=threshold),
                           (grid > threshold).nonzero()), threshold


# --- finding: wrong tensor kinds raise NotImplementedError, not TypeError ------------------------

@pytest.mark.parametrize("kind", ["sparse_mask", "quantized_mask", "sparse_q"])
def test_wrong_tensor_kind_raises_type_error(kind):
    q, k, _, _, positives, mask = _inputs(dtype=torch.float32)
    if kind == "sparse_mask":
        mask = mask.to_sparse()
    elif kind == "quantized_mask":
        mask = torch.quantize_per_tensor(mask, 1.0, 0, torch.quint8)
    else:
        q = q.to_sparse()
    with pytest.raises(TypeError):
        FUSED(q, k, positives, mask)


# --- the rules that hold --------------------------------------------------------------------------

def _variants():
    q, k, start, end, positives, mask = _inputs()
    odd = mask * 2
    odd[0, 1] = -1
    odd[1, 5] = NAN
    nan_padded = [t.clone() for t in (q, k, start, end)]
    nan_padded[0][0, :, 7] = NAN
    nan_padded[1][1, :, 3] = INF
    nan_padded[2][0, :, 8] = NAN
    nan_padded[3][1, :, 0] = -INF
    nan_kept = [t.clone() for t in (q, k, start, end)]
    nan_kept[0][0, 1, 2, 0] = NAN
    nan_kept[2][1, 2, 4] = INF
    nan_kept[3][1, 0, 5] = -INF
    dup = torch.tensor([0, 3 * 9 + 1, 3 * 9 + 1, 2 * 9 + 5, -1, 8 * 9 + 8]).expand(2, 3, 6)
    return {
        "plain": (q, k, start, end, positives, mask),
        "no_mask": (q, k, start, end, positives, None),
        "no_bias": (q, k, None, None, positives, mask),
        "start_only": (q, k, start, None, positives, mask),
        "end_only": (q, k, None, end, positives, mask),
        "mask_2_-1_nan": (q, k, start, end, positives, odd),
        "mask_all_zero": (q, k, start, end, positives, torch.zeros(2, 9, dtype=torch.int8)),
        "mask_bool": (q, k, start, end, positives, mask.bool()),
        "nan_inf_padded": (*nan_padded, positives, mask),
        "nan_inf_kept": (*nan_kept, positives, mask),
        "dup_below_diag_masked_expanded": (q, k, start, end, dup, mask),
        "int32_positives": (q, k, start, end, dup.int(), mask),
        "strided": (q.transpose(0, 1).contiguous().transpose(0, 1), k[..., :1].expand_as(k),
                    start, end, positives, mask[:, None].expand(2, 2, 9)[:, 0]),
    }


@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("variant", list(_variants()))
def test_matches_materialised_reference(variant, tril):
    args = _variants()[variant]
    for reduction in ("none", "mean"):
        ours = _loss_and_grads(FUSED, *args, tril=tril, reduction=reduction)
        theirs = _loss_and_grads(ref.global_pointer_zlpr_loss, *args, tril=tril,
                                 reduction=reduction)
        _assert_same(ours, theirs)


def test_ignore_index_values():
    q, k, start, end, _, mask = _inputs()
    dup = torch.tensor([0, 28, 28, 23, -1, 80]).expand(2, 3, 6)
    for ignore_index in (2**40, 5, -2**63):
        positives = torch.where(dup < 0, ignore_index, dup)
        ours = _loss_and_grads(FUSED, q, k, start, end, positives, mask,
                               ignore_index=ignore_index, reduction="none")
        theirs = _loss_and_grads(ref.global_pointer_zlpr_loss, q, k, start, end, positives, mask,
                                 ignore_index=ignore_index, reduction="none")
        _assert_same(ours, theirs)
    with pytest.raises(IndexError):
        FUSED(q, k, torch.full((2, 3, 1), -1, dtype=torch.int32), mask, ignore_index=2**40)
    with pytest.raises(IndexError):
        FUSED(q, k, torch.full((2, 3, 1), 81), mask)


def test_results_do_not_depend_on_block_bytes_or_threads():
    """Several row blocks (L > 512 valid steps), positives on the block edges."""
    q, k, start, end, _, _ = _inputs(batch=2, heads=3, length=600, dim=4)
    mask = torch.ones(2, 600)
    mask[0, ::7] = 0
    mask[1, 550:] = 0
    steps = torch.tensor([0, 63, 64, 127, 128, 129, 255, 256, 511, 512, 513, 599])
    positives = torch.cat([steps * 600 + (steps + 1).clamp(max=599), steps * 601], -1)
    positives = positives.expand(2, 3, -1)
    expected = _loss_and_grads(ref.global_pointer_zlpr_loss, q, k, start, end, positives, mask,
                               reduction="none")
    threads = torch.get_num_threads()
    try:
        for n in {1, max(2, threads)}:
            torch.set_num_threads(n)
            for block_bytes in (None, 1, 100_000):
                _assert_same(_loss_and_grads(FUSED, q, k, start, end, positives, mask,
                                             reduction="none", block_bytes=block_bytes),
                             expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)])
def test_empty_dims(shape):
    q, k = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    start, end = torch.randn(shape[:3], dtype=torch.float64), torch.randn(shape[:3],
                                                                           dtype=torch.float64)
    positives = torch.full((*shape[:2], 2), -1)
    for reduction in ("none", "sum", "mean"):
        _assert_same(_loss_and_grads(FUSED, q, k, start, end, positives, None,
                                     reduction=reduction),
                     _loss_and_grads(ref.global_pointer_zlpr_loss, q, k, start, end, positives,
                                     None, reduction=reduction))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_rule(dtype):
    q, k, start, end, positives, mask = _inputs(length=12, dim=8, seed=3)
    exact = _loss_and_grads(ref.global_pointer_zlpr_loss, q, k, start, end, positives, mask,
                            reduction="none")
    low = [t.to(dtype) for t in (q, k, start, end)]
    ours = _loss_and_grads(FUSED, *low, positives, mask, reduction="none")
    theirs = _loss_and_grads(ref.global_pointer_zlpr_loss, *low, positives, mask,
                             reduction="none")
    assert ours[0].dtype == dtype
    assert_error_rule(ours[0], theirs[0], exact[0], dtype)
    for a, b, c in zip(ours[1], theirs[1], exact[1]):
        assert a.dtype == dtype
        assert_error_rule(a, b, c, dtype)


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
    loss = FUSED(zeros, zeros, torch.tensor([[[2 * length + 7]]]), start_bias=start,
                 end_bias=end)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)


def test_float64_gradcheck():
    q, k, start, end, positives, mask = _inputs(length=6, dim=3)
    leaves = [t.requires_grad_() for t in (q, k, start, end)]
    for tril in (True, False):
        for reduction in ("none", "mean"):
            def fn(a, b, c, d, tril=tril, reduction=reduction):
                return FUSED(a, b, positives, mask, start_bias=c, end_bias=d, tril=tril,
                             reduction=reduction)

            assert torch.autograd.gradcheck(fn, leaves)


def test_compile_fullgraph_and_opcheck():
    needs_kernel("global_pointer_zlpr", "cpu")
    q, k, start, end, positives, mask = _inputs(length=6, dim=3)
    fn = torch.compile(lambda a, b, c, d: FUSED(a, b, positives, mask, start_bias=c, end_bias=d,
                                                reduction="sum"),
                       fullgraph=True, backend="aot_eager")
    compiled = _loss_and_grads(lambda a, b, p, m, start_bias, end_bias: fn(a, b, start_bias,
                                                                           end_bias),
                               q, k, start, end, positives, mask)
    eager = _loss_and_grads(FUSED, q, k, start, end, positives, mask, reduction="sum")
    _assert_same(compiled, eager)
    op = torch.ops.kxops.global_pointer_zlpr.default
    for compute_grad in (False, True):
        torch.library.opcheck(op, (q.requires_grad_(), k, positives, mask, start, end, True, -1,
                                   compute_grad, None))


def test_inputs_not_mutated():
    q, k, start, end, positives, mask = _inputs()
    originals = [t.clone() for t in (q, k, start, end, positives, mask)]
    _loss_and_grads(FUSED, q, k, start, end, positives, mask)
    torch.ops.kxops.global_pointer_zlpr(q, k, positives, mask, start, end, True, -1, True, 64)
    for before, after in zip(originals, (q, k, start, end, positives, mask)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
@pytest.mark.parametrize("tril", [True, False])
def test_module_loss_matches_grid_loss(cls, tril):
    torch.manual_seed(0)
    head = cls(16, 3, head_size=8, tril_mask=tril).double()
    twin = copy.deepcopy(head)
    hidden = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    mask[0, 2] = 0
    positives = torch.randint(0, 100, (2, 3, 4))
    positives[0, 0, 0] = -1
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss = head.loss(h1, mask, positives, reduction="sum")
    loss.backward()
    expected = kxops.sparse_zlpr_loss(twin(h2, mask).flatten(-2), positives, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h1.grad, h2.grad)
    for (name, p1), p2 in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_bad_arguments_raise_the_right_errors_public_and_op():
    """Every argument wrong in turn, through the public function and the op directly: the
    contract's error type, never a crash (run in a subprocess)."""
    code = """
    import torch, kxops
    op = torch.ops.kxops.global_pointer_zlpr
    q = torch.randn(2, 3, 7, 4); k = torch.randn(2, 3, 7, 4)
    sb = torch.randn(2, 3, 7); eb = torch.randn(2, 3, 7)
    pos = torch.randint(0, 49, (2, 3, 5)); mask = torch.ones(2, 7)
    meta = lambda t: t.to("meta")
    DEVICE = (RuntimeError, ValueError)
    cases = [
        (TypeError, dict(q=q.long(), k=k.long())), (TypeError, dict(q=q.cfloat(), k=k.cfloat())),
        (TypeError, dict(k=k.double())), (TypeError, dict(sb=sb.half())),
        (TypeError, dict(pos=pos.short())), (TypeError, dict(pos=pos.float())),
        (TypeError, dict(mask=mask.cfloat())),
        (ValueError, dict(q=q[0], k=k[0])), (ValueError, dict(k=k[..., :2])),
        (ValueError, dict(sb=sb[0])), (ValueError, dict(eb=eb[:, :, :3])),
        (ValueError, dict(pos=pos[:1])), (ValueError, dict(pos=pos[..., 0])),
        (ValueError, dict(mask=mask[0])), (ValueError, dict(mask=mask[:, :3])),
        (ValueError, dict(block=0)), (ValueError, dict(block=-5)),
        (IndexError, dict(pos=pos + 49)), (IndexError, dict(pos=pos - 50)),
        (DEVICE, dict(k=meta(k))), (DEVICE, dict(pos=meta(pos))),
        (DEVICE, dict(mask=meta(mask))), (DEVICE, dict(eb=meta(eb))),
    ]
    failures = []
    for expected, change in cases:
        a = dict(q=q, k=k, pos=pos, mask=mask, sb=sb, eb=eb, block=None, **{})
        a.update(change)
        calls = [("op", lambda: op(a["q"], a["k"], a["pos"], a["mask"], a["sb"], a["eb"], True,
                                   -1, False, a["block"]))]
        calls.append(("public", lambda: kxops.global_pointer_zlpr_loss(
            a["q"], a["k"], a["pos"], a["mask"], start_bias=a["sb"], end_bias=a["eb"],
            block_bytes=a["block"])))
        for where, call in calls:
            try:
                call()
                failures.append((where, sorted(change), "no error"))
            except expected:
                pass
            except Exception as e:
                failures.append((where, sorted(change), type(e).__name__))
    print("FAILURES", failures)
    """
    result = run_isolated(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAILURES []" in result.stdout, result.stdout[-2000:]
