"""kxops.linear_sparse_zlpr_loss and kxops.nn.LinearZLPR: the same loss and gradients as
sparse_zlpr_loss(F.linear(...)) without the [N, C] logits (fused single-process path, the
recompute path of reduction "none", label parallel over gloo), its errors and its memory bound."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kxops
from benchmarks.harness import peak_extra_bytes, peak_rss_growth_bytes
from kxops import _ext
from tests.utils import (
    assert_close,
    assert_error_rule,
    direct_call_outcomes,
    needs_kernel,
    run_isolated,
)

OPS = ("linear_sparse_zlpr", "linear_sparse_zlpr_backward", "linear_sparse_zlpr_partials",
       "linear_sparse_zlpr_partials_backward")
REDUCTIONS = ("mean", "sum", "none")


def make(rows=(9,), d=5, classes=13, per_row=4, dtype=torch.float64, bias=True, scale=1.0,
         device="cpu"):
    x = (torch.randn(*rows, d, dtype=dtype, device=device) * scale).requires_grad_()
    w = (torch.randn(classes, d, dtype=dtype, device=device) * scale).requires_grad_()
    b = torch.randn(classes, dtype=dtype, device=device).requires_grad_() if bias else None
    positives = torch.randint(0, max(classes, 1), (*rows, per_row), device=device)
    if positives.numel() > 2 and classes > 0:
        flat = positives.view(-1, per_row)
        flat[0, 1] = -1  # padding
        flat[-1, -1] = flat[-1, 0]  # a duplicate counts once
    elif classes == 0:
        positives.fill_(-1)
    return x, w, b, positives


def params(x, w, b):
    return [t for t in (x, w, b) if t is not None]


def loss_and_grads(fn, x, w, b, positives, reduction, grad_out=None, **kw):
    loss = fn(x, w, positives, b, reduction=reduction, **kw)
    if grad_out is None:
        grad_out = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, params(x, w, b), grad_out, allow_unused=True)
    return loss, grads, grad_out


def materialised(x, w, positives, b=None, *, reduction="mean", ignore_index=-1):
    return kxops.sparse_zlpr_loss(F.linear(x, w, b), positives, ignore_index=ignore_index,
                                  reduction=reduction)


def assert_matches_materialised(x, w, b, positives, reduction, **kw):
    """The fused loss and its gradients (under a random upstream gradient) equal the
    materialised path's."""
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           reduction, **kw)
    want, want_grads, _ = loss_and_grads(materialised, x, w, b, positives, reduction, grad_out)
    assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        assert_close(got, ref)


def plain_float64(x, w, positives, b=None, *, reduction="mean", ignore_index=-1):
    """The loss formula written out in float64 (small logits: no stabilisation needed)."""
    s = F.linear(x.double(), w.double(), None if b is None else b.double())
    t = kxops.reference.zlpr.positives_to_dense(positives, ignore_index, s.shape[-1]).double()
    row = (torch.log1p(((1 - t) * s.exp()).sum(-1)) + torch.log1p((t * (-s).exp()).sum(-1)))
    return {"mean": row.mean(), "sum": row.sum(), "none": row}[reduction]


@pytest.fixture(autouse=True)
def _kernel():
    needs_kernel("linear_sparse_zlpr", "cpu")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(9,), (2, 3, 4), ()])
@pytest.mark.parametrize("block_rows", [None, 2])
def test_matches_materialised_and_float64(reduction, dtype, bias, rows, block_rows):
    x, w, b, positives = make(rows, dtype=dtype, bias=bias)
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           reduction, block_rows=block_rows)
    want, want_grads, _ = loss_and_grads(materialised, x, w, b, positives, reduction, grad_out)
    exact, exact_grads, _ = loss_and_grads(plain_float64, x, w, b, positives, reduction,
                                           grad_out.double())
    assert loss.dtype == dtype and loss.shape == want.shape
    assert_close(loss, want)
    assert_close(loss.double(), exact, dtype)
    for got, ref, ex in zip(grads, want_grads, exact_grads):
        assert got.dtype == dtype
        assert_close(got, ref)
        assert_close(got.double(), ex.double(), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    x, w, b, positives = make((5,), d=3, classes=7)
    for block_rows in (None, 2):
        def loss(x, w, b, block_rows=block_rows):
            return kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction=reduction,
                                                 block_rows=block_rows)
        assert torch.autograd.gradcheck(loss, (x, w, b))


def test_only_some_inputs_need_grad():
    x, w, b, positives = make()
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        leaves = [t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        for fn in (kxops.linear_sparse_zlpr_loss, materialised):
            fn(leaves[0], leaves[1], positives, leaves[2]).backward()
        # Each leaf accumulated the fused and the materialised gradient: twice the latter.
        reference = [t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        materialised(reference[0], reference[1], positives, reference[2]).backward()
        for leaf, ref, n in zip(leaves, reference, needs):
            assert (leaf.grad is None) == (not n)
            if n:
                assert_close(leaf.grad, 2 * ref.grad)


def test_no_grad_and_exact_when_positives_dominate():
    # Positives with huge logits: the negative sum must not be lost to cancellation.
    x = torch.eye(4, dtype=torch.float64)
    w = torch.cat([torch.eye(4) * 40, torch.full((6, 4), -3.0)]).double()
    positives = torch.arange(4).view(4, 1)
    with torch.no_grad():
        loss = kxops.linear_sparse_zlpr_loss(x, w, positives, reduction="none")
    exact = plain_float64(x, w, positives, reduction="none")
    torch.testing.assert_close(loss, exact, rtol=1e-12, atol=0)
    loss32 = kxops.linear_sparse_zlpr_loss(x.float(), w.float(), positives, reduction="none")
    torch.testing.assert_close(loss32.double(), exact, rtol=1e-6, atol=0)


def test_opcheck():
    x, w, b, positives = make((2, 3))
    mask = [True, True, True]
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr,
                          (x, w, b, positives, -1, "mean", mask, 2))
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr,
                          (x, w, None, positives, -1, "sum", [True, False, False], 0))
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr,
                          (x, w, b, positives, -1, "none", [False, False, False], 2))
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr_backward,
                          (torch.randn(2, 3, dtype=torch.float64), x.detach(), w.detach(),
                           b.detach(), positives, -1, mask, 2))
    partial_args = (x.detach(), w.detach(), b.detach(), positives, -1, 3, 20, 2)
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr_partials, partial_args)
    log_z = torch.rand(2, 3, 2, dtype=torch.float64) + 1
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr_partials_backward,
                          (torch.randn(2, 3, dtype=torch.float64), log_z, *partial_args[:-1],
                           mask, 2))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x, w, b, positives = make((6,))

    def step(x, w, b):
        return kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction=reduction).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads, _ = loss_and_grads(lambda x, w, p, b, reduction: compiled(x, w, b), x, w, b,
                                    positives, reduction, torch.tensor(1.0, dtype=x.dtype))
    want, want_grads, _ = loss_and_grads(lambda x, w, p, b, reduction: step(x, w, b), x, w, b,
                                         positives, reduction, torch.tensor(1.0, dtype=x.dtype))
    assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        assert_close(got, ref)
    with torch.no_grad():
        assert_close(compiled(x, w, b), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_error_rule(dtype, reduction):
    x64, w64, b64, positives = make((40,), d=16, classes=300, per_row=6, scale=0.5)
    grad_out = torch.rand(() if reduction != "none" else (40,), dtype=torch.float64) + 0.5
    exact, exact_grads, _ = loss_and_grads(plain_float64, x64, w64, b64, positives, reduction,
                                           grad_out)
    low = [t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64)]
    ours, our_grads, _ = loss_and_grads(kxops.linear_sparse_zlpr_loss, *low[:2], low[2],
                                        positives, reduction, grad_out.to(dtype), block_rows=7)
    theirs, their_grads, _ = loss_and_grads(materialised, *low[:2], low[2], positives,
                                            reduction, grad_out.to(dtype))
    assert ours.dtype == dtype and all(g.dtype == dtype for g in our_grads)
    assert_error_rule(ours, theirs, exact, dtype)
    for o, t, e in zip(our_grads, their_grads, exact_grads):
        assert_error_rule(o, t, e, dtype)


def test_autocast_matches_materialised_under_autocast():
    x, w, b, positives = make((8,), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b,
                                                   positives, "mean")
        theirs, their_grads, _ = loss_and_grads(materialised, x, w, b, positives, "mean",
                                                grad_out)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_close(ours, theirs)
    for o, t in zip(our_grads, their_grads):
        assert o.dtype == t.dtype == torch.float32
        assert_close(o, t, torch.bfloat16)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [dict(rows=(0,)), dict(classes=0), dict(d=0),
                                   dict(per_row=0), dict(rows=(3, 0))])
def test_empty(reduction, shape):
    x, w, b, positives = make(**shape)
    assert_matches_materialised(x, w, b, positives, reduction)


def test_non_contiguous_inputs():
    x, w, _, _ = make((6,), d=5, classes=11)
    xt = x.detach().t().contiguous().t().requires_grad_()  # strides (1, 6)
    wt = w.detach().t().contiguous().t().requires_grad_()
    bt = torch.randn(11, 2, dtype=torch.float64)[:, 0].requires_grad_()
    pt = torch.randint(0, 11, (4, 6)).t()
    for reduction in REDUCTIONS:
        assert_matches_materialised(xt, wt, bt, pt, reduction, block_rows=4)


@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_follow_the_materialised_path(where, value, reduction):
    x, w, b, positives = make((5,), d=3, classes=8)
    with torch.no_grad():
        {"input": x, "weight": w, "bias": b}[where].view(-1)[1] = value
    assert_matches_materialised(x, w, b, positives, reduction, block_rows=2)


def test_inputs_not_mutated():
    x, w, b, positives = make((7,))
    before = [t.detach().clone() for t in (x, w, b, positives)]
    for reduction in REDUCTIONS:
        loss = kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction=reduction,
                                             block_rows=3)
        loss.sum().backward()
    for t, saved in zip((x, w, b, positives), before):
        assert torch.equal(t.detach(), saved)


def test_retained_graph_backward_after_grad_changed_in_place():
    """Each backward of a retained graph gives the same gradient, whatever was done in place to
    .grad in between (the gradient outputs are differentiable, so saved as outputs: a backward
    returning one as it is would hand autograd the saved tensor itself as .grad)."""
    x, w, b, positives = make((6,), dtype=torch.float32)
    loss = kxops.linear_sparse_zlpr_loss(x, w, positives, b, block_rows=4)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    want = [g.clone() for g in first]
    for _ in range(2):
        for t, total, g in zip((x, w, b), want, first):
            t.grad.mul_(0.5)
            total.mul_(0.5).add_(g)
        loss.backward(retain_graph=True)
    assert all(torch.equal(t.grad, total) for t, total in zip((x, w, b), want))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_of_one_returns_the_op_gradients(reduction):
    """loss.backward() (upstream gradient 1) takes the op's gradients as they are: the bits of
    any other upstream gradient's path (2, then halved: exact in binary)."""
    x, w, b, positives = make((6,), dtype=torch.float32)
    grads = []
    for upstream in (None, torch.tensor(2.0)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = kxops.linear_sparse_zlpr_loss(*leaves[:2], positives, leaves[2],
                                             reduction=reduction, block_rows=4)
        loss.backward(upstream)
        grads.append([t.grad if upstream is None else t.grad / 2 for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients(reduction):
    """torch.autograd.grad(..., is_grads_batched=True): a batched upstream gradient, whose
    values cannot be read, takes the scaling path."""
    x, w, b, positives = make((6,))
    loss = kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction=reduction, block_rows=4)
    one = torch.autograd.grad(loss, w, torch.ones_like(loss), retain_graph=True)[0]
    upstream = torch.stack([torch.ones_like(loss), torch.full_like(loss, 2.0)])
    batched = torch.autograd.grad(loss, w, upstream, is_grads_batched=True)[0]
    torch.testing.assert_close(batched[0], one, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched[1], 2 * one, rtol=1e-12, atol=0)


def test_retained_graph_gradients_are_not_the_saved_ones():
    """torch.autograd.grad(..., retain_graph=True) with an upstream gradient of 1: the caller's
    gradient is not the graph's saved one: changing it in place neither breaks the next
    backward nor, through .data, changes what it returns."""
    x, w, b, positives = make((6,))
    loss = kxops.linear_sparse_zlpr_loss(x, w, positives, b, block_rows=4)
    first = torch.autograd.grad(loss, w, retain_graph=True)[0]
    expected = first.clone()
    first.data.zero_()
    second = torch.autograd.grad(loss, w, retain_graph=True)[0]
    assert torch.equal(second, expected)
    second.mul_(3)
    loss.backward()
    assert torch.equal(w.grad, expected)


_HUGE_PAGES_PROBE = """
import torch, kxops
def fallbacks():  # huge-page faults the kernel served with small pages (none free)
    with open("/proc/vmstat") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("thp_fault_fallback "))
before = fallbacks()
x = torch.randn(8, 128, requires_grad=True)
w = torch.randn(65536, 128, requires_grad=True)  # a 32 MiB weight gradient: hinted
kxops.linear_sparse_zlpr_loss(x, w, torch.randint(0, 65536, (8, 3))).backward()
first, last = w.grad.data_ptr(), w.grad.data_ptr() + w.grad.nbytes
huge, inside = 0, False
with open("/proc/self/smaps") as smaps:  # the mappings over the gradient (the hint splits one)
    for line in smaps:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            begin, end = (int(v, 16) for v in head.split("-"))
            inside = begin < last and first < end
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1])
print("HUGE_KB", huge, "FALLBACKS", fallbacks() - before)
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _huge_kb(result):
    """(AnonHugePages kB of the weight gradient's mapping, huge-page faults that fell back)."""
    assert result.returncode == 0, result.stderr[-2000:]
    words = result.stdout.split()
    return int(words[words.index("HUGE_KB") + 1]), int(words[words.index("FALLBACKS") + 1])


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs Linux THP in 'madvise' mode")
def test_large_buffers_get_huge_pages_unless_turned_off():
    """The weight gradient (32 MiB) is allocated with the huge-page hint: huge pages back it
    where THP honours madvise (unless the kernel had none free), none under
    KXOPS_CPU_HUGE_PAGES=0; any other value is refused, naming the variable."""
    needs_kernel("linear_sparse_zlpr", "cpu")
    hinted, fallbacks = _huge_kb(run_isolated(_HUGE_PAGES_PROBE))
    assert hinted >= 16 * 1024 or fallbacks > 0, (hinted, fallbacks)
    off, _ = _huge_kb(run_isolated(_HUGE_PAGES_PROBE, env={"KXOPS_CPU_HUGE_PAGES": "0"}))
    assert off == 0
    bad = run_isolated(_HUGE_PAGES_PROBE, env={"KXOPS_CPU_HUGE_PAGES": "yes"})
    assert bad.returncode != 0 and "KXOPS_CPU_HUGE_PAGES must be '0' or '1'" in bad.stderr


def test_double_backward():
    """Mean/sum: second derivatives through the reference (a gradgradcheck); "none" (its
    backward is an op of its own) refuses them."""
    x, w, b, positives = make((4,), d=3, classes=6)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction="sum"),
        (x, w, b))
    loss = kxops.linear_sparse_zlpr_loss(x, w, positives, b, reduction="none").sum()
    grad = torch.autograd.grad(loss, w, create_graph=True)[0]
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.autograd.grad(grad.sum(), x)


def test_direct_op_without_the_gradients_recomputes_them():
    x, w, b, positives = make()
    loss = torch.ops.kxops.linear_sparse_zlpr(x, w, b, positives, -1, "mean",
                                              [False, False, False], 0)[0]
    got = torch.autograd.grad(loss, (x, w, b))
    want = torch.autograd.grad(materialised(x, w, positives, b), (x, w, b))
    for g, r in zip(got, want):
        assert_close(g, r)


def test_functorch_falls_back_to_the_reference():
    x, w, _, positives = make()
    got = torch.func.grad(lambda w: kxops.linear_sparse_zlpr_loss(x.detach(), w, positives))(
        w.detach())
    want = torch.autograd.grad(materialised(x.detach(), w, positives), w)[0]
    assert_close(got, want)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(weight=torch.zeros(5, 4)), TypeError, "weight has dtype"),
    (dict(weight=torch.zeros(5, 3, dtype=torch.float64)), ValueError, "weight must be"),
    (dict(weight=torch.zeros(5, dtype=torch.float64)), ValueError, "weight must be"),
    (dict(bias=torch.zeros(4, dtype=torch.float64)), ValueError, "bias must have shape"),
    (dict(bias=torch.zeros(5)), TypeError, "bias has dtype"),
    (dict(bias=3), TypeError, "bias must be a Tensor"),
    (dict(positives=torch.zeros(3, 2)), TypeError, "int32 or int64"),
    (dict(positives=torch.zeros(4, 2, dtype=torch.int64)), ValueError, "positives shape"),
    (dict(positives=[1, 2]), TypeError, "positives must be a Tensor"),
    (dict(positives=torch.tensor([[5], [0], [0]])), IndexError, "out of range"),
    (dict(positives=torch.tensor([[-2], [0], [0]])), IndexError, "out of range"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(block_rows=0), ValueError, "block_rows"),
    (dict(block_rows=2.0), TypeError, "block_rows"),
    (dict(input=torch.zeros((), dtype=torch.float64)), ValueError, "at least 1 dim"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64).to_sparse()), TypeError, "dense"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64, device="meta")), RuntimeError,
     "weight is on meta but input is on cpu"),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_errors(kwargs, error, match, reduction):
    args = dict(input=torch.zeros(3, 4, dtype=torch.float64),
                weight=torch.zeros(5, 4, dtype=torch.float64),
                positives=torch.zeros(3, 2, dtype=torch.int64),
                bias=torch.zeros(5, dtype=torch.float64), reduction=reduction)
    args.update(kwargs)
    with pytest.raises(error, match=rf"^kxops\.linear_sparse_zlpr: .*{match}"):
        kxops.linear_sparse_zlpr_loss(**args)


def test_public_block_rows_beyond_int64_works():
    """block_rows is any int >= 1 and the results do not depend on it."""
    x, w, b, positives = make()
    assert_close(kxops.linear_sparse_zlpr_loss(x, w, positives, b, block_rows=2**64),
                 kxops.linear_sparse_zlpr_loss(x, w, positives, b))


# A bad argument of each kind: the wrapper, the C++ op and its fake kernel (meta tensors) say
# the same words, the registered op's name first.
SAME_WORDS = {
    "input dtype": dict(input=torch.zeros(3, 4, dtype=torch.int64)),
    "weight dtype": dict(weight=torch.zeros(5, 4)),
    "weight shape": dict(weight=torch.zeros(5, 3, dtype=torch.float64)),
    "bias shape": dict(bias=torch.zeros(4, dtype=torch.float64)),
    "positives shape": dict(positives=torch.zeros(4, 2, dtype=torch.int64)),
    "input 0-dim": dict(input=torch.zeros((), dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(SAME_WORDS))
def test_wrapper_op_and_fake_kernel_raise_the_same_message(case):
    args = dict(input=torch.zeros(3, 4, dtype=torch.float64),
                weight=torch.zeros(5, 4, dtype=torch.float64),
                bias=torch.zeros(5, dtype=torch.float64),
                positives=torch.zeros(3, 2, dtype=torch.int64))
    args.update(SAME_WORDS[case])
    messages = []
    for device in ("cpu", "meta"):
        x, w, b, p = (t.to(device) for t in (args["input"], args["weight"], args["bias"],
                                             args["positives"]))
        with pytest.raises(Exception) as op_error:
            torch.ops.kxops.linear_sparse_zlpr(x, w, b, p, -1, "mean", [True] * 3, 0)
        messages.append((type(op_error.value), str(op_error.value).splitlines()[0]))
    with pytest.raises(Exception) as wrapper_error:
        kxops.linear_sparse_zlpr_loss(args["input"], args["weight"], args["positives"],
                                      args["bias"])
    if case != "input dtype":  # the wrapper takes any float dtype (int64: "floating-point")
        messages.append((type(wrapper_error.value), str(wrapper_error.value)))
    assert len(set(messages)) == 1, messages
    error, message = messages[0]
    assert error in (TypeError, ValueError) and message.startswith("kxops.linear_sparse_zlpr: ")


# Each op's arguments in schema order, as expressions over the good tensors of ATTACK_PRELUDE.
ATTACK_CALLS = {
    "linear_sparse_zlpr": ("x", "w", "b", "p", "-1", "'mean'", "m", "0", "0.0"),
    "linear_sparse_zlpr_backward": ("g", "x", "w", "b", "p", "-1", "m", "0", "0.0"),
    "linear_sparse_zlpr_partials": ("x", "w", "b", "p", "-1", "0", "5", "0"),
    "linear_sparse_zlpr_partials_backward": ("g", "z", "x", "w", "b", "p", "-1", "0", "5", "m",
                                             "0", "0.0"),
}
ATTACK_PRELUDE = """
f = torch.float64
x, w, b = torch.zeros(3, 4, dtype=f), torch.zeros(5, 4, dtype=f), torch.zeros(5, dtype=f)
p, m = torch.zeros(3, 2, dtype=torch.int64), [True, True, True]
g, z = torch.zeros(3, dtype=f), torch.ones(3, 2, dtype=f)
"""
ATTACK_TENSOR_VARIANTS = {"None": "None", "dtype": "{}.to(torch.int8)",
                          "shape": "{}.unsqueeze(0)", "meta": "{}.to('meta')"}
# The one variant that is a valid argument: no bias.
ATTACK_VALID = {("b", "None")}


def _attack_cases():
    """{case: call}: each argument of each op wrong in turn."""
    cases = {}
    for op, args in ATTACK_CALLS.items():
        for i, arg in enumerate(args):
            if arg in ("x", "w", "b", "p", "g", "z"):
                variants = {k: v.format(arg) for k, v in ATTACK_TENSOR_VARIANTS.items()}
            elif arg == "m":
                variants = {"grad_mask short": "[True, True]", "grad_mask long": "[True] * 4"}
            elif arg == "'mean'":
                variants = {"reduction": "'avg'"}
            elif arg == "0.0":
                variants = {"grad_filter": "float('nan')"}
            else:  # the ints: ignore_index takes any int64; the others must be >= 0
                variants = {"negative": "-7"} if arg != "-1" else {}
            for name, value in variants.items():
                call = ", ".join((*args[:i], value, *args[i + 1:]))
                cases[f"{op} {i}:{arg} {name}"] = f"torch.ops.kxops.{op}({call})"
    return cases


def test_every_argument_wrong_in_turn_in_a_subprocess():
    """Each argument of the four ops wrong in turn (None, dtype, shape, meta device, grad_mask
    length, bad values): never a crash (one subprocess for all), always an exception; the op's
    own checks name it first (a grad_mask of the wrong length is torch's schema error)."""
    outcomes = direct_call_outcomes(_attack_cases(), ATTACK_PRELUDE)
    assert len(outcomes) == len(_attack_cases())
    for case, outcome in outcomes.items():
        op, position, variant = case.split(" ", 2)
        arg = position.partition(":")[2]
        if (arg, variant) in ATTACK_VALID:
            assert outcome == "no error", (case, outcome)
            continue
        error, _, message = outcome.partition(" ")
        assert error in ("TypeError", "ValueError", "RuntimeError", "IndexError"), (case, outcome)
        if not variant.startswith("grad_mask"):
            assert message.startswith(f"kxops.{op}: "), (case, outcome)


def test_fake_kernels_say_what_the_cpp_ops_say():
    """Each wrong dtype, shape or value of ATTACK_CALLS: the fake kernels (every tensor on
    meta, in this process: Python only) raise what the C++ ops raise on CPU."""
    cases = {case: call for case, call in _attack_cases().items()
             if not case.endswith(("None", "meta")) and "grad_mask" not in case}
    on_cpu = direct_call_outcomes(cases, ATTACK_PRELUDE)
    scope = {"torch": torch}
    exec(ATTACK_PRELUDE, scope)
    scope.update({k: scope[k].to("meta") for k in ("x", "w", "b", "p", "g", "z")})
    on_meta = {}
    for case, call in cases.items():
        with pytest.raises(Exception) as error:
            eval(call, scope)
        on_meta[case] = f"{type(error.value).__name__} {str(error.value).splitlines()[0]}"
    for case in cases:
        assert on_cpu[case] == on_meta[case], case


def test_fake_kernels_refuse_none_and_a_grad_mask_of_the_wrong_length():
    """The fake kernels (every tensor on meta) with input None or a grad_mask of 2 or 4
    flags: the op's prefixed TypeError / ValueError. input None used to reach the device check
    as an AttributeError ('NoneType' object has no attribute 'device'), a short grad_mask a bare
    IndexError (list index out of range), a long one no error at all."""
    x, w, b = (torch.randn(*shape, device="meta") for shape in ((4, 3), (7, 3), (7,)))
    p = torch.zeros(4, 2, dtype=torch.long, device="meta")
    g, log_z = torch.randn(4, device="meta"), torch.randn(4, 2, device="meta")
    calls = {
        "linear_sparse_zlpr": lambda inp, m: torch.ops.kxops.linear_sparse_zlpr(
            inp, w, b, p, -1, "mean", m, 0),
        "linear_sparse_zlpr_backward": lambda inp, m: torch.ops.kxops.linear_sparse_zlpr_backward(
            g, inp, w, b, p, -1, m, 0),
        "linear_sparse_zlpr_partials_backward": lambda inp, m: (
            torch.ops.kxops.linear_sparse_zlpr_partials_backward(g, log_z, inp, w, b, p, -1, 0,
                                                                  7, m, 0)),
    }
    for op, call in calls.items():
        with pytest.raises(TypeError, match=f"^kxops.{op}: input must be a Tensor, got None"):
            call(None, [True] * 3)
        for flags in (2, 4):
            with pytest.raises(ValueError, match=rf"^kxops.{op}: grad_mask must hold 3 flags "
                                                 r"\(input, weight, bias\), got "):
                call(x, [True] * flags)


def test_direct_op_errors_in_a_subprocess():
    """Every op called directly with bad arguments raises the right error, never crashes."""
    done = run_isolated("""
        import torch, kxops
        ops = torch.ops.kxops
        f = torch.float64
        x, w, b = torch.zeros(3, 4, dtype=f), torch.zeros(5, 4, dtype=f), torch.zeros(5, dtype=f)
        p = torch.zeros(3, 2, dtype=torch.int64)
        m = [True, True, True]
        g, z = torch.zeros(3, dtype=f), torch.ones(3, 2, dtype=f)
        cases = [
            (TypeError, lambda: ops.linear_sparse_zlpr(x.long(), w, b, p, -1, "mean", m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr(x, w.float(), b, p, -1, "mean", m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr(x, w, b.float(), p, -1, "mean", m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr(x, w, b, p.float(), -1, "mean", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x, w[:, :3], b, p, -1, "mean", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x, w, b[:4], p, -1, "mean", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x, w, b, p[:2], -1, "mean", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x, w, b, p, -1, "avg", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_backward(g[:2], x, w, b, p, -1, m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr_backward(g.long(), x, w, b, p, -1, m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr_backward(g, x, w, b, p.float(), -1, m, 0)),
            (IndexError, lambda: ops.linear_sparse_zlpr_backward(g, x, w, b, p - 3, -1, m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x, w, b, p, -1, "mean", m, -1)),
            (ValueError, lambda: ops.linear_sparse_zlpr(x[0, 0], w, b, p, -1, "mean", m, 0)),
            (IndexError, lambda: ops.linear_sparse_zlpr(x, w, b, p + 5, -1, "mean", m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_partials(x, w, b, p, -1, -1, 9, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_partials(x, w, b, p, -1, 5, 9, 0)),
            (IndexError, lambda: ops.linear_sparse_zlpr_partials(x, w, b, p + 9, -1, 0, 9, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr_partials(x.half(), w, b, p, -1, 0, 5, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_partials_backward(
                g[:2], z, x, w, b, p, -1, 0, 5, m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_partials_backward(
                g, z[:, :1], x, w, b, p, -1, 0, 5, m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr_partials_backward(
                g, z.float(), x, w, b, p, -1, 0, 5, m, 0)),
            (TypeError, lambda: ops.linear_sparse_zlpr_partials_backward(
                g.long(), z, x, w, b, p, -1, 0, 5, m, 0)),
            (ValueError, lambda: ops.linear_sparse_zlpr_partials_backward(
                g, z, x, w, b, p, -1, 1, 5, m, 0)),
            (RuntimeError, lambda: ops.linear_sparse_zlpr(x, w.to("meta"), b, p, -1, "mean", m,
                                                          0)),
        ]
        for i, (error, call) in enumerate(cases):
            try:
                call()
            except error:
                continue
            except Exception as exc:
                raise AssertionError(f"case {i}: {type(exc).__name__}: {exc}")
            raise AssertionError(f"case {i}: no error")
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_device_matches_materialised(device, reduction):
    """The same host driver on each device (CUDA: cuBLAS and the CUDA row kernel); on CUDA
    also the memory bound at the issue's shape, by the allocator's peak."""
    needs_kernel("linear_sparse_zlpr", device.type)
    # float64: no TF32 GEMMs on CUDA, a difference is ours.
    x, w, b, positives = make((2, 5), d=7, classes=300, dtype=torch.float64, device=device)
    assert_matches_materialised(x, w, b, positives, reduction, block_rows=3)
    if device.type != "cuda":
        return
    x = torch.randn(512, 64, device=device, requires_grad=True)
    w = (torch.randn(2**19, 64, device=device) * 0.05).requires_grad_()
    positives = torch.randint(0, 2**19, (512, 5), device=device)
    peak = peak_extra_bytes(
        lambda: kxops.linear_sparse_zlpr_loss(x, w, positives, reduction=reduction).sum()
        .backward(), device)
    assert peak < 0.45 * 2**30, peak / 2**30


@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), float("-inf")])
def test_slice_ops_match_the_reference_slices(special):
    """The label-parallel ops and their reference (the fallback without a kernel) on two
    slices of the classes: the same partial sums, merged into the materialised row loss, and
    gradients that sum to the materialised ones."""
    x, w, b, positives = make((6,), d=4, classes=13)
    if special is not None:
        with torch.no_grad():
            w[3, 1] = special
    x, w, b = x.detach(), w.detach(), b.detach()
    slices = [(0, 5), (5, 13)]
    ops = (torch.ops.kxops.linear_sparse_zlpr_partials, kxops.reference.linear_sparse_zlpr
           .slice_partials)
    partials = []
    for lo, hi in slices:
        args = (x, w[lo:hi], b[lo:hi], positives, -1, lo, 13)
        got, want = ops[0](*args, 2), ops[1](*args)
        assert_close(got, want)
        partials.append(got)
    log_z = torch.logaddexp(torch.stack(partials).logsumexp(0), torch.zeros(()))
    row_loss = materialised(x, w, positives, b, reduction="none")
    assert_close(log_z.sum(-1), row_loss)
    grad_loss = torch.rand(6, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(materialised(*leaves[:2], positives, leaves[2],
                                            reduction="none"), leaves, grad_loss)
    grad_x = 0
    for lo, hi in slices:
        args = (grad_loss, log_z, x, w[lo:hi], b[lo:hi], positives, -1, lo, 13)
        got = torch.ops.kxops.linear_sparse_zlpr_partials_backward(*args, [True] * 3, 2)
        ref = kxops.reference.linear_sparse_zlpr.slice_partials_backward(*args)
        for g, r in zip(got, ref):
            assert_close(g, r)
        assert_close(got[1], want[1][lo:hi])
        assert_close(got[2], want[2][lo:hi])
        grad_x = grad_x + got[0]
    assert_close(grad_x, want[0])


# ---- kxops.nn.LinearZLPR ----

def test_module_matches_the_function_and_shares_a_linear():
    linear = torch.nn.Linear(5, 13, dtype=torch.float64)
    head = kxops.nn.LinearZLPR.from_linear(linear, reduction="sum", ignore_index=-2)
    assert head.weight is linear.weight and head.bias is linear.bias
    x, _, _, positives = make((2, 3), d=5, classes=13)
    positives[positives == -1] = -2
    want = materialised(x, linear.weight, positives, linear.bias, reduction="sum",
                        ignore_index=-2)
    assert_close(head(x, positives), want)
    assert_close(head.logits(x), linear(x))
    fresh = kxops.nn.LinearZLPR(5, 13, bias=False, dtype=torch.float64)
    assert fresh.bias is None and fresh.weight.shape == (13, 5)
    fresh.load_state_dict({"weight": linear.weight.detach()})
    assert_close(fresh(x, positives.clamp(min=0)),
                 materialised(x, linear.weight, positives.clamp(min=0)))


@pytest.mark.parametrize("rows", [(7,), (2, 3), ()])
def test_predict_block_by_block(rows):
    # Multiples of 1/64 and 1/8: every GEMM order (the blocks' and the whole batch's, which
    # BLAS may split differently) gives the logits exactly, so the comparisons can be exact.
    head = kxops.nn.LinearZLPR(4, 9, dtype=torch.float64, block_rows=2)
    with torch.no_grad():
        head.weight.copy_(torch.randint(-64, 65, head.weight.shape) / 64)
        head.bias.copy_(torch.randint(-64, 65, head.bias.shape) / 64)
    x = torch.randint(-8, 9, (*rows, 4)).double() / 8
    logits = head.logits(x)
    scores, indices = head.predict(x, k=3)
    top = logits.topk(3, dim=-1)
    assert torch.equal(scores, top.values) and torch.equal(indices, top.indices)
    for threshold in (0.0, 0.5):
        assert torch.equal(head.predict(x, threshold=threshold), (logits > threshold).nonzero())
    with pytest.raises(ValueError, match="k must be"):
        head.predict(x, k=10)
    with pytest.raises(ValueError, match="features"):
        head.predict(x[..., :3], k=1)


def test_block_rows_for_asks_the_driver():
    """predict's blocks are the driver's (a block holds max(weight bytes, 128 MiB) of logits,
    at least one row): the C++ op answers for a weight on any device, from its shape and
    dtype only, and checks its arguments."""
    block_rows_for = kxops.linear_sparse_zlpr.block_rows_for
    issue_shape = torch.empty(2**19, 64, device="meta")  # 2 MiB of fp32 logits per row
    assert block_rows_for(10**6, issue_shape) == 64
    assert block_rows_for(10**6, issue_shape.half()) == 128  # fp16 logits: 1 MiB a row
    assert block_rows_for(10, issue_shape) == 10
    big = torch.empty(2**20, 2**9, dtype=torch.float64, device="meta")  # 4 GiB: its own budget
    assert block_rows_for(10**6, big) == 2**9
    assert block_rows_for(0, issue_shape) == 1
    assert block_rows_for(5, torch.empty(0, 3)) == 5  # no classes: one block
    with pytest.raises(ValueError, match=r"^kxops\.linear_sparse_zlpr_block_rows: weight must"):
        torch.ops.kxops.linear_sparse_zlpr_block_rows(torch.zeros(3), 5)
    with pytest.raises(ValueError, match=r"^kxops\.linear_sparse_zlpr_block_rows: rows must"):
        torch.ops.kxops.linear_sparse_zlpr_block_rows(torch.zeros(3, 2), -1)


def test_predict_bad_arguments_follow_the_contract():
    """predict's errors: the op's prefix, TypeError for a wrong type (input not a tensor, k not
    an int), ValueError for a bad value (they were all unprefixed ValueErrors)."""
    head = kxops.nn.LinearZLPR(3, 5)
    cases = [((None,), {}, TypeError), (([1.0, 2.0, 3.0],), {}, TypeError),
             ((torch.tensor(1.0),), {}, ValueError), ((torch.randn(2, 4),), {}, ValueError),
             ((torch.randn(2, 3),), dict(k=2.0), TypeError),
             ((torch.randn(2, 3),), dict(k=True), TypeError),
             ((torch.randn(2, 3),), dict(k=6), ValueError),
             ((torch.randn(2, 3),), dict(k=-1), ValueError)]
    for args, kwargs, error in cases:
        with pytest.raises(error, match=r"^kxops\.linear_sparse_zlpr: predict: "):
            head.predict(*args, **kwargs)


def test_predict_under_autocast_matches_logits_topk():
    head = kxops.nn.LinearZLPR(16, 10)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        scores, indices = head.predict(x, k=3)
        want_scores, want_indices = head.logits(x).topk(3)
    assert scores.dtype == want_scores.dtype == torch.bfloat16
    assert torch.equal(scores, want_scores) and torch.equal(indices, want_indices)


# The issue's shape: 1 GiB of fp32 logits (2 GiB with their gradient).
MEMORY_SETUP = """
import torch, torch.nn.functional as F, kxops
torch.manual_seed(0)
x = torch.randn(512, 64, requires_grad=True)
w = (torch.randn(2**19, 64) * 0.05).requires_grad_()
positives = torch.randint(0, 2**19, (512, 5))
"""


def test_memory_bound_at_the_issue_shape():
    """Peak RSS growth of a forward+backward, reduction mean then "none" (one process: the
    peak covers both), below 0.45 GiB with weight.grad (0.125 GiB) included; the materialised
    path beside it (so the test can fail)."""
    fused = peak_rss_growth_bytes(MEMORY_SETUP, """
kxops.linear_sparse_zlpr_loss(x, w, positives).backward()
w.grad = x.grad = None
kxops.linear_sparse_zlpr_loss(x, w, positives, reduction="none").sum().backward()
""")
    full = peak_rss_growth_bytes(MEMORY_SETUP,
                                 "kxops.sparse_zlpr_loss(F.linear(x, w), positives).backward()")
    assert fused < 0.45 * 2**30, fused / 2**30
    assert full > 2 * 2**30, full / 2**30


# ---- label parallel over gloo ----

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sizes(world):
    return {2: [5, 12], 3: [0, 9, 8]}[world]  # uneven, an empty slice


def _label_parallel_worker(rank, world, port, modes, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in modes:
            torch.manual_seed(0)
            x, w, b, positives = make((3, 4), d=6, classes=sum(_sizes(world)))
            start = sum(_sizes(world)[:rank])
            rows = slice(start, start + _sizes(world)[rank])
            w_local = w.detach()[rows].clone().requires_grad_()
            b_local = b.detach()[rows].clone().requires_grad_()
            if mode == "bad_rank":  # one rank's bias has the wrong size: every rank must raise
                b_local = b_local[:-1] if rank == world - 1 else b_local
            if mode == "bad_id":
                positives[0, 0, 0] = sum(_sizes(world))
            # Ranks that disagree on grad_filter: each would filter its own slice differently.
            grad_filter = 2.0**-12 if mode == "bad_filter" and rank == 0 else 0.0
            # A rank whose input needs no gradient would skip the all-reduce of its gradient.
            x_rank = x.detach() if mode == "no_input_grad" and rank == world - 1 else x
            out = {}
            for reduction in REDUCTIONS:
                try:
                    loss = kxops.linear_sparse_zlpr_loss(
                        x_rank, w_local, positives, b_local, reduction=reduction,
                        process_group=dist.group.WORLD, block_rows=5, grad_filter=grad_filter)
                except (RuntimeError, ValueError, IndexError) as exc:
                    out[reduction] = type(exc).__name__
                    continue
                grad_out = torch.linspace(0.5, 1.5, loss.numel(),
                                          dtype=loss.dtype).view(loss.shape)
                grads = torch.autograd.grad(loss, (x, w_local, b_local), grad_out)
                out[reduction] = (loss.detach(), *grads)
            torch.save(out, os.path.join(result_dir, f"{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_label_parallel_matches_one_process(world, tmp_path):
    mp.spawn(_label_parallel_worker, args=(world, _free_port(), ["ok"], str(tmp_path)),
             nprocs=world, join=True)
    torch.manual_seed(0)
    x, w, b, positives = make((3, 4), d=6, classes=sum(_sizes(world)))
    starts = [sum(_sizes(world)[:r]) for r in range(world)]
    for reduction in REDUCTIONS:
        loss = materialised(x, w, positives, b, reduction=reduction)
        grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
        want = torch.autograd.grad(loss, (x, w, b), grad_out)
        for rank in range(world):
            got_loss, gx, gw, gb = torch.load(tmp_path / f"ok-{rank}.pt")[reduction]
            rows = slice(starts[rank], starts[rank] + _sizes(world)[rank])
            assert_close(got_loss, loss.detach())
            assert_close(gx, want[0])
            assert_close(gw, want[1][rows])
            assert_close(gb, want[2][rows])


def test_label_parallel_bad_argument_raises_on_every_rank(tmp_path):
    """No hang: the run finishes (mp.spawn would block forever on a rank stuck in a collective,
    so it runs in a subprocess with a timeout) and every rank raises: a rank's own bad argument
    its own error, the others a RuntimeError naming it; an out-of-range id IndexError on all."""
    world = 2
    done = run_isolated(f"""
        import torch.multiprocessing as mp
        from tests.linear_sparse_zlpr.test_linear_sparse_zlpr import (
            _label_parallel_worker, _free_port)
        mp.spawn(_label_parallel_worker,
                 args=({world}, _free_port(), ["bad_rank", "bad_id", "ok"], {str(tmp_path)!r}),
                 nprocs={world}, join=True)
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    for rank in range(world):
        bad_rank = torch.load(tmp_path / f"bad_rank-{rank}.pt")
        bad_id = torch.load(tmp_path / f"bad_id-{rank}.pt")
        ok = torch.load(tmp_path / f"ok-{rank}.pt")  # the group still works afterwards
        for reduction in REDUCTIONS:
            assert bad_rank[reduction] == ("ValueError" if rank == world - 1 else "RuntimeError")
            assert bad_id[reduction] == "IndexError"
            assert isinstance(ok[reduction], tuple)


def test_label_parallel_ranks_that_disagree_raise_on_every_rank(tmp_path):
    """Ranks given different grad_filter values (they once ran, all-reducing an input gradient
    that mixed two filters and matched neither), or one rank's input without a gradient (it
    would skip the all-reduce that the others wait in): ValueError on every rank, no hang."""
    world = 2
    modes = ["bad_filter", "no_input_grad"]
    done = run_isolated(f"""
        import torch.multiprocessing as mp
        from tests.linear_sparse_zlpr.test_linear_sparse_zlpr import (
            _label_parallel_worker, _free_port)
        mp.spawn(_label_parallel_worker,
                 args=({world}, _free_port(), {[*modes, "ok"]!r}, {str(tmp_path)!r}),
                 nprocs={world}, join=True)
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    for rank in range(world):
        ok = torch.load(tmp_path / f"ok-{rank}.pt")
        for reduction in REDUCTIONS:
            for mode in modes:
                assert torch.load(tmp_path / f"{mode}-{rank}.pt")[reduction] == "ValueError"
            assert isinstance(ok[reduction], tuple)


def test_block_ops_registered():
    for op in OPS:
        assert _ext.has_kernel(op, torch.device("cpu"))
    assert _ext.family_has_kernels("linear_sparse_zlpr", "cpu")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_both_cpu_gemm_engines(cpu_gemm, reduction, bias):
    """fp32 through MKL and through oneDNN (csrc/gemm.h): the loss and all three gradients
    against the materialised path and float64, over several blocks of rows."""
    assert torch.ops.kxops._cpu_gemm_engine().startswith(cpu_gemm + ";")
    x, w, b, positives = make((2, 37), d=24, classes=300, dtype=torch.float32, bias=bias)
    assert_matches_materialised(x, w, b, positives, reduction, block_rows=16)
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           reduction, block_rows=16)
    exact, exact_grads, _ = loss_and_grads(plain_float64, x, w, b, positives, reduction,
                                           grad_out.double())
    assert_close(loss.double(), exact, torch.float32)
    for got, ex in zip(grads, exact_grads):
        assert_close(got.double(), ex.double(), torch.float32)


# ---- grad_filter: the negligible negatives' gradients dropped ----

FILTER = 2.0**-12


def trained_like(rows=64, d=256, classes=2048, per_row=3, dtype=torch.float64, seed=0,
                 exact_logits=False):
    """A head whose negatives sit far below its positives (unit class vectors, bias -12, each
    row the sum of 14 times its positives' vectors and 10 times a hard negative's): about 1%
    of the gradient entries survive the recommended filter. exact_logits: x and w rounded to
    multiples of 1/4 and 1/64, so that every GEMM order gives the logits exactly."""
    gen = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(classes, d, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.randint(0, classes, (rows, per_row + 1), generator=gen)
    coef = torch.tensor([14.0] * per_row + [10.0], dtype=torch.float64)
    x = (w[ids] * coef[:, None]).sum(1) + 0.3 * torch.randn(rows, d, generator=gen,
                                                            dtype=torch.float64)
    b = torch.full((classes,), -12.0, dtype=torch.float64)
    if exact_logits:
        x, w = (x * 4).round() / 4, (w * 64).round() / 64
    return [t.to(dtype).requires_grad_() for t in (x, w, b)] + [ids[:, :per_row]]


def logits_grad(logits, positives, reduction, grad_filter):
    """d loss / d logits of the sparse ZLPR op (its gradient output)."""
    return torch.ops.kxops.sparse_zlpr(logits, positives, -1, [True], reduction, grad_filter)[1]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_filter_zero_is_the_call_without_it(reduction):
    x, w, b, positives = make((7,), dtype=torch.float32)
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           reduction)
    loss0, grads0, _ = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                      reduction, grad_out, grad_filter=0.0)
    assert torch.equal(loss, loss0)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [37, 3000])
def test_grad_filter_drops_exactly_the_negatives_below_it(dtype, classes):
    """Each row's gradient (reduction none/sum: no scale) is the unfiltered one with exactly
    its negative entries below f set to 0; rows with non-finite sums (the exact path) too."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, classes, generator=gen) * 4 - 2).to(dtype)
    logits[1, 3] = -torch.inf
    logits[2, 5] = torch.inf
    logits[3, 7] = torch.nan
    positives = torch.randint(0, classes, (6, 3), generator=gen)
    positives[0, 0] = -1
    labels = kxops.reference.zlpr.positives_to_dense(positives, -1, classes)
    for reduction in ("none", "sum"):
        exact = logits_grad(logits, positives, reduction, 0.0)
        got = logits_grad(logits, positives, reduction, FILTER)
        # The kernel filters in fp32 (fp64) before rounding to the logits' dtype.
        drop = ~labels & (logits_grad(logits.float() if dtype != torch.float64 else logits,
                                      positives, reduction, 0.0) < FILTER)
        assert drop.any() and (~drop & ~labels & (exact != 0)).any()
        torch.testing.assert_close(got, torch.where(drop, 0, exact), rtol=0, atol=0,
                                   equal_nan=True)
    # The mean's scale applies after the filter: the same entries dropped.
    mean = logits_grad(logits, positives, "mean", FILTER)
    exact = logits_grad(logits, positives, "none", FILTER)
    assert torch.equal(mean == 0, exact == 0)
    torch.testing.assert_close(mean, (exact.double() / 6).to(dtype), equal_nan=True)


def test_grad_filter_bound_on_the_logits_gradient():
    """Dropped entries are each < f: per row the gradient moves by at most f per entry and
    min(C f, 1) in L1; the loss is unchanged."""
    logits = torch.randn(32, 4096, dtype=torch.float64) * 3
    positives = torch.randint(0, 4096, (32, 4))
    for f in (FILTER, 1e-3, 0.05):
        leaf, leaf_f = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = kxops.sparse_zlpr_loss(leaf, positives, reduction="sum")
        loss_f = kxops.sparse_zlpr_loss(leaf_f, positives, reduction="sum", grad_filter=f)
        assert torch.equal(loss, loss_f)
        loss.backward()
        loss_f.backward()
        diff = (leaf.grad - leaf_f.grad).abs()
        assert diff.max() < f
        assert (diff.sum(-1) <= min(4096 * f, 1.0)).all()
        ref_leaf = logits.clone().requires_grad_()
        kxops.reference.sparse_zlpr_loss(ref_leaf, positives, reduction="sum",
                                         grad_filter=f).backward()
        assert_close(leaf_f.grad, ref_leaf.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_filter_matches_the_filtered_reference(reduction, dtype):
    x, w, b, positives = trained_like(dtype=dtype)
    kw = dict(grad_filter=FILTER)
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           reduction, **kw)
    want, want_grads, _ = loss_and_grads(kxops.reference.linear_sparse_zlpr_loss, x, w, b,
                                         positives, reduction, grad_out, **kw)
    exact, _, _ = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives, reduction,
                                 grad_out)
    assert torch.equal(loss, exact)
    assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        assert_close(got, ref)


def _filtered_grads(x, w, b, positives, reduction, grad_out, **kw):
    return loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives, reduction,
                          grad_out, grad_filter=FILTER, **kw)[1]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_filter_independent_of_blocks_and_threads(reduction):
    """The sparse products sum in a fixed order: bit for bit the same gradients whatever the
    block rows and the thread count, given the same logits (the logits GEMM's rounding may
    depend on the block's rows, in the exact path too: these logits are exact)."""
    x, w, b, positives = trained_like(rows=50, dtype=torch.float32, exact_logits=True)
    g = logits_grad(F.linear(x, w, b).detach(), positives, "none", FILTER)
    assert 0 < (g != 0).float().mean() < 0.02  # the sparse products run
    grad_out = torch.randn(50) if reduction == "none" else torch.tensor(1.0)
    want = _filtered_grads(x, w, b, positives, reduction, grad_out)
    threads = torch.get_num_threads()
    try:
        for block_rows, n_threads in ((7, threads), (1, threads), (50, 1), (None, 1)):
            torch.set_num_threads(n_threads)
            got = _filtered_grads(x, w, b, positives, reduction, grad_out,
                                  block_rows=block_rows)
            assert all(torch.equal(g, h) for g, h in zip(got, want)), (block_rows, n_threads)
    finally:
        torch.set_num_threads(threads)


def test_grad_filter_dense_blocks_fall_back_to_the_gemms():
    """A filter that drops almost nothing leaves dense blocks: the GEMMs, the same gradients
    as without a filter up to rounding."""
    x, w, b, positives = make((40,), d=8, classes=300, dtype=torch.float32)
    loss, grads, grad_out = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                           "mean", grad_filter=1e-30)
    want, want_grads, _ = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives,
                                         "mean", grad_out)
    assert torch.equal(loss, want)
    for got, ref in zip(grads, want_grads):
        assert_close(got, ref)


def test_grad_filter_module_and_label_parallel_slices():
    x, w, b, positives = trained_like(rows=20)
    linear = torch.nn.Linear(256, 2048).double()
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    head = kxops.nn.LinearZLPR.from_linear(linear, grad_filter=FILTER)
    assert "grad_filter" in repr(head)
    head(x.detach(), positives).backward()
    leaf = w.detach().requires_grad_()
    kxops.linear_sparse_zlpr_loss(x.detach(), leaf, positives, b.detach(),
                                  grad_filter=FILTER).backward()
    assert torch.equal(head.weight.grad, leaf.grad)
    # The recompute ops of label parallel filter the same entries as the reference slices.
    ops = torch.ops.kxops
    args = (x.detach(), w.detach(), b.detach(), positives, -1, 0, 2048)
    log_z = torch.logaddexp(ops.linear_sparse_zlpr_partials(*args, 0), torch.zeros(()))
    grad_loss = torch.rand(20, dtype=torch.float64)
    got = ops.linear_sparse_zlpr_partials_backward(grad_loss, log_z, *args, [True] * 3, 0,
                                                   FILTER)
    want = kxops.reference.linear_sparse_zlpr.slice_partials_backward(
        grad_loss, log_z, *args, FILTER)
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", None, True])
def test_grad_filter_errors_name_it(bad):
    x, w, b, positives = make()
    with pytest.raises(ValueError, match="grad_filter"):
        kxops.linear_sparse_zlpr_loss(x, w, positives, b, grad_filter=bad)
    with pytest.raises(ValueError, match="grad_filter"):
        kxops.nn.LinearZLPR(4, 5, grad_filter=bad)


def test_grad_filter_takes_any_real_number():
    """numpy scalars are numbers (np.float64 was taken, np.float32 and integer scalars were
    refused); an int too large for a float is a ValueError (was OverflowError)."""
    np = pytest.importorskip("numpy")
    x, w, b, positives = trained_like(rows=8, classes=256)

    def grads(f):
        return torch.autograd.grad(kxops.linear_sparse_zlpr_loss(x, w, positives, b,
                                                                 grad_filter=f), (x, w, b))

    want = grads(float(np.float32(FILTER)))
    for f in (np.float32(FILTER), np.float16(FILTER)):
        assert all(torch.equal(g, r) for g, r in zip(grads(f), want))
        assert kxops.nn.LinearZLPR(4, 5, grad_filter=f).grad_filter == FILTER
    assert kxops.nn.LinearZLPR(4, 5, grad_filter=np.int64(0)).grad_filter == 0.0
    for bad in (2**5000, np.bool_(True), np.float32("nan"), np.float64(-1.0)):
        with pytest.raises(ValueError, match="grad_filter"):
            kxops.linear_sparse_zlpr_loss(x, w, positives, b, grad_filter=bad)


def test_grad_filter_infinite_upstream_same_for_dense_and_sparse_products(monkeypatch):
    """Reduction none, an infinite upstream gradient: the dropped entries contribute nothing
    (the reference detaches them), whichever products run."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 2
    b = torch.randn(6, generator=gen, dtype=torch.float64) - 3
    positives = torch.tensor([[4], [4], [0]])
    grad_out = torch.full((3,), torch.inf, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves[:2], positives, leaves[2], reduction="none", grad_filter=0.01)
        return torch.autograd.grad(loss, leaves, grad_out)

    want = grads(kxops.reference.linear_sparse_zlpr_loss)
    assert want[2].isnan().any() and want[2].isinf().any()  # some classes all dropped but one
    for density in ("1", "0"):  # always the sparse products, always the dense GEMMs
        monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", density)
        got = grads(kxops.linear_sparse_zlpr_loss)
        for g, r in zip(got, want):
            assert torch.equal(g.isnan(), r.isnan()), density
            torch.testing.assert_close(g, r, equal_nan=True)


def test_grad_filter_direct_op_errors_in_a_subprocess():
    done = run_isolated("""
        import torch, kxops
        ops = torch.ops.kxops
        f = torch.float64
        x, w, b = torch.zeros(3, 4, dtype=f), torch.zeros(5, 4, dtype=f), torch.zeros(5, dtype=f)
        p = torch.zeros(3, 2, dtype=torch.int64)
        m = [True, True, True]
        g, z = torch.zeros(3, dtype=f), torch.ones(3, 2, dtype=f)
        for bad in (-1.0, float("nan"), float("inf"), -1e-300):
            for call in (
                lambda: ops.linear_sparse_zlpr(x, w, b, p, -1, "mean", m, 0, bad),
                lambda: ops.linear_sparse_zlpr_backward(g, x, w, b, p, -1, m, 0, bad),
                lambda: ops.linear_sparse_zlpr_partials_backward(g, z, x, w, b, p, -1, 0, 5, m,
                                                                 0, bad),
                lambda: ops.sparse_zlpr(x, p, -1, [True], "none", bad),
            ):
                try:
                    call()
                except ValueError as exc:
                    assert "grad_filter" in str(exc), exc
                    continue
                raise AssertionError(f"no error for {bad}")
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_grad_filter_opcheck():
    x, w, b, positives = trained_like(rows=6, classes=64)
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr,
                          (x, w, b, positives, -1, "mean", [True] * 3, 2, FILTER))
    torch.library.opcheck(torch.ops.kxops.linear_sparse_zlpr_backward,
                          (torch.randn(6, dtype=torch.float64), x.detach(), w.detach(),
                           b.detach(), positives, -1, [True] * 3, 2, FILTER))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_filter_nonfinite_empty_and_layouts(reduction):
    """NaN/inf rows as the filtered reference; 0 rows, 0 classes, non-contiguous operands and
    int32 positives run; an out-of-range id still raises from the sparse kernel output."""
    x, w, b, positives = trained_like(rows=20, dtype=torch.float32)
    bad = x.detach().clone()
    bad[3, 5], bad[7, 1] = float("nan"), float("inf")
    outs = []
    for fn in (kxops.linear_sparse_zlpr_loss, kxops.reference.linear_sparse_zlpr_loss):
        leaves = [t.detach().clone().requires_grad_() for t in (bad, w, b)]
        loss = fn(leaves[0], leaves[1], positives, leaves[2], reduction=reduction,
                  grad_filter=FILTER)
        loss.sum().backward()
        outs.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(*outs):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-5)
    for rows in ((0,), (2, 0)):
        empty = torch.zeros(*rows, 256, requires_grad=True)
        kxops.linear_sparse_zlpr_loss(empty, w, torch.zeros(*rows, 3, dtype=torch.long), b,
                                      grad_filter=FILTER, reduction=reduction).sum().backward()
        assert empty.grad.shape == empty.shape
    no_classes = torch.zeros(0, 256, requires_grad=True)
    kxops.linear_sparse_zlpr_loss(x, no_classes, torch.full((20, 1), -1), grad_filter=FILTER,
                                  reduction=reduction).sum().backward()
    leaves = [t.detach().t().contiguous().t().requires_grad_() for t in (x, w)]
    got = loss_and_grads(kxops.linear_sparse_zlpr_loss, *leaves, b, positives.int(), reduction,
                         grad_filter=FILTER)
    want = loss_and_grads(kxops.reference.linear_sparse_zlpr_loss, *leaves, b, positives,
                          reduction, got[2], grad_filter=FILTER)
    for g, r in zip(got[1], want[1]):
        assert_close(g, r)
    with pytest.raises(IndexError, match="out of range"):
        kxops.linear_sparse_zlpr_loss(x, w, positives + 5000, b, grad_filter=FILTER,
                                      reduction=reduction).sum().backward()


@pytest.mark.parametrize("max_density", ["0", "1"])
def test_grad_filter_none_zero_entries_are_not_scaled_by_an_infinite_grad_loss(monkeypatch,
                                                                               max_density):
    """The documented difference from the filtered reference: under grad_filter the kernels
    scale only nonzero entries by grad_loss (a dropped entry stays 0 whatever the upstream
    gradient), so an entry the filter kept but which is exactly 0 (a saturated positive) stays
    0 under an infinite grad_loss, where the reference gives inf * 0 = NaN; the other rows as
    the reference. Both routes (sparse products, dense GEMMs) alike."""
    needs_kernel("linear_sparse_zlpr", "cpu")
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", max_density)
    positives = torch.tensor([[0], [1]])
    outs = []
    for fn in (kxops.linear_sparse_zlpr_loss, kxops.reference.linear_sparse_zlpr_loss):
        x = torch.tensor([[200.0], [1.0]], requires_grad=True)  # row 0: gradient exactly 0
        w = torch.tensor([[1.0], [-1.0]], requires_grad=True)
        loss = fn(x, w, positives, reduction="none", grad_filter=FILTER)
        loss.backward(torch.tensor([float("inf"), 1.0]))
        outs.append((x.grad, w.grad))
    (x_grad, w_grad), (x_want, w_want) = outs
    assert x_grad[0].item() == 0 and torch.isnan(x_want[0]).all()
    torch.testing.assert_close(x_grad[1], x_want[1])
    assert torch.isfinite(w_grad).all()
    torch.testing.assert_close(w_grad[1], w_want[1])


def test_grad_filter_compile_fullgraph():
    x, w, b, positives = trained_like(rows=16, classes=256, dtype=torch.float32)
    compiled = torch.compile(lambda x, w, b: kxops.linear_sparse_zlpr_loss(
        x, w, positives, b, grad_filter=FILTER), fullgraph=True)
    want = loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives, "mean",
                          grad_filter=FILTER)
    got = loss_and_grads(lambda x, w, positives, b, reduction: compiled(x, w, b), x, w, b,
                         positives, "mean", want[2])
    assert_close(got[0], want[0])
    for g, r in zip(got[1], want[1]):
        assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_filter_portable_route_same_bits(monkeypatch, dtype):
    """The route CUDA takes (CSR and its transpose through at:: ops, sparse_grad_host.h), forced
    on the CPU with KXOPS_SPARSE_GRAD_PORTABLE=1: bit for bit the CPU's own scan and counting
    sort, for every op of the head, NaN gradient entries and a row without survivors (the sums
    themselves, sparse_grad_math.h, are the CUDA kernel's too); the dense GEMMs agree up to
    rounding."""
    x, w, b, positives = trained_like(rows=40, classes=700, dtype=dtype)
    x_nan = x.detach().clone()
    x_nan[3, 0] = torch.nan  # every entry of row 3 survives, as NaN
    x_nan[4] = 0
    x_nan.requires_grad_()
    positives_nan = positives.clone()
    positives_nan[4] = -1  # row 4: no entry survives
    grad_loss = torch.rand(40, dtype=dtype)
    args = (x.detach(), w.detach(), b.detach(), positives, -1, 0, 700)
    log_z = torch.logaddexp(torch.ops.kxops.linear_sparse_zlpr_partials(*args, 0),
                            torch.zeros((), dtype=dtype))

    def run():
        out = []
        for reduction in REDUCTIONS:
            out += loss_and_grads(kxops.linear_sparse_zlpr_loss, x, w, b, positives, reduction,
                                  grad_loss if reduction == "none" else torch.ones((), dtype=dtype),
                                  grad_filter=FILTER, block_rows=13)[1]
        out += loss_and_grads(kxops.linear_sparse_zlpr_loss, x_nan, w, b, positives_nan, "sum",
                              torch.ones((), dtype=dtype), grad_filter=FILTER)[1]
        return out + list(torch.ops.kxops.linear_sparse_zlpr_partials_backward(
            grad_loss, log_z, *args, [True] * 3, 0, FILTER))

    monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", "1")  # every block sparse
    want = run()
    assert any(g.isnan().any() for g in want)
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_PORTABLE", "1")
    got = run()
    for g, r in zip(got, want):
        assert torch.equal(g.isnan(), r.isnan())
        assert torch.equal(g.nan_to_num(), r.nan_to_num())
    monkeypatch.setenv("KXOPS_SPARSE_GRAD_MAX_DENSITY", "0")  # the dense GEMMs: rounding apart
    for g, r in zip(run(), want):
        assert_close(g, r)
