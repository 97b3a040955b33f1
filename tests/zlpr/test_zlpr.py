"""ZLPR loss: the reference against first principles, the public API, bad inputs, and the
compiled ops against the reference wherever a kernel is registered."""

import math

import pytest
import torch

import kxops
from kxops.reference import zlpr as ref
from tests.utils import (
    assert_close,
    assert_error_rule,
    cuda_with_memory,
    direct_call_outcomes,
    dispatched_ops,
    needs_kernel,
    run_isolated,
)


def zlpr_by_loops(logits, labels):
    """The definition, one class at a time in Python floats: (row losses, d loss / d logits)."""
    rows = logits.reshape(-1, logits.shape[-1]).tolist()
    targets = labels.reshape(-1, logits.shape[-1]).double().tolist()
    losses, grads = [], []
    for s_row, t_row in zip(rows, targets):
        z_neg = 1.0 + sum((1 - t) * math.exp(s) for s, t in zip(s_row, t_row) if s != -math.inf)
        z_pos = 1.0 + sum(t * math.exp(-s) for s, t in zip(s_row, t_row) if s != -math.inf)
        losses.append(math.log(z_neg) + math.log(z_pos))
        grads.append([0.0 if s == -math.inf else
                      (1 - t) * math.exp(s) / z_neg - t * math.exp(-s) / z_pos
                      for s, t in zip(s_row, t_row)])
    shape = logits.shape
    return (torch.tensor(losses, dtype=torch.float64).reshape(shape[:-1]),
            torch.tensor(grads, dtype=torch.float64).reshape(shape))


def random_problem(shape, soft=False, masked=0.0, dtype=torch.float64, device="cpu"):
    logits = torch.randn(shape, dtype=torch.float64) * 3
    labels = torch.rand(shape, dtype=torch.float64) if soft else torch.rand(shape) < 0.3
    if masked:
        logits[torch.rand(shape) < masked] = -math.inf
    return logits.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 5), (4, 1)])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("masked", [0.0, 0.3])
def test_reference_matches_first_principles(shape, soft, masked):
    logits, labels = random_problem(shape, soft, masked)
    logits.requires_grad_(True)
    loss = ref.zlpr_loss(logits, labels, reduction="none")
    expected_loss, expected_grad = zlpr_by_loops(logits.detach(), labels)
    assert_close(loss, expected_loss)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert_close(grad, expected_grad)


def test_reference_masked_logits_get_zero_gradient_even_when_positive():
    logits = torch.tensor([[-math.inf, 1.0, -math.inf], [-math.inf] * 3], dtype=torch.float64,
                          requires_grad=True)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss = kxops.zlpr_loss(logits, labels, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[1] == 0
    loss.sum().backward()
    assert logits.grad[:, [0, 2]].eq(0).all() and logits.grad[1].eq(0).all()


def test_nan_propagates_to_its_row_only():
    logits = torch.randn(3, 4)
    logits[1, 2] = math.nan
    loss = kxops.zlpr_loss(logits, torch.zeros(3, 4, dtype=torch.bool), reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_hard_label_dtypes_agree(label_dtype):
    logits, labels = random_problem((5, 9), dtype=torch.float32)
    expected = kxops.zlpr_loss(logits, labels.float())
    assert_close(kxops.zlpr_loss(logits, labels.to(label_dtype)), expected)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_leading_dims(reduction):
    logits, labels = random_problem((2, 3, 6), dtype=torch.float32)
    out = kxops.zlpr_loss(logits, labels, reduction=reduction)
    rows = ref.zlpr_row_loss(logits, labels)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    assert out.shape == expected.shape and out.dtype == logits.dtype
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_logits_stay_finite(dtype):
    logits = torch.tensor([[3e4, -3e4, 0.0, 1.0], [-3e4, 3e4, 2.0, -1.0]]).to(dtype)
    labels = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 0]])
    logits.requires_grad_(True)
    loss = kxops.zlpr_loss(logits, labels, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Row 0 has its positive at +3e4 and negative at -3e4: nearly perfect, so small loss.
    assert kxops.zlpr_loss(logits.detach(), labels, reduction="none")[0] < 2.0


def test_sparse_equals_dense_with_padding_and_duplicates():
    logits, _ = random_problem((2, 3, 8), dtype=torch.float32)
    positives = torch.tensor([[[0, 3, 3], [7, -1, -1], [-1, -1, -1]],
                              [[1, 2, 5], [5, 5, 5], [6, -1, 0]]])
    dense = torch.zeros(2, 3, 8, dtype=torch.bool)
    for b in range(2):
        for r in range(3):
            for c in positives[b, r].tolist():
                if c != -1:
                    dense[b, r, c] = True
    for reduction in ("none", "mean"):
        assert_close(kxops.sparse_zlpr_loss(logits, positives, reduction=reduction),
                     kxops.zlpr_loss(logits, dense, reduction=reduction))


def test_sparse_custom_ignore_index_and_int32():
    logits, _ = random_problem((3, 5), dtype=torch.float32)
    positives = torch.tensor([[4, 99], [99, 99], [0, 1]], dtype=torch.int32)
    dense = torch.tensor([[0, 0, 0, 0, 1], [0] * 5, [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert_close(kxops.sparse_zlpr_loss(logits, positives, ignore_index=99),
                 kxops.zlpr_loss(logits, dense))
    # Any integer type, as the ops' int arguments take it (NumPy's ints were refused).
    np = pytest.importorskip("numpy")
    for ignore_index in (np.int64(99), np.int32(99)):
        assert_close(kxops.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index),
                     kxops.zlpr_loss(logits, dense))
        assert_close(kxops.reference.sparse_zlpr_loss(logits, positives,
                                                      ignore_index=ignore_index),
                     kxops.zlpr_loss(logits, dense))
    for ignore_index in (99.0, True, "99"):
        with pytest.raises(TypeError, match=r"^kxops.sparse_zlpr: ignore_index must be an int"):
            kxops.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index)


def test_sparse_ignore_index_bool_tensor_refused_as_bool():
    """A bool tensor is a bool: its __index__ made torch.tensor(True) ignore_index 1, while the
    plain True is a TypeError. Integer tensors stay accepted, as the ops' int arguments take
    them."""
    logits, _ = random_problem((3, 5), dtype=torch.float32)
    positives = torch.tensor([[4, 1], [1, 1], [0, 1]])
    for fn in (kxops.sparse_zlpr_loss, kxops.reference.sparse_zlpr_loss,
               lambda *a, ignore_index: kxops.nn.SparseZLPRLoss(ignore_index=ignore_index)(*a)):
        with pytest.raises(TypeError, match=r"^kxops.sparse_zlpr: ignore_index must be an int"):
            fn(logits, positives, ignore_index=torch.tensor(True))
        assert_close(fn(logits, positives, ignore_index=torch.tensor(1)),
                     fn(logits, positives, ignore_index=1))


def test_sparse_exact_when_positives_dominate():
    """The subtraction form log(e^a - e^b) cancels here; the exact negative sum does not."""
    num_classes = 50
    logits = torch.full((1, num_classes), -5.0)
    logits[0, :45] = 12.0  # 45 confident positives dominate the all-class sum
    positives = torch.arange(45)[None]
    loss = kxops.sparse_zlpr_loss(logits, positives, reduction="none")
    expected, _ = zlpr_by_loops(logits.double(), (torch.arange(num_classes) < 45)[None])
    assert loss.item() > 0
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_gradcheck_float64():
    logits, labels = random_problem((3, 5), soft=True, masked=0.2)
    logits = logits.requires_grad_(True)
    torch.autograd.gradcheck(lambda s: kxops.zlpr_loss(s, labels, reduction="sum"), (logits,))
    positives = torch.tensor([[0, 2], [4, -1], [-1, -1]])
    torch.autograd.gradcheck(lambda s: kxops.sparse_zlpr_loss(s, positives), (logits,))


def test_modules():
    logits, labels = random_problem((4, 6), dtype=torch.float32)
    assert_close(kxops.nn.ZLPRLoss("sum")(logits, labels),
                 kxops.zlpr_loss(logits, labels, reduction="sum"))
    positives = torch.tensor([[0], [5], [-7], [2]])
    assert_close(kxops.nn.SparseZLPRLoss(ignore_index=-7)(logits, positives),
                 kxops.sparse_zlpr_loss(logits, positives, ignore_index=-7))


def test_compile_fullgraph():
    logits, labels = random_problem((4, 6), dtype=torch.float32)
    logits.requires_grad_(True)
    compiled = torch.compile(kxops.zlpr_loss, fullgraph=True)
    loss = compiled(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = ref.zlpr_loss(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("call, error, message", [
    (lambda: kxops.zlpr_loss(torch.randn(2, 3), torch.ones(2, 4)), ValueError, "labels shape"),
    (lambda: kxops.zlpr_loss(torch.randn(2, 3), torch.ones(2, 3), reduction="avg"), ValueError,
     "reduction"),
    (lambda: kxops.zlpr_loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)), TypeError,
     "floating-point"),
    (lambda: kxops.zlpr_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "class dim"),
    (lambda: kxops.zlpr_loss(torch.randn(2, 3), [[1, 0, 0]]), TypeError, "labels must be"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.zeros(2, 1)), TypeError,
     "int32 or int64"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.zeros(3, 1, dtype=torch.long)),
     ValueError, "positives shape"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.tensor([[0], [3]])), IndexError,
     "out of range"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.tensor([[0], [-2]])), IndexError,
     "out of range"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.tensor([[0], [1]]),
                                    ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: kxops.zlpr_loss(torch.randn(2, 3).to_sparse(), torch.ones(2, 3)), TypeError,
     "logits must be a dense"),
    (lambda: kxops.zlpr_loss(torch.randn(2, 3), torch.ones(2, 3).to_sparse()), TypeError,
     "labels must be a dense"),
    (lambda: kxops.sparse_zlpr_loss(torch.randn(2, 3), torch.tensor([[0], [1]]).to_sparse()),
     TypeError, "positives must be a dense"),
    (lambda: kxops.zlpr_loss(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bits8)),
     TypeError, "labels must be a bool, integer or floating-point tensor"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_inputs_are_not_modified():
    logits, labels = random_problem((3, 4), dtype=torch.float32, masked=0.2)
    logits_before, labels_before = logits.clone(), labels.clone()
    kxops.zlpr_loss(logits, labels)
    positives = torch.tensor([[0, -1], [1, 1], [3, 2]])
    kxops.sparse_zlpr_loss(logits, positives)
    assert torch.equal(logits, logits_before) and torch.equal(labels, labels_before)
    assert torch.equal(positives, torch.tensor([[0, -1], [1, 1], [3, 2]]))


# --- the compiled ops, wherever a kernel is registered --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 3, 130), (0, 5)])
def test_kernel_matches_reference(device, dtype, shape):
    needs_kernel("zlpr", device)
    logits, labels = random_problem(shape, soft=True, masked=0.1, dtype=dtype, device=device)
    logits.requires_grad_(True)
    loss = kxops.zlpr_loss(logits, labels, reduction="sum")
    expected = ref.zlpr_loss(logits, labels, reduction="sum")
    assert_close(loss, expected)
    if logits.numel():
        assert_close(torch.autograd.grad(loss, logits)[0],
                     torch.autograd.grad(expected, logits)[0])


def test_opcheck(device):
    needs_kernel("zlpr", device)
    logits, labels = random_problem((3, 17), soft=True, dtype=torch.float32, device=device)
    for compute_grad in (False, True):
        s = logits.clone().requires_grad_(compute_grad)
        torch.library.opcheck(torch.ops.kxops.zlpr, (s, labels, [compute_grad]))
    positives = torch.tensor([[0, 4], [16, -1], [-1, -1]], device=device)
    for reduction in ("none", "mean", "sum"):
        torch.library.opcheck(torch.ops.kxops.sparse_zlpr, (logits.clone().requires_grad_(True),
                                                            positives, -1, [True], reduction))
        torch.library.opcheck(torch.ops.kxops.zlpr,
                              (logits.clone().requires_grad_(True), labels, [True], reduction))
    strided = logits.t().contiguous().t().requires_grad_(True)
    torch.library.opcheck(torch.ops.kxops.zlpr, (strided, labels, [True]))
    torch.library.opcheck(torch.ops.kxops.zlpr_backward,
                          (torch.rand(3, device=device), torch.randn(3, 17, device=device)))


def loss_and_grad(fn, logits, grad_rows=None):
    """Loss and d(sum grad_rows * loss)/d logits (grad_rows: ones by default)."""
    logits = logits.detach().requires_grad_(True)
    loss = fn(logits)
    if grad_rows is None:
        grad_rows = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, logits, grad_rows)
    return loss, grad


def assert_dense_matches_reference(logits, labels):
    """Per-row losses and gradients (under random per-row weights) of kxops vs the reference."""
    grad_rows = torch.rand(logits.shape[:-1], device=logits.device)
    actual = loss_and_grad(lambda s: kxops.zlpr_loss(s, labels, reduction="none"), logits,
                           grad_rows)
    expected = loss_and_grad(lambda s: ref.zlpr_loss(s, labels, reduction="none"), logits,
                             grad_rows)
    for a, e in zip(actual, expected):
        assert_close(a, e)


LABEL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16,
                torch.float32, torch.float64]


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_kernel_label_dtypes(device, label_dtype):
    needs_kernel("zlpr", device)
    logits, labels = random_problem((6, 37), masked=0.1, dtype=torch.float32, device=device)
    assert_dense_matches_reference(logits, labels.to(label_dtype))


@pytest.mark.parametrize("num_classes", [1, 5, 8, 100, 2048, 2049, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_row_lengths(device, dtype, num_classes):
    """Warp rows (<= 2048 classes on CUDA), block rows above, heads and tails of vector loads."""
    needs_kernel("zlpr", device)
    logits, labels = random_problem((3, num_classes), soft=True, masked=0.1, dtype=dtype,
                                    device=device)
    assert_dense_matches_reference(logits, labels)


def test_kernel_non_contiguous_and_offset_inputs(device):
    needs_kernel("zlpr", device)
    base, base_labels = random_problem((9, 2, 41), soft=True, dtype=torch.float32,
                                       device=device)
    # Strided rows that start one element past alignment.
    assert_dense_matches_reference(base.transpose(0, 1)[..., 1:],
                                   base_labels.transpose(0, 1)[..., 1:])
    offset_logits = base.reshape(-1)[3:3 + 5 * 17].reshape(5, 17)  # storage offset 3
    offset_labels = base_labels.reshape(-1)[3:3 + 5 * 17].reshape(5, 17)
    assert_close(kxops.zlpr_loss(offset_logits, offset_labels, reduction="none"),
                 ref.zlpr_loss(offset_logits, offset_labels, reduction="none"))


def global_pointer_problem(batch, heads, length, dtype, device):
    """Span logits [B, heads, L, L] as GlobalPointer makes them: padded positions and the lower
    triangle (end before start) at -inf, a few gold spans per head."""
    logits = torch.randn(batch, heads, length, length) * 4
    lengths = torch.randint(1, length + 1, (batch,))
    valid = torch.arange(length)[None, :] < lengths[:, None]          # [B, L]
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    upper = torch.ones(length, length, dtype=torch.bool).triu()
    keep = pair & upper
    logits = logits.masked_fill(~keep, -math.inf)
    labels = (torch.rand(logits.shape) < 0.02) & keep
    return logits.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_global_pointer_shapes(device, dtype):
    needs_kernel("zlpr", device)
    logits, labels = global_pointer_problem(2, 3, 50, dtype, device)
    flat_logits = logits.flatten(-2)
    flat_labels = labels.flatten(-2)
    actual = loss_and_grad(lambda s: kxops.zlpr_loss(s, flat_labels), flat_logits)
    expected = loss_and_grad(lambda s: ref.zlpr_loss(s, flat_labels), flat_logits)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    assert torch.isfinite(actual[1]).all()
    assert actual[1][torch.isneginf(flat_logits)].eq(0).all()
    # The same labels as span indices per (batch, head): the sparse form GPLinker uses.
    per_row = flat_labels.sum(-1).max().item()
    positives = torch.full((*flat_labels.shape[:-1], per_row), -1, dtype=torch.long,
                           device=device)
    for index in flat_labels.reshape(-1, flat_labels.shape[-1]).nonzero().tolist():
        row = positives.view(-1, per_row)[index[0]]
        row[(row == -1).nonzero()[0]] = index[1]
    sparse = loss_and_grad(lambda s: kxops.sparse_zlpr_loss(s, positives), flat_logits)
    for a, e in zip(sparse, expected):
        assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision_error_rule(device, dtype):
    """Error against an fp64 reference is at most 2x the reference's own error at that dtype."""
    needs_kernel("zlpr", device)
    logits, labels = random_problem((64, 300), soft=True, masked=0.05, dtype=dtype,
                                    device=device)
    grad_rows = torch.rand(64, dtype=torch.float64, device=device)
    exact = loss_and_grad(lambda s: ref.zlpr_loss(s, labels, reduction="none"), logits.double(),
                          grad_rows)
    ours = loss_and_grad(lambda s: kxops.zlpr_loss(s, labels, reduction="none"), logits,
                         grad_rows.float())
    theirs = loss_and_grad(lambda s: ref.zlpr_loss(s, labels, reduction="none"), logits,
                           grad_rows.float())
    for o, t, e in zip(ours, theirs, exact):
        assert_error_rule(o, t, e, dtype)


def assert_sparse_matches_reference(logits, positives, grad_rows):
    """Per-row losses and the gradient under per-row weights grad_rows, kernel vs reference."""
    actual = loss_and_grad(lambda s: kxops.sparse_zlpr_loss(s, positives, reduction="none"),
                           logits, grad_rows)
    expected = loss_and_grad(lambda s: ref.sparse_zlpr_loss(s, positives, reduction="none"),
                             logits, grad_rows)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_classes", [7, 700, 3000])
def test_kernel_sparse_matches_reference(device, dtype, index_dtype, num_classes):
    needs_kernel("sparse_zlpr", device)
    logits, _ = random_problem((4, 3, num_classes), masked=0.05, dtype=dtype, device=device)
    positives = torch.randint(0, num_classes, (4, 3, 6))
    positives[..., 1] = positives[..., 0]                        # duplicates
    positives[torch.rand(positives.shape) < 0.3] = -1            # padding
    positives = positives.to(device=device, dtype=index_dtype)
    grad_rows = torch.rand(4, 3, device=device, dtype=torch.float64 if dtype == torch.float64
                           else torch.float32)
    assert_sparse_matches_reference(logits, positives, grad_rows)


# On CUDA: the largest row whose bitmap of positives fits in shared memory, one class more
# (dense labels instead), and a row whose bitmap plus the static storage passes 48 KiB.
@pytest.mark.parametrize("num_classes", [327_680, 327_681, 393_216])
def test_kernel_sparse_many_classes(device, num_classes):
    needs_kernel("sparse_zlpr", device)
    logits, _ = random_problem((2, num_classes), masked=0.05, dtype=torch.float32,
                               device=device)
    positives = torch.tensor([[0, num_classes - 1, 5, -1], [num_classes - 1, 7, 7, -1]],
                             device=device)
    grad_rows = torch.rand(2, device=device)
    assert_sparse_matches_reference(logits, positives, grad_rows)


def test_kernel_sparse_positives_dominate(device):
    needs_kernel("sparse_zlpr", device)
    logits = torch.full((2, 3000), -5.0, device=device)
    logits[:, :2900] = 12.0
    positives = torch.arange(2900, device=device).expand(2, -1)
    loss = kxops.sparse_zlpr_loss(logits, positives, reduction="none")
    expected = ref.zlpr_loss(logits.double(), torch.arange(3000, device=device).lt(2900)
                             .expand(2, -1), reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# The CPU kernel stabilises the negative sum with the row's maximum, taken as it copies the
# logits, unless a positive reaches that maximum: rows whose top is a positive far above every
# negative (the row's maximum would underflow every negative term), tied with the top negative,
# or NaN; at every position of a row and across the vector tail.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_classes", [1, 5, 8, 9, 17, 100])
def test_kernel_sparse_positive_on_top_of_its_row(device, dtype, num_classes):
    needs_kernel("sparse_zlpr", device)
    rows = 4 * num_classes
    logits = torch.randn(rows, num_classes, dtype=torch.float64)
    top = torch.arange(rows) % num_classes  # the positive's class
    tops = torch.tensor([150.0, 0.0, math.nan, 3.0], dtype=torch.float64).repeat_interleave(
        num_classes)
    tops[num_classes:2 * num_classes] = logits[num_classes:2 * num_classes].amax(-1)  # a tie
    logits[torch.arange(rows), top] = tops
    positives = torch.stack([top, torch.full_like(top, -1)], -1).to(device)
    grad_rows = torch.rand(rows, device=device, dtype=ref.opmath_dtype(dtype))
    assert_sparse_matches_reference(logits.to(device=device, dtype=dtype), positives, grad_rows)


def test_kernel_no_gradient_pass_without_requires_grad(device):
    needs_kernel("zlpr", device)
    logits, labels = random_problem((4, 9), dtype=torch.float32, device=device)
    loss, grad = torch.ops.kxops.zlpr(logits, labels, [False])
    assert grad.numel() == 0
    assert_close(loss, ref.zlpr_row_loss(logits, labels))


@cuda_with_memory(24)
def test_cuda_more_than_2_pow_31_elements():
    """Row offsets past 2^31 elements: the last rows must match the reference."""
    needs_kernel("zlpr", "cuda")
    rows, num_classes = 2**16 + 8, 2**15
    logits = torch.randn(rows, num_classes, device="cuda", dtype=torch.float16)
    labels = torch.zeros(rows, num_classes, device="cuda", dtype=torch.bool)
    labels[:, ::97] = True
    loss, grad = torch.ops.kxops.zlpr(logits, labels, [True])
    tail = slice(rows - 4, rows)
    expected = loss_and_grad(lambda s: ref.zlpr_loss(s, labels[tail], reduction="none"),
                             logits[tail], torch.ones(4, device="cuda"))
    assert_close(loss[tail], expected[0])
    assert_close(grad[tail], expected[1])


# --- NaN and infinities: the reference's rules, and every kernel on them ----------------------

def test_reference_nan_and_inf_rules():
    """The rules the kernels follow: a +inf term makes its sum and the loss inf (gradient 0 at
    the finite terms, NaN at the infinite one); NaN reaches only the classes in its sum."""
    logits = torch.tensor([[math.inf, 1.0, -2.0, 0.5], [math.nan, 1.0, -2.0, -math.inf]],
                          dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    loss = ref.zlpr_loss(logits, labels, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    # Row 0: +inf negative. The positive side is finite and keeps its gradient.
    assert loss[0] == math.inf
    assert grad[0, 0].isnan() and grad[0, 1] == 0
    _, positive_side = zlpr_by_loops(logits.detach()[:1, 2:], labels[:1, 2:])
    assert_close(grad[0, 2:], positive_side[0])
    # Row 1: NaN positive: NaN at the positives, the negative keeps its gradient, masked 0.
    assert loss[1].isnan()
    assert grad[1, [0, 2]].isnan().all() and grad[1, 3] == 0
    assert_close(grad[1, 1], torch.tensor(math.exp(1.0) / (1 + math.exp(1.0)),
                                          dtype=torch.float64))
    # A NaN soft label joins both sums: the whole row (but masked classes) is NaN.
    labels = torch.tensor([[0.0, math.nan, 1.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, 3.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    loss = ref.zlpr_loss(s, labels, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert loss.isnan().all() and grad[0, :3].isnan().all() and grad[0, 3] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_gradient_exact_for_huge_and_tied_logits(dtype):
    """logsumexp's backward, exp(x - result), rounds the ties away (16 tied at 1e8 summed to
    16); factoring out the maximum keeps each at 1/16."""
    logits = torch.full((2, 16), 1e8, dtype=dtype)
    logits[1] = -1e8
    labels = torch.zeros(2, 16)
    labels[1] = 1
    logits.requires_grad_(True)
    loss = ref.zlpr_loss(logits, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    assert_close(grad[0], torch.full((16,), 1 / 16, dtype=dtype))
    assert_close(grad[1], torch.full((16,), -1 / 16, dtype=dtype))
    assert_close(loss, torch.tensor(2 * (1e8 + math.log(16)), dtype=dtype))


@pytest.mark.parametrize("loss_fn", [ref.zlpr_loss, kxops.zlpr_loss])
def test_huge_tied_logits_keep_their_soft_weights(loss_fn):
    """s + log(w) rounds to s at 1e30: the weights must enter after the maximum is out."""
    logits = torch.tensor([[1e30, 0.0, 0.0, 1e30]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0.25, 0.0, 0.5, 0.5]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss_fn(logits, labels, reduction="sum"), logits)
    # Negative weights 0.75 and 0.5 share the sum at 1e30; the positive side is 1 + 0.5 e^0.
    expected = torch.tensor([[0.75 / 1.25, 0.0, -0.5 / 1.5, 0.5 / 1.25]],
                            dtype=torch.float64)
    assert_close(grad, expected)


# Classes 17 and 19 put an entry in every SIMD lane position and in the scalar tail on CPU
# (4 or 8 lanes), in several threads of a CUDA warp row; 2100 classes make a CUDA block row.
NAN_INF_SIZES = [17, 19, 2100]
SPECIAL_VALUES = [math.nan, math.inf, -math.inf]


def special_positions(num_classes):
    return sorted({0, 3, 5, 9, num_classes // 2, num_classes - 2, num_classes - 1})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_classes", NAN_INF_SIZES)
@pytest.mark.parametrize("soft", [False, True])
def test_kernel_nan_inf_logits_match_reference(device, dtype, num_classes, soft):
    """One NaN/+inf/-inf logit per row, at every position, as a positive and as a negative."""
    needs_kernel("zlpr", device)
    positions = special_positions(num_classes)
    rows = len(positions) * len(SPECIAL_VALUES) * 2
    logits, labels = random_problem((rows, num_classes), soft=soft, dtype=torch.float64)
    row = 0
    for position in positions:
        for value in SPECIAL_VALUES:
            for target in (0.0, 1.0):
                logits[row, position] = value
                labels[row, position] = target if soft else bool(target)
                row += 1
    assert_dense_matches_reference(logits.to(device=device, dtype=dtype), labels.to(device))
    # Two +inf negatives tie at +inf: they must count, not cancel (inf - inf).
    logits[:, :2] = math.inf
    assert_dense_matches_reference(logits.to(device=device, dtype=dtype),
                                   torch.zeros_like(labels).to(device))


@pytest.mark.parametrize("label_dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("num_classes", NAN_INF_SIZES)
def test_kernel_nan_inf_soft_labels_match_reference(device, label_dtype, num_classes):
    """A NaN or infinite label at every position (a SIMD lane or the scalar tail on CPU)."""
    needs_kernel("zlpr", device)
    positions = special_positions(num_classes)
    logits, labels = random_problem((len(positions) * 3, num_classes), soft=True,
                                    masked=0.1, dtype=torch.float32, device=device)
    labels = labels.to(label_dtype)
    for row, (position, value) in enumerate(
            (p, v) for p in positions for v in SPECIAL_VALUES):
        labels[row, position] = value
        logits[row, position] = 0.5  # not masked there
    assert_dense_matches_reference(logits, labels)
    loss = kxops.zlpr_loss(logits, labels, reduction="none")
    assert loss[0::3].isnan().all() and (loss[1::3] == math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_classes", NAN_INF_SIZES)
def test_kernel_sparse_nan_inf_logits_match_reference(device, dtype, num_classes):
    needs_kernel("sparse_zlpr", device)
    positions = special_positions(num_classes)
    rows = len(positions) * len(SPECIAL_VALUES) * 2
    logits, _ = random_problem((rows, num_classes), dtype=torch.float64)
    positives = torch.randint(0, num_classes, (rows, 3))
    row = 0
    for position in positions:
        for value in SPECIAL_VALUES:
            for positive in (False, True):
                logits[row, position] = value
                positives[row, 0] = position if positive else -1
                positives[row, 1:][positives[row, 1:] == position] = -1
                row += 1
    assert_sparse_matches_reference(logits.to(device=device, dtype=dtype),
                                    positives.to(device),
                                    torch.rand(rows, device=device, dtype=torch.float64
                                               if dtype == torch.float64 else torch.float32))


def test_nan_logit_row_gradient_only_where_its_sum_reaches():
    """Hard labels: a NaN positive leaves the negatives' gradients finite (no 0 * NaN)."""
    logits = torch.randn(2, 19)
    labels = torch.zeros(2, 19, dtype=torch.bool)
    labels[:, [2, 18]] = True
    logits[0, 2] = math.nan   # a SIMD lane on CPU
    logits[1, 18] = math.nan  # the scalar tail
    _, grad = loss_and_grad(lambda s: kxops.zlpr_loss(s, labels, reduction="sum"), logits)
    assert grad[labels].isnan().all() and torch.isfinite(grad[~labels]).all()


# --- arguments: every registered op checks every argument -----------------------------------

DIRECT_BAD_CALLS = {
    # name: (call on torch.ops.kxops, Python error type, message pattern)
    # reduction is a schema str: torch's argument parser refuses anything else by name.
    "zlpr bool reduction": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), [True], True)",
                            "RuntimeError", "reduction"),
    "sparse bool reduction": ("sparse_zlpr(torch.randn(2, 3), "
                              "torch.zeros(2, 1, dtype=torch.long), -1, [True], True)",
                              "RuntimeError", "reduction"),
    "zlpr unknown reduction": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), [True], 'avg')",
                               "ValueError",
                               "kxops.zlpr: reduction must be one of ('none', 'sum', 'mean')"),
    "sparse unknown reduction": ("sparse_zlpr(torch.randn(2, 3), "
                                 "torch.zeros(2, 1, dtype=torch.long), -1, [True], 'Mean')",
                                 "ValueError", "kxops.sparse_zlpr: reduction must be"),
    "zlpr int logits": ("zlpr(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), [True])",
                        "TypeError", "kxops.zlpr: logits must be a float64, float32, float16 or "
                        "bfloat16 tensor, got torch.int64"),
    "zlpr float8 logits": ("zlpr(torch.ones(2, 3).to(torch.float8_e4m3fn), torch.ones(2, 3), "
                           "[True])", "TypeError", "got torch.float8_e4m3fn"),
    "zlpr 0-dim logits": ("zlpr(torch.tensor(1.0), torch.tensor(1.0), [True])", "ValueError",
                          "kxops.zlpr: logits must have at least 1 dim (the class dim)"),
    "zlpr short labels": ("zlpr(torch.randn(64, 300), torch.ones(2, 3), [True])", "ValueError",
                          "kxops.zlpr: labels shape (2, 3) must equal logits shape (64, 300)"),
    "zlpr long labels": ("zlpr(torch.randn(2, 3), torch.ones(2, 3, 5), [False])", "ValueError",
                         "labels shape (2, 3, 5)"),
    "zlpr complex labels": ("zlpr(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.cfloat), "
                            "[True])", "TypeError", "labels"),
    "sparse int logits": ("sparse_zlpr(torch.ones(2, 3, dtype=torch.int32), "
                          "torch.zeros(2, 1, dtype=torch.long), -1, [True])", "TypeError",
                          "kxops.sparse_zlpr: logits must be"),
    "sparse float positives": ("sparse_zlpr(torch.randn(2, 3), torch.zeros(2, 1), -1, [True])",
                               "TypeError", "kxops.sparse_zlpr: positives must be an int32 or "
                               "int64 tensor, got torch.float32"),
    "sparse uint16 positives": ("sparse_zlpr(torch.randn(2, 3), "
                                "torch.zeros(2, 1, dtype=torch.uint16), -1, [True])",
                                "TypeError", "positives"),
    "sparse positives rows": ("sparse_zlpr(torch.randn(64, 3), "
                              "torch.zeros(2, 1, dtype=torch.long), -1, [True])", "ValueError",
                              "kxops.sparse_zlpr: positives shape (2, 1) must be "
                              "logits.shape[:-1] + (P,) = (64,) + (P,)"),
    "sparse positives dims": ("sparse_zlpr(torch.randn(2, 3, 4), "
                              "torch.zeros(2, 1, dtype=torch.long), -1, [True])", "ValueError",
                              "positives shape"),
    "sparse index too big": ("sparse_zlpr(torch.randn(2, 3), torch.tensor([[0], [3]]), -1, "
                             "[True])", "IndexError",
                             "kxops.sparse_zlpr: positives holds class index 3, out of range"),
    "sparse index negative": ("sparse_zlpr(torch.randn(2, 3), "
                              "torch.tensor([[0], [-2]], dtype=torch.int32), -1, [True])",
                              "IndexError", "out of range"),
    "sparse wrapped ignore_index": ("sparse_zlpr(torch.randn(1, 3), "
                                    "torch.tensor([[0, -1]], dtype=torch.int32), 2**32 - 1, "
                                    "[True])", "IndexError", "out of range"),
    "sparse negative grad_filter": ("sparse_zlpr(torch.randn(2, 3), "
                                    "torch.zeros(2, 1, dtype=torch.long), -1, [True], 'none', "
                                    "-1.0)", "ValueError", "kxops.sparse_zlpr: grad_filter"),
    "backward short grad_loss": ("zlpr_backward(torch.ones(2), torch.randn(64, 300))",
                                 "ValueError", "kxops.zlpr_backward: grad_loss shape (2,) "
                                 "must be grad.shape[:-1] = (64,)"),
    "backward long grad_loss": ("zlpr_backward(torch.ones(64, 5), torch.randn(64, 3))",
                                "ValueError", "grad_loss shape (64, 5)"),
    "backward 0-dim grad": ("zlpr_backward(torch.tensor(1.0), torch.tensor(2.0))",
                            "ValueError", "kxops.zlpr_backward: grad must have at least 1 dim"),
    "backward int grad": ("zlpr_backward(torch.ones(2), torch.ones(2, 3, dtype=torch.long))",
                          "TypeError", "kxops.zlpr_backward: grad must"),
    "backward int grad_loss": ("zlpr_backward(torch.ones(2, dtype=torch.long), "
                               "torch.ones(2, 3))", "TypeError", "grad_loss must"),
    # zlpr_backward has no kernel of its own: a sparse tensor would reach ATen's internals.
    "backward sparse grad_loss": ("zlpr_backward(torch.ones(2).to_sparse(), torch.ones(2, 3))",
                                  "TypeError", "grad_loss must be a dense (strided) tensor"),
    "backward CSR grad": ("zlpr_backward(torch.ones(2), torch.ones(2, 3).to_sparse_csr())",
                          "TypeError", "grad must be a dense (strided) tensor"),
    "zlpr None logits": ("zlpr(None, torch.ones(2, 3), [True])", "TypeError",
                         "kxops.zlpr: logits must be a Tensor, got None"),
    "sparse None positives": ("sparse_zlpr(torch.randn(2, 3), None, -1, [True])", "TypeError",
                              "kxops.sparse_zlpr: positives must be a Tensor, got None"),
    "backward None grad": ("zlpr_backward(torch.ones(2), None)", "TypeError",
                           "kxops.zlpr_backward: grad must be a Tensor, got None"),
    "zlpr bits8 labels": ("zlpr(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bits8), "
                          "[True])", "TypeError",
                          "labels must be a bool, integer or floating-point"),
    # grad_mask: a list of one flag. The schema's bool[1] fixes the element type only.
    "zlpr long grad_mask": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), [True, True])",
                            "ValueError", "kxops.zlpr: grad_mask must hold 1 flag (logits), "
                            "got 2"),
    "zlpr empty grad_mask": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), [])", "ValueError",
                             "kxops.zlpr: grad_mask must hold 1 flag"),
    "sparse long grad_mask": ("sparse_zlpr(torch.randn(2, 3), "
                              "torch.zeros(2, 1, dtype=torch.long), -1, [False, True])",
                              "ValueError", "kxops.sparse_zlpr: grad_mask must hold 1 flag"),
    "zlpr bool grad_mask": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), True)", "RuntimeError",
                            "grad_mask"),
    "zlpr None grad_mask": ("zlpr(torch.randn(2, 3), torch.ones(2, 3), None)", "RuntimeError",
                            "grad_mask"),
}


def test_direct_ops_reject_bad_arguments():
    """torch.ops.kxops.* called directly (as torch.compile and opcheck do): a clear error of
    the wrapper's type for every bad argument, never a crash. One subprocess runs them all
    and reports each: a crash shows as the case it stopped at."""
    outcomes = direct_call_outcomes(
        {name: "torch.ops.kxops." + call for name, (call, _, _) in DIRECT_BAD_CALLS.items()})
    for name, (_, error, pattern) in DIRECT_BAD_CALLS.items():
        assert outcomes[name].startswith(error + " "), (name, outcomes[name])
        assert pattern in outcomes[name], (name, outcomes[name])


# Each argument of each op wrong in turn (None, a wrong dtype, shape or device, a grad_mask of
# another length), the others right: {op: (the right arguments, {argument: wrong values})}.
ARGUMENT_ATTACKS = {
    "zlpr": ("L, Y, [True], 'mean'", {
        "logits": ["None", "L.long()", "L[:3]", "L.to('meta')", "L.to_sparse()", "L[0, 0]"],
        "labels": ["None", "Y.to(torch.cfloat)", "Y[:, :3]", "Y.to('meta')", "Y.to_sparse()"],
        "grad_mask": ["None", "True", "[]", "[True, True]", "[L]"],
        "reduction": ["None", "'avg'", "3"],
    }),
    "sparse_zlpr": ("L, P, -1, [True], 'mean', 0.0", {
        "logits": ["None", "L.long()", "L[:3]", "L.to('meta')", "L.to_sparse()", "L[0, 0]"],
        "positives": ["None", "P.float()", "P[:3]", "P.to('meta')", "P + 10", "P - 2",
                      "P[..., None]"],
        "ignore_index": ["None", "1.5", "L"],
        "grad_mask": ["None", "True", "[]", "[True, False]"],
        "reduction": ["None", "'avg'"],
        "grad_filter": ["None", "-1.0", "float('nan')", "float('inf')", "L"],
    }),
    "zlpr_backward": ("GL, G", {
        "grad_loss": ["None", "GL.long()", "GL[:3]", "GL.to('meta')", "GL.to_sparse()",
                      "GL[0]"],
        "grad": ["None", "G.long()", "G[:3]", "G.to('meta')", "G.to_sparse_csr()", "G[0, 0]"],
    }),
}
ATTACK_PRELUDE = """
L = torch.randn(4, 5)
Y = torch.rand(4, 5) < 0.5
P = torch.tensor([[0, 1], [2, -1], [4, 4], [-1, -1]])
GL, G = torch.rand(4), torch.randn(4, 5)
"""


def attack_calls():
    """{case: (op, argument, the call)} for every wrong value of ARGUMENT_ATTACKS."""
    calls = {}
    for op, (right, wrong_values) in ARGUMENT_ATTACKS.items():
        args = [a.strip() for a in right.split(", ")]
        for position, (argument, values) in enumerate(wrong_values.items()):
            for value in values:
                call_args = [*args[:position], value, *args[position + 1:]]
                calls[f"{op} {argument}={value}"] = (
                    op, argument, f"torch.ops.kxops.{op}({', '.join(call_args)})")
    return calls


def test_direct_ops_refuse_each_argument_wrong_in_turn():
    """Each argument wrong in turn, in one subprocess (a crash shows as the case it stopped
    at): an exception every time, of the op's own words (kxops.<op>:, from the C++ op or its
    fake kernel for a meta tensor) or, where the schema's type refuses the value, torch's
    argument parser naming the argument."""
    calls = attack_calls()
    outcomes = direct_call_outcomes({case: call for case, (_, _, call) in calls.items()},
                                    prelude=ATTACK_PRELUDE)
    for case, (op, argument, _) in calls.items():
        error, _, message = outcomes[case].partition(" ")
        assert (message.startswith(f"kxops.{op}: ")
                or (error == "RuntimeError" and f"argument '{argument}'" in message)
                ), (case, outcomes[case])


# The same bad argument through each layer that checks it: the C++ op, its fake kernel (meta
# tensors) and the public wrapper. {case: (the op's prefix, call)}
PREFIX_CASES = {
    "zlpr op": ("kxops.zlpr:", lambda d: torch.ops.kxops.zlpr(
        torch.randn(2, 3, device=d), torch.ones(2, 4, device=d), [True])),
    "zlpr wrapper": ("kxops.zlpr:", lambda d: kxops.zlpr_loss(
        torch.randn(2, 3, device=d), torch.ones(2, 4, device=d))),
    "sparse_zlpr op": ("kxops.sparse_zlpr:", lambda d: torch.ops.kxops.sparse_zlpr(
        torch.randn(2, 3, device=d), torch.zeros(3, 1, dtype=torch.long, device=d), -1,
        [True])),
    "sparse_zlpr wrapper": ("kxops.sparse_zlpr:", lambda d: kxops.sparse_zlpr_loss(
        torch.randn(2, 3, device=d), torch.zeros(3, 1, dtype=torch.long, device=d))),
    "sparse_zlpr op grad_filter": ("kxops.sparse_zlpr:", lambda d: torch.ops.kxops.sparse_zlpr(
        torch.randn(2, 3, device=d), torch.zeros(2, 1, dtype=torch.long, device=d), -1,
        [True], "mean", -1.0)),
    "sparse_zlpr wrapper grad_filter": ("kxops.sparse_zlpr:", lambda d: kxops.sparse_zlpr_loss(
        torch.randn(2, 3, device=d), torch.zeros(2, 1, dtype=torch.long, device=d),
        grad_filter=-1.0)),
    "sparse_zlpr op index": ("kxops.sparse_zlpr:", lambda d: torch.ops.kxops.sparse_zlpr(
        torch.randn(2, 3, device=d), torch.full((2, 1), 7, device=d), -1, [True])),
    "sparse_zlpr wrapper index": ("kxops.sparse_zlpr:", lambda d: kxops.sparse_zlpr_loss(
        torch.randn(2, 3, device=d), torch.full((2, 1), 7, device=d))),
    "zlpr_backward op": ("kxops.zlpr_backward:", lambda d: torch.ops.kxops.zlpr_backward(
        torch.ones(3, device=d), torch.randn(2, 3, device=d))),
    "zlpr op grad_mask": ("kxops.zlpr:", lambda d: torch.ops.kxops.zlpr(
        torch.randn(2, 3, device=d), torch.ones(2, 3, device=d), [True, True])),
}


@pytest.mark.parametrize("case", list(PREFIX_CASES))
@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_messages_start_with_the_op_prefix(case, where):
    """Every layer words an error alike: `kxops.<op>: ` first, whichever raised it."""
    if where == "cpu":
        needs_kernel("zlpr", "cpu")
    elif "index" in case:
        pytest.skip("a meta tensor holds no ids to range-check")
    prefix, call = PREFIX_CASES[case]
    with pytest.raises((TypeError, ValueError, IndexError)) as info:
        call(where)
    assert str(info.value).startswith(prefix + " "), str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_direct_ops_reject_mixed_devices():
    needs_kernel("zlpr", "cuda")
    logits = torch.randn(2, 3, device="cuda")
    calls = [
        (lambda: torch.ops.kxops.zlpr(logits, torch.ones(2, 3), [True]),
         "kxops.zlpr: labels is on cpu but logits is on cuda"),
        (lambda: torch.ops.kxops.sparse_zlpr(logits, torch.zeros(2, 1, dtype=torch.long), -1,
                                             [True]),
         "kxops.sparse_zlpr: positives is on cpu but logits is on cuda"),
        (lambda: torch.ops.kxops.zlpr_backward(torch.ones(2), logits), "grad_loss is on"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


# On CUDA: a bitmap of positives, and dense labels built on the device past the bitmap's size.
@pytest.mark.parametrize("num_classes", [4, 327_681])
def test_int32_positives_with_ignore_index_past_int32_do_not_wrap(device, num_classes):
    """2**32 + 1 would wrap to class 1 in an int32 comparison: it must mark nothing."""
    logits = torch.randn(2, num_classes, device=device)
    positives = torch.tensor([[0, 1], [1, 1]], dtype=torch.int32, device=device)
    dense = torch.zeros(2, num_classes, dtype=torch.bool, device=device)
    dense[0, :2] = dense[1, 1] = True
    expected = ref.zlpr_loss(logits, dense, reduction="none")
    for fn in (ref.sparse_zlpr_loss, kxops.sparse_zlpr_loss):
        assert_close(fn(logits, positives, ignore_index=2**32 + 1, reduction="none"), expected)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        kxops.sparse_zlpr_loss(logits, positives, ignore_index=2**64)


@pytest.mark.parametrize("label_dtype", [torch.uint16, torch.uint32, torch.uint64,
                                         torch.float8_e4m3fn])
def test_kernel_unsigned_and_float8_labels(device, label_dtype):
    needs_kernel("zlpr", device)
    logits, labels = random_problem((5, 19), masked=0.1, dtype=torch.float32, device=device)
    assert_dense_matches_reference(logits, labels.to(label_dtype))


def test_float8_logits_run_the_reference():
    logits = torch.randn(3, 5).to(torch.float8_e4m3fn)
    labels = torch.rand(3, 5) < 0.5
    assert_close(kxops.zlpr_loss(logits, labels).float(),
                 ref.zlpr_loss(logits, labels).float(), dtype=torch.bfloat16)


def test_labels_with_requires_grad_are_constants():
    """Labels are targets: no gradient, and a loss whose only input needing grad is the labels
    does not need grad (before, its backward raised)."""
    logits, labels = random_problem((3, 7), soft=True, dtype=torch.float32)
    labels.requires_grad_(True)
    assert not kxops.zlpr_loss(logits, labels).requires_grad
    assert not ref.zlpr_loss(logits, labels).requires_grad
    logits.requires_grad_(True)
    loss = kxops.zlpr_loss(logits, labels)
    loss.backward()
    assert labels.grad is None
    (expected,) = torch.autograd.grad(ref.zlpr_loss(logits, labels), logits)
    assert_close(logits.grad, expected)


def test_double_backward_matches_the_reference():
    """Second derivatives (a gradient penalty, a Hessian-vector product) through the op equal
    the reference's."""
    logits, labels = random_problem((3, 7), soft=True, dtype=torch.float64)
    positives = torch.tensor([[0, 3], [1, -1], [-1, -1]])
    for ours, theirs in ((lambda s: kxops.zlpr_loss(s, labels, reduction="sum"),
                          lambda s: ref.zlpr_loss(s, labels, reduction="sum")),
                         (lambda s: kxops.sparse_zlpr_loss(s, positives),
                          lambda s: ref.sparse_zlpr_loss(s, positives))):
        results = []
        for loss_fn in (ours, theirs):
            leaf = logits.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(leaf), leaf, create_graph=True)
            (second,) = torch.autograd.grad((grad**2).sum(), leaf)
            results.append(second)
        assert_close(*results)
        assert torch.autograd.gradgradcheck(ours, logits.detach().requires_grad_(True))


def test_direct_op_without_computed_gradient_still_differentiates():
    """A direct call with compute_grad=False: backward recomputes the gradient."""
    logits, labels = random_problem((3, 7), soft=True, dtype=torch.float64)
    leaf = logits.detach().requires_grad_(True)
    torch.ops.kxops.zlpr(leaf, labels, [False])[0].sum().backward()
    assert_close(leaf.grad, torch.func.grad(lambda s: ref.zlpr_loss(s, labels,
                                                                    reduction="sum"))(logits))


@pytest.mark.parametrize("op", ["zlpr", "sparse_zlpr"])
def test_direct_op_empty_gradient_output_is_not_differentiable(op):
    """grad_mask=[False]: the empty gradient output takes no part in autograd (it used to
    require grad, and a backward through it, e.g. (loss + grad.sum()).backward() or opcheck's
    test_aot_dispatch_dynamic, failed with "Mismatch in shape: grad_output[0] has a shape of
    torch.Size([0])")."""
    needs_kernel("zlpr", "cpu")
    logits, labels = random_problem((3, 7), soft=True, dtype=torch.float64)
    targets = labels if op == "zlpr" else torch.tensor([[0, 2], [6, -1], [-1, -1]])
    extra = () if op == "zlpr" else (-1,)
    for reduction in ("none", "mean", "sum"):
        leaf = logits.detach().requires_grad_(True)
        loss, grad = getattr(torch.ops.kxops, op)(leaf, targets, *extra, [False], reduction)
        assert grad.numel() == 0 and not grad.requires_grad
        (loss.sum() + grad.sum()).backward()
        expected = logits.detach().requires_grad_(True)
        getattr(torch.ops.kxops, op)(expected, targets, *extra, [True], reduction)[0].sum(
            ).backward()
        assert torch.equal(leaf.grad, expected.grad)
        torch.library.opcheck(getattr(torch.ops.kxops, op),
                              (logits.detach().requires_grad_(True), targets, *extra, [False],
                               reduction))


@pytest.mark.parametrize("op", ["zlpr", "sparse_zlpr"])
def test_fake_kernel_words_a_dtype_error_as_the_op(op):
    """Integer or complex logits: the fake kernel (meta tensors) raises the C++ op's message
    word for word (it used to say the wrapper's "must be a floating-point tensor")."""
    needs_kernel("zlpr", "cpu")

    def call(device, dtype):
        logits = torch.zeros(2, 3, dtype=dtype, device=device)
        if op == "zlpr":
            return torch.ops.kxops.zlpr(logits, torch.ones(2, 3, device=device), [True])
        return torch.ops.kxops.sparse_zlpr(
            logits, torch.zeros(2, 1, dtype=torch.long, device=device), -1, [True])

    for dtype in (torch.long, torch.cfloat):
        with pytest.raises(TypeError) as on_cpu:
            call("cpu", dtype)
        with pytest.raises(TypeError) as on_meta:
            call("meta", dtype)
        assert str(on_meta.value) == str(on_cpu.value)
        assert str(on_cpu.value).startswith(f"kxops.{op}: logits must be a float64")


# --- the backward returns the forward's gradient ----------------------------------------------


def dense_and_sparse_losses(shape, dtype=torch.float32, device="cpu"):
    """(kxops loss, reference loss) pairs, dense and sparse, over random targets of shape."""
    logits, labels = random_problem(shape, soft=True, dtype=dtype, device=device)
    positives = torch.randint(0, shape[-1], (*shape[:-1], 3), device=device)
    return logits, [
        (lambda s, r: kxops.zlpr_loss(s, labels, reduction=r),
         lambda s, r: ref.zlpr_loss(s, labels, reduction=r)),
        (lambda s, r: kxops.sparse_zlpr_loss(s, positives, reduction=r),
         lambda s, r: ref.sparse_zlpr_loss(s, positives, reduction=r)),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 7, 1000, 4097])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_backward_returns_the_forward_gradient_as_is(dtype, rows, reduction):
    """On CPU the backward of a mean or sum makes no logits-sized pass: the forward's gradient
    (of the op's reduced loss) is the answer, checked exactly."""
    needs_kernel("zlpr", "cpu")
    logits, losses = dense_and_sparse_losses((rows, 9), dtype)
    for ours, theirs in losses:
        leaf = logits.detach().requires_grad_(True)
        loss = ours(leaf, reduction)
        assert "zlpr_backward" not in dispatched_ops(loss.backward)
        expected = logits.detach().requires_grad_(True)
        theirs(expected, reduction).backward()
        assert_close(leaf.grad, expected.grad)


def test_retained_graph_recomputes_what_a_backward_took(device):
    """A backward takes the forward's gradient over (autograd may then write into it): each
    later backward of a retained graph recomputes it, whatever happened to the first result."""
    needs_kernel("zlpr", device)
    logits, losses = dense_and_sparse_losses((4, 9), torch.float64, device)
    for ours, theirs in losses:
        leaf = logits.detach().requires_grad_(True)
        loss = ours(leaf, "mean")
        reference = logits.detach().requires_grad_(True)
        theirs(reference, "mean").backward()
        loss.backward(retain_graph=True)
        assert_close(leaf.grad, reference.grad)
        leaf.grad.mul_(-7)  # what clip_grad_norm_ or a hook might do in place
        leaf.grad = None
        loss.backward(retain_graph=True)
        loss.backward()
        assert_close(leaf.grad, 2 * reference.grad)


@pytest.mark.parametrize("keep", ["itself", "detached", "data", "view"])
def test_a_direct_callers_gradient_output_stays_theirs(device, keep):
    """A direct caller of the op sees its gradient output (in any form: detached, .data, a
    view): the logits' gradient is then a tensor of its own, and writing into either leaves
    the other alone."""
    needs_kernel("zlpr", device)
    logits, labels = random_problem((4, 9), soft=True, dtype=torch.float64, device=device)
    leaf = logits.detach().requires_grad_(True)
    loss, grad = torch.ops.kxops.zlpr(leaf, labels, [True], "mean")
    grad = {"itself": grad, "detached": grad.detach(), "data": grad.data,
            "view": grad.view(-1)}[keep]
    kept = grad.clone()
    loss.backward()
    leaf.grad.mul_(3)
    assert torch.equal(grad, kept)
    assert_close(leaf.grad.reshape(-1), 3 * kept.reshape(-1))


def test_kept_losses_do_not_keep_the_forward_gradient():
    """Every backward releases the forward's gradient, also when it scales it (a scaled loss,
    as under a GradScaler): a training loop that keeps its loss tensors (a history for
    logging) does not grow by a logits-sized tensor per step."""
    needs_kernel("zlpr", "cpu")
    result = run_isolated("""
        import torch, kxops
        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        x = torch.randn(256, 4096, requires_grad=True)
        labels = torch.rand(256, 4096) < 0.1
        positives = torch.randint(0, 4096, (256, 4))
        history = []
        for step in range(40):
            for loss in (kxops.zlpr_loss(x, labels), kxops.sparse_zlpr_loss(x, positives)):
                (loss * 0.5).backward()
                history.append(loss)
                x.grad = None
            if step == 9:
                start = rss()
        print("GROWTH", (rss() - start) / x.nbytes)
    """, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    growth = float(result.stdout.split("GROWTH")[-1])
    # Kept gradients would add 60 logits-sized tensors.
    assert growth < 5, (growth, result.stderr[-2000:])


def test_saved_tensor_hooks_see_the_forward_gradient():
    """Under saved-tensor hooks (activation checkpointing, save_on_cpu) the forward's gradient
    is saved through them like any saved tensor (so that checkpointing drops it), and the
    backward stays right."""
    needs_kernel("zlpr", "cpu")
    logits, losses = dense_and_sparse_losses((4, 9), torch.float64)
    for ours, theirs in losses:
        packed = []

        def pack(t, packed=packed):
            packed.append(t.shape)
            return t

        leaf = logits.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = ours(leaf, "mean")
        assert logits.shape in packed[1:]  # the targets' shape aside: the gradient
        loss.backward()
        reference = logits.detach().requires_grad_(True)
        theirs(reference, "mean").backward()
        assert_close(leaf.grad, reference.grad)
        checkpointed = logits.detach().requires_grad_(True)
        torch.utils.checkpoint.checkpoint(lambda s, ours=ours: ours(s * 1.0, "mean"),
                                          checkpointed, use_reentrant=False).backward()
        assert_close(checkpointed.grad, reference.grad)


def test_third_derivatives_through_the_gradient_output(device):
    """The op's gradient output differentiated twice (gradgradcheck of the direct ops): the
    Hessian-vector product of a double backward is itself differentiable."""
    needs_kernel("zlpr", device)
    logits, labels = random_problem((3, 5), soft=True, dtype=torch.float64, device=device)
    positives = torch.tensor([[0, 3], [1, -1], [-1, -1]], device=device)
    for reduction in ("none", "mean", "sum"):
        for call in (lambda s, r=reduction: torch.ops.kxops.zlpr(s, labels, [True], r),
                     lambda s, r=reduction: torch.ops.kxops.sparse_zlpr(s, positives, -1, [True],
                                                                        r)):
            assert torch.autograd.gradgradcheck(call, (logits.clone().requires_grad_(True),))


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (0, 5), (3, 0)])
def test_reduction_reduces_the_row_losses_and_their_gradient(device, shape):
    """The op's mean and sum are torch's of its row losses, and its gradient output is theirs:
    the rows' gradients, divided by the row count for a mean."""
    needs_kernel("zlpr", device)
    logits, labels = random_problem(shape, soft=True, dtype=torch.float64, device=device)
    # Class 0, or padding where there is no class.
    positives = torch.full((*shape[:-1], 1), min(0, shape[-1] - 1), device=device)
    rows = max(math.prod(shape[:-1]), 1)
    for call in (lambda r: torch.ops.kxops.zlpr(logits, labels, [True], r),
                 lambda r: torch.ops.kxops.sparse_zlpr(logits, positives, -1, [True], r)):
        row_loss, grad = call("none")
        assert row_loss.shape == shape[:-1]
        for reduction, scale in (("mean", 1 / rows), ("sum", 1)):
            loss, reduced_grad = call(reduction)
            torch.testing.assert_close(loss, getattr(row_loss, reduction)(), rtol=0, atol=0,
                                       equal_nan=True)
            assert_close(reduced_grad, grad * scale)


def test_uneven_upstream_gradient_scales_the_forward_gradient(device):
    """grad_loss that is not the reduction's (a weighted mean; loss.backward(2.0)) goes
    through zlpr_backward; create_graph recomputes a differentiable gradient."""
    needs_kernel("zlpr", device)
    logits, losses = dense_and_sparse_losses((4, 9), torch.float64, device)
    weights = torch.rand(4, dtype=torch.float64, device=device)
    for ours, theirs in losses:
        results = []
        for loss_fn in (ours, theirs):
            leaf = logits.detach().requires_grad_(True)
            (weighted,) = torch.autograd.grad((loss_fn(leaf, "none") * weights).sum(), leaf)
            (doubled,) = torch.autograd.grad(loss_fn(leaf, "mean"), leaf,
                                             torch.tensor(2.0, dtype=torch.float64,
                                                          device=device))
            (penalty,) = torch.autograd.grad(loss_fn(leaf, "mean"), leaf, create_graph=True)
            results.append((weighted, doubled, torch.autograd.grad(penalty.square().sum(),
                                                                   leaf)[0]))
        for a, e in zip(*results):
            assert_close(a, e)


def test_torch_func_grad_and_vmap():
    logits, labels = random_problem((3, 7), soft=True)
    positives = torch.tensor([[0, 2], [1, -1], [-1, -1]])
    for loss_fn, ref_fn in ((lambda s: kxops.zlpr_loss(s, labels),
                             lambda s: ref.zlpr_loss(s, labels)),
                            (lambda s: kxops.sparse_zlpr_loss(s, positives),
                             lambda s: ref.sparse_zlpr_loss(s, positives))):
        assert_close(torch.func.grad(loss_fn)(logits), torch.func.grad(ref_fn)(logits))
    per_row = torch.func.vmap(lambda s, t: kxops.zlpr_loss(s, t, reduction="sum"))
    assert_close(per_row(logits, labels), ref.zlpr_loss(logits, labels, reduction="none"))
    sparse_per_row = torch.func.vmap(lambda s, p: kxops.sparse_zlpr_loss(s, p, reduction="sum"))
    assert_close(sparse_per_row(logits, positives),
                 ref.sparse_zlpr_loss(logits, positives, reduction="none"))


# torch's forward AD scripts a helper on first use (torch's own deprecation warning).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_forward_mode_ad_runs_the_reference():
    """The ops have no forward-mode rule: under a forward-AD dual level the wrappers run the
    reference, whose tangent is the directional derivative."""
    import torch.autograd.forward_ad as fwAD

    logits, losses = dense_and_sparse_losses((3, 7), torch.float64)
    direction = torch.randn_like(logits)
    for ours, theirs in losses:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(ours(fwAD.make_dual(logits, direction), "mean")).tangent
        leaf = logits.clone().requires_grad_(True)
        assert_close(tangent, (torch.autograd.grad(theirs(leaf, "mean"), leaf)[0] *
                               direction).sum())


@pytest.mark.parametrize("reduction, upstream", [("mean", 32768.0), ("sum", 1024.0),
                                                 ("none", 1024.0)])
def test_fp16_gradient_times_a_loss_scale_is_rounded_once(reduction, upstream):
    """fp16 (five exponent bits) flushes the small gradients that a loss scale lifts: a
    backward with grad_loss other than 1 takes the product from an fp32 gradient and rounds it
    once, as the reference does, instead of scaling an fp16 gradient (which lost a quarter of
    a [256, 4096] mean's classes to 0 at a loss scale of 32768)."""
    needs_kernel("zlpr", "cpu")
    logits, losses = dense_and_sparse_losses((64, 2048), torch.float16)
    for ours, theirs in losses:
        grads = []
        for fn, leaf in ((ours, logits.clone().requires_grad_(True)),
                         (theirs, logits.double().requires_grad_(True))):
            loss = fn(leaf, reduction)
            loss.backward(torch.full_like(loss, upstream))
            grads.append(leaf.grad.double())
        ours_grad, exact = grads
        torch.testing.assert_close(ours_grad, exact.half().double(), rtol=2e-3, atol=1e-7)


def test_meta_and_cpu_kernels_refuse_the_same_label_dtypes():
    """The fake kernel checks what the C++ kernels check: sub-byte and bit dtypes hold no
    label per element."""
    for dtype in (torch.bits8, torch.bits16, torch.uint1, torch.int4):
        for device in ("cpu", "meta"):
            with pytest.raises(TypeError, match="labels must be"):
                torch.ops.kxops.zlpr(torch.randn(3, 5, device=device),
                                     torch.empty(3, 5, dtype=dtype, device=device), [True])


def test_ops_with_one_meta_tensor_are_refused():
    """A meta tensor among real ones reaches the fake kernels, which refuse the mix."""
    logits = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="labels is on meta but logits is on cpu"):
        torch.ops.kxops.zlpr(logits, torch.zeros(3, 5, device="meta"), [True])
    with pytest.raises(RuntimeError, match="positives is on meta but logits is on cpu"):
        torch.ops.kxops.sparse_zlpr(logits, torch.zeros(3, 2, dtype=torch.long, device="meta"),
                                    -1, [True])
    with pytest.raises(RuntimeError, match="grad_loss is on meta but grad is on cpu"):
        torch.ops.kxops.zlpr_backward(torch.ones(3, device="meta"), logits)


def test_backward_op_on_a_strided_gradient_is_contiguous_under_compile():
    """zlpr_backward returns a contiguous gradient: its fake kernel must say so (opcheck and
    torch.compile compare the strides)."""
    grad_loss, grad = torch.randn(3), torch.randn(11, 3).t()
    torch.library.opcheck(torch.ops.kxops.zlpr_backward, (grad_loss, grad))
    compiled = torch.compile(lambda a, b: torch.ops.kxops.zlpr_backward(a, b), fullgraph=True)
    assert_close(compiled(grad_loss, grad), grad * grad_loss[:, None])


def test_packed_float4_logits_are_a_type_error():
    packed = torch.zeros(3, 5, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        kxops.zlpr_loss(packed, torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("classes", [50, 3000])
def test_grad_filter_keeps_the_mean_gradient_bit_for_bit(dtype, classes):
    """grad_filter under the mean's scale: each surviving entry is bit for bit the unfiltered
    mean gradient's (the kernel once gave u * scale, which rounds differently from the
    unfiltered e * (scale / Z)), the dropped ones those whose unscaled gradient is below f;
    vector rows and non-finite (exact path) rows alike, through the public wrapper too."""
    needs_kernel("zlpr", "cpu")
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, classes, generator=gen, dtype=torch.float64) * 4).to(dtype)
    logits[1, 3], logits[2, 5], logits[3] = torch.inf, torch.nan, -100.0
    positives = torch.randint(0, classes, (7, 4), generator=gen)
    positives[4], positives[5, 1] = -1, positives[5, 0]
    labels = ref.positives_to_dense(positives, -1, classes)
    op = torch.ops.kxops.sparse_zlpr
    for f in (2.0**-12, 0.01, 0.5):
        unscaled = op(logits, positives, -1, [True], "none")[1]
        drop = ~labels & (unscaled < f)
        assert drop.any() and (~drop & ~labels & (unscaled != 0)).any()
        exact = op(logits, positives, -1, [True], "mean")[1]
        got = op(logits, positives, -1, [True], "mean", f)[1]
        torch.testing.assert_close(got, torch.where(drop, 0, exact), rtol=0, atol=0,
                                   equal_nan=True)
        leaf = logits.clone().requires_grad_()
        kxops.sparse_zlpr_loss(leaf, positives, grad_filter=f).backward()
        torch.testing.assert_close(leaf.grad, got, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients(sparse, reduction):
    """torch.autograd.grad(..., is_grads_batched=True): the backward's upstream gradient is a
    (legacy) batched tensor, a plain torch.Tensor by type whose values cannot be read; the
    backward takes the scaling path for it (it raised "Batching rule not implemented for
    aten::item / is_nonzero" where it asked whether the upstream gradient is 1)."""
    needs_kernel("zlpr", "cpu")
    torch.manual_seed(0)
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([[0, 3], [1, -1], [8, 8], [-1, -1]])
    if sparse:
        loss = kxops.sparse_zlpr_loss(logits, positives, reduction=reduction)
    else:
        labels = torch.zeros(4, 9, dtype=torch.bool)
        labels[0, 0] = labels[2, 8] = True
        loss = kxops.zlpr_loss(logits, labels, reduction=reduction)
    one = torch.autograd.grad(loss, logits, torch.ones_like(loss), retain_graph=True)[0]
    upstream = torch.stack([torch.ones_like(loss), torch.full_like(loss, 2.0)])
    batched = torch.autograd.grad(loss, logits, upstream, is_grads_batched=True)[0]
    assert torch.equal(batched[0], one) and torch.equal(batched[1], 2 * one)
