"""ZLPR fuzz: the compiled ops against the reference over random shapes, dtypes, layouts and
NaN/inf at random positions (loss and gradient, inputs never mutated), and wrong arguments one
at a time. The hypothesis profile (quick in make test, long in make fuzz) is set in conftest."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kxops
from kxops import _checks
from kxops.reference import zlpr as ref
from tests.utils import DEVICES, assert_close, needs_kernel, run_isolated

pytestmark = pytest.mark.fuzz

LOGIT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LABEL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
                torch.float32, torch.float64]
# Empty, size 1, odd, and both sides of the CPU SIMD widths (4 doubles, 8 floats).
# (On CUDA: a warp per row up to 2048 classes, a block per row above.)
NUM_CLASSES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 67, 300, 2049]
LAYOUTS = ["contiguous", "strided", "offset", "transposed", "expanded"]
SPECIALS = [math.nan, math.inf, -math.inf]


def make(shape, layout, fill):
    """A tensor of `shape` in `layout` (fill(shape) makes contiguous storage), and the leaf
    whose gradient is compared (the storage the view was taken from)."""
    *lead, n = shape
    if layout == "strided":      # rows further apart than their length
        leaf = fill((*lead, n + 2))
        return leaf, lambda base: base[..., :n]
    if layout == "offset":       # the data starts one element in
        leaf = fill((*lead, n + 1))
        return leaf, lambda base: base[..., 1:]
    if layout == "transposed" and lead:   # the class dim is not the innermost
        leaf = fill((n, *lead))
        return leaf, lambda base: base.movedim(0, -1)
    if layout == "expanded" and lead:     # the first leading dim has stride 0
        leaf = fill((1, *lead[1:], n))
        return leaf, lambda base: base.expand(*lead, n)
    leaf = fill(tuple(shape))
    return leaf, lambda base: base


def sprinkle(tensor, count, generator):
    """Put `count` NaN/+inf/-inf values at random positions of a float tensor (in place)."""
    flat = tensor.view(-1)
    if not flat.numel():
        return
    index = torch.randint(0, flat.numel(), (count,), generator=generator)
    which = torch.randint(0, len(SPECIALS), (count,), generator=generator)
    for i, k in zip(index.tolist(), which.tolist()):
        flat[i] = SPECIALS[k]


@st.composite
def problems(draw, sparse=False):
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    n = draw(st.sampled_from(NUM_CLASSES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e30]))  # 1e30: huge terms
    tied = draw(st.booleans())                          # logits on a few values: ties
    masked = draw(st.sampled_from([0.0, 0.3, 1.0]))
    logit_specials = draw(st.integers(0, 3))

    def fill_logits(shape):
        s = torch.randn(shape, generator=generator, dtype=torch.float64)
        s = (s.round() if tied else s) * scale
        s[torch.rand(shape, generator=generator) < masked] = -math.inf
        sprinkle(s, logit_specials, generator)
        return s.to(dtype)

    logits_leaf, logits_view = make((*lead, n), draw(st.sampled_from(LAYOUTS)), fill_logits)
    problem = {"logits_leaf": logits_leaf, "logits_view": logits_view,
               "reduction": draw(st.sampled_from(_checks.REDUCTIONS))}
    if sparse:
        index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        # Past int32's range, an ignore_index marks nothing in int32 positives (no wrap).
        ignore_index = draw(st.sampled_from(
            [-1, -100] + ([n - 1, 2**32 + 1, -(2**40)] if n else [])))
        padding = index_dtype == torch.int64 or -(2**31) <= ignore_index < 2**31
        per_row = draw(st.integers(0, 5))

        def fill_positives(shape):
            p = torch.randint(0, max(n, 1), shape, generator=generator)
            if shape[-1] > 1:   # duplicates
                p[..., 1] = p[..., 0]
            if padding:
                p[torch.rand(shape, generator=generator) < (1.0 if n == 0 else 0.3)] = \
                    ignore_index
            return p.to(index_dtype)

        positives, positives_view = make((*lead, per_row), draw(st.sampled_from(LAYOUTS)),
                                         fill_positives)
        problem.update(positives=(positives, positives_view), ignore_index=ignore_index)
    else:
        label_dtype = draw(st.sampled_from(LABEL_DTYPES))
        soft = label_dtype.is_floating_point and draw(st.booleans())
        label_specials = draw(st.integers(0, 2)) if soft else 0

        def fill_labels(shape):
            if not soft:
                return (torch.rand(shape, generator=generator) < 0.3).to(label_dtype)
            t = torch.rand(shape, generator=generator, dtype=torch.float64)
            t[torch.rand(shape, generator=generator) < 0.2] = 0    # soft rows with hard ends
            t[torch.rand(shape, generator=generator) < 0.2] = 1
            sprinkle(t, label_specials, generator)
            return t.to(label_dtype)

        labels, labels_view = make((*lead, n), draw(st.sampled_from(LAYOUTS)), fill_labels)
        problem["labels"] = (labels, labels_view)
    return problem


def loss_and_grad(fn, problem):
    """The loss and the gradient of (loss * random weights) w.r.t. the logits' storage."""
    leaf = problem["logits_leaf"].detach().requires_grad_(True)
    loss = fn(problem["logits_view"](leaf))
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
    weights = weights.to(device=loss.device, dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, weights, allow_unused=True)
    return loss, torch.zeros_like(leaf) if grad is None else grad


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, tensors):
    for b, t in zip(before, tensors):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


def assert_matches(actual, expected, dtype):
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, dtype=dtype)


def on_device(problem, device):
    """The problem on `device`, its labels or positives as (storage, view of it)."""
    moved = dict(problem, logits_leaf=problem["logits_leaf"].to(device))
    for key in ("labels", "positives"):
        if key in problem:
            storage, view = problem[key]
            moved[key] = storage.to(device), view(storage.to(device))
    return moved


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems())
def test_fuzz_dense_kernel_matches_reference(device, problem):
    needs_kernel("zlpr", device)
    problem = on_device(problem, device)
    (storage, labels), reduction = problem["labels"], problem["reduction"]
    before = snapshot(problem["logits_leaf"], storage)
    actual = loss_and_grad(lambda s: kxops.zlpr_loss(s, labels, reduction=reduction), problem)
    expected = loss_and_grad(lambda s: ref.zlpr_loss(s, labels, reduction=reduction), problem)
    assert_matches(actual, expected, problem["logits_leaf"].dtype)
    assert_unchanged(before, [problem["logits_leaf"], storage])


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems(sparse=True))
def test_fuzz_sparse_kernel_matches_reference(device, problem):
    needs_kernel("sparse_zlpr", device)
    problem = on_device(problem, device)
    (storage, positives), ignore_index = problem["positives"], problem["ignore_index"]
    reduction = problem["reduction"]
    before = snapshot(problem["logits_leaf"], storage)

    def run(fn):
        return loss_and_grad(lambda s: fn(s, positives, ignore_index=ignore_index,
                                          reduction=reduction), problem)

    assert_matches(run(kxops.sparse_zlpr_loss), run(ref.sparse_zlpr_loss),
                   problem["logits_leaf"].dtype)
    assert_unchanged(before, [problem["logits_leaf"], storage])


# Wrong arguments, one at a time, applied to a valid call: (kwargs -> kwargs).
DENSE_MISTAKES = {
    "labels one class short": lambda a: {**a, "labels": a["labels"][..., :-1]},
    "labels an extra dim": lambda a: {**a, "labels": a["labels"][..., None]},
    "labels complex": lambda a: {**a, "labels": a["labels"].to(torch.complex64)},
    "labels a list": lambda a: {**a, "labels": a["labels"].tolist()},
    "logits integer": lambda a: {**a, "logits": a["logits"].long()},
    "logits 0-dim": lambda a: {**a, "logits": a["logits"].sum(), "labels": a["labels"].sum()},
    "reduction unknown": lambda a: {**a, "reduction": "avg"},
}
SPARSE_MISTAKES = {
    "positives float": lambda a: {**a, "positives": a["positives"].float()},
    "positives uint8": lambda a: {**a, "positives": a["positives"].to(torch.uint8)},
    "positives a row short": lambda a: {**a, "positives": a["positives"][:-1]},
    "positives an extra dim": lambda a: {**a, "positives": a["positives"][..., None]},
    "positives index = classes": lambda a: {**a, "positives": torch.full_like(
        a["positives"], a["logits"].shape[-1])},
    "positives index negative": lambda a: {**a, "positives": torch.full_like(
        a["positives"], -2)},
    "ignore_index float": lambda a: {**a, "ignore_index": -1.0},
    "ignore_index bool": lambda a: {**a, "ignore_index": True},
    "ignore_index past int64": lambda a: {**a, "ignore_index": 2**63},
    "logits integer": lambda a: {**a, "logits": a["logits"].long()},
    "reduction unknown": lambda a: {**a, "reduction": "avg"},
}


def error_of(call):
    try:
        call()
    except Exception as exc:
        return type(exc)
    return None


@given(rows=st.integers(1, 4), n=st.integers(1, 20), per_row=st.integers(1, 3),
       dtype=st.sampled_from(LOGIT_DTYPES), mistake=st.sampled_from(sorted(DENSE_MISTAKES)),
       sparse_mistake=st.sampled_from(sorted(SPARSE_MISTAKES)))
def test_fuzz_wrong_arguments_raise_like_the_reference(rows, n, per_row, dtype, mistake,
                                                       sparse_mistake):
    needs_kernel("zlpr", "cpu")
    dense = DENSE_MISTAKES[mistake]({"logits": torch.randn(rows, n).to(dtype),
                                     "labels": torch.rand(rows, n) < 0.5, "reduction": "mean"})
    expected = error_of(lambda: ref.zlpr_loss(**dense))
    assert expected is not None and error_of(lambda: kxops.zlpr_loss(**dense)) is expected
    sparse = SPARSE_MISTAKES[sparse_mistake]({
        "logits": torch.randn(rows, n).to(dtype), "positives": torch.randint(0, n, (rows, per_row)),
        "ignore_index": -1, "reduction": "mean"})
    expected = error_of(lambda: ref.sparse_zlpr_loss(**sparse))
    assert expected is not None
    assert error_of(lambda: kxops.sparse_zlpr_loss(**sparse)) is expected


def test_fuzz_direct_ops_wrong_arguments_never_crash():
    """torch.ops.kxops.* with one argument wrong (shape, dtype, index): an error, never a
    crash, in a subprocess that runs this profile's number of examples."""
    examples = settings().max_examples
    result = run_isolated(f"""
        import torch, kxops
        from hypothesis import given, settings, strategies as st

        WRONG = ["labels shape", "labels dtype", "logits dtype", "positives shape",
                 "positives dtype", "positives index", "grad_loss shape", "grad_loss dtype",
                 "grad dtype"]

        @settings(max_examples={examples}, deadline=None, derandomize=True, database=None)
        @given(rows=st.integers(0, 70), n=st.integers(1, 70), extra=st.integers(1, 70),
               wrong=st.sampled_from(WRONG))
        def check(rows, n, extra, wrong):
            logits, labels = torch.randn(rows, n), torch.rand(rows, n) < 0.5
            positives = torch.randint(0, n, (rows, 2))
            grad_loss, grad = torch.rand(rows), torch.randn(rows, n)
            ops = torch.ops.kxops
            call = {{
                "labels shape": lambda: ops.zlpr(logits, torch.ones(rows + extra, n), [True]),
                "labels dtype": lambda: ops.zlpr(logits, labels.to(torch.complex64), [True]),
                "logits dtype": lambda: ops.zlpr(logits.int(), labels, [True]),
                "positives shape": lambda: ops.sparse_zlpr(
                    logits, torch.zeros(rows + extra, 2, dtype=torch.long), -1, [True]),
                "positives dtype": lambda: ops.sparse_zlpr(logits, positives.short(), -1, [True]),
                "positives index": lambda: ops.sparse_zlpr(
                    torch.randn(rows + 1, n), torch.full((rows + 1, 1), n + extra - 1), -1,
                    [True]),
                "grad_loss shape": lambda: ops.zlpr_backward(torch.rand(rows + extra), grad),
                "grad_loss dtype": lambda: ops.zlpr_backward(grad_loss.long(), grad),
                "grad dtype": lambda: ops.zlpr_backward(grad_loss, grad.long()),
            }}[wrong]
            try:
                call()
            except (TypeError, ValueError, IndexError):
                return
            raise AssertionError(f"no error: {{wrong}} rows={{rows}} n={{n}} extra={{extra}}")

        check()
        print("ALL RAISED")
    """, timeout=300)
    assert result.returncode == 0 and "ALL RAISED" in result.stdout, result.stderr[-3000:]


@given(rows=st.integers(0, 5), n=st.sampled_from(NUM_CLASSES),
       per_row=st.integers(1, 4), dtype=st.sampled_from([torch.float64, torch.float32]),
       exponent=st.integers(-20, -1), special=st.sampled_from([None, *SPECIALS]),
       seed=st.integers(0, 2**16))
def test_fuzz_grad_filter_drops_exactly_the_negatives_below_it(rows, n, per_row, dtype,
                                                                exponent, special, seed):
    """sparse_zlpr's grad_filter f: each row's gradient (no scale) is the unfiltered one with
    exactly its negative entries below f set to 0, NaN/inf rows included; the loss unchanged."""
    needs_kernel("zlpr", "cpu")
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, n, generator=gen, dtype=torch.float64) * 6).to(dtype)
    if special is not None and logits.numel():
        logits.view(-1)[seed % logits.numel()] = special
    positives = torch.randint(-1, max(n, 1), (rows, per_row), generator=gen) if n else \
        torch.full((rows, per_row), -1)
    f = 2.0**exponent
    loss, exact = torch.ops.kxops.sparse_zlpr(logits, positives, -1, [True], "none")
    loss_f, got = torch.ops.kxops.sparse_zlpr(logits, positives, -1, [True], "none", f)
    labels = ref.positives_to_dense(positives, -1, n)
    drop = ~labels & (exact < f)
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, torch.where(drop, 0, exact), rtol=0, atol=0, equal_nan=True)
