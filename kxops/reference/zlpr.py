"""ZLPR ("multilabel categorical cross-entropy") loss in pure PyTorch: the ground truth.

Per row (last dim = classes), logits ``s`` and targets ``t`` in [0, 1]::

    loss = log(1 + sum_j (1 - t_j) e^{s_j}) + log(1 + sum_j t_j e^{-s_j})

``-inf`` logits are left out of both sums (zero gradient); all math in fp32 or better; labels
are constants. Each term ``w e^x`` is taken as ``e^{x + log w}``, which sets the rules for NaN
and inf that the compiled ops follow: a NaN term makes its sum NaN (the gradient NaN at
every class in that sum, and only there); a ``+inf`` term makes it ``+inf`` (gradient 0 at the
finite terms, NaN at the infinite ones). A NaN label is in both sums. The input checks here are
the contract that the compiled ops share.
"""

import numbers

import torch

REDUCTIONS = ("none", "sum", "mean")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# The integer label dtypes (the C++ kernels' isIntegralType with bool): not the bit or
# sub-byte types, which hold no label per element.
INTEGER_LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                        torch.int64, torch.uint16, torch.uint32, torch.uint64)


def check_dense(name, t):
    """A dense (strided) tensor: sparse, nested and mkldnn tensors are refused by name."""
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")


def check_logits(logits, name="logits"):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(logits).__name__}")
    check_dense(name, logits)
    if not logits.is_floating_point() or logits.dtype == torch.float4_e2m1fn_x2:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim (the class dim), got a 0-dim tensor")


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")


def check_on_device(name, t, anchor_name, anchor):
    if t.device != anchor.device:
        raise ValueError(f"{name} is on {t.device} but {anchor_name} is on {anchor.device}; put "
                         "all inputs on the same device")


def check_like(name, t, anchor_name, anchor):
    """A tensor argument of the anchor's dtype, on its device (the fused heads' operands)."""
    check_tensor(name, t)
    if t.dtype != anchor.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {anchor_name} has dtype {anchor.dtype}")
    check_on_device(name, t, anchor_name, anchor)


def _check_loss_inputs(logits, reduction, name, targets):
    """The checks both losses share: logits, reduction, and that ``targets`` is a dense
    tensor."""
    check_logits(logits)
    check_reduction(reduction)
    check_tensor(name, targets)
    check_dense(name, targets)


def _check_same_device(name, targets, logits):
    if targets.device != logits.device:
        raise ValueError(f"{name} are on {targets.device} but logits are on {logits.device}; "
                         "put both on the same device")


def check_zlpr_inputs(logits, labels, reduction):
    _check_loss_inputs(logits, reduction, "labels", labels)
    floating = labels.is_floating_point() and labels.dtype != torch.float4_e2m1fn_x2
    if not floating and labels.dtype not in INTEGER_LABEL_DTYPES:
        raise TypeError(f"labels must be bool, integer or floating point, got {labels.dtype}")
    if labels.shape != logits.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    _check_same_device("labels", labels, logits)


def check_ignore_index(ignore_index):
    """ignore_index is any int64 (compared with the ids as int64)."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction):
    _check_loss_inputs(logits, reduction, "positives", positives)
    if positives.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positives must be an int32 or int64 tensor of class indices, got "
                        f"{positives.dtype}")
    check_ignore_index(ignore_index)
    if positives.dim() != logits.dim() or positives.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"positives shape {tuple(positives.shape)} must be logits.shape[:-1] + (P,) = "
            f"{tuple(logits.shape[:-1])} + (P,)"
        )
    _check_same_device("positives", positives, logits)


def check_positives_in_range(positives, ignore_index, num_classes):
    """Every index that is not ignore_index must lie in [0, num_classes). Syncs on CUDA. Under
    a torch.func transform (vmap: no branching on values) the scatter's own bounds check
    stands in."""
    if torch._C._are_functorch_transforms_active():
        return
    positives = positives.long()  # as in positives_to_dense
    bad = (positives != ignore_index) & ((positives < 0) | (positives >= num_classes))
    if bool(bad.any()):
        value = positives[bad][0].item()
        raise IndexError(
            f"positives holds class index {value}, out of range for {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index} for padding)"
        )


def in_dtype(loss, dtype):
    """loss (computed in fp32+) in the logits' dtype; no call where it is that already (a
    Tensor.to call costs a step tens of microseconds on a cold CPU)."""
    return loss if loss.dtype == dtype else loss.to(dtype)


def reduce_loss(row_loss, reduction, dtype):
    """Reduce per-row losses (computed in fp32+) and return them in the logits' dtype."""
    if reduction == "sum":
        row_loss = row_loss.sum()
    elif reduction == "mean":
        row_loss = row_loss.mean()
    return in_dtype(row_loss, dtype)


def log_one_plus_sum_exp(x, log_w, keep):
    """``log(1 + sum_j w_j e^{x_j})`` over the last dim, for the terms where ``keep`` is set.

    Stable for any terms: the largest finite kept ``x`` (at least the 0 of the "1 +") is
    factored out before the weights enter, as ``(x - top) + log w``, so huge or tied logits keep
    their weights; ``top`` is held constant (the value does not depend on it), so autograd's
    gradient ``w e^{x - top} / sum`` is exact (``logsumexp``'s backward, ``exp(term - result)``,
    rounds ties away). A +inf term makes the sum +inf (gradient 0 at the finite terms, NaN at
    the infinite ones); a NaN term makes it NaN (gradient NaN at every kept term).
    """
    finite = torch.where(keep & torch.isfinite(x), x, 0)
    top = torch.cat([x.new_zeros((*x.shape[:-1], 1)), finite], -1).amax(-1, keepdim=True).detach()
    terms = torch.where(keep, (x - top) + log_w, -torch.inf)
    total = torch.exp(-top) + torch.exp(terms).sum(-1, keepdim=True)
    return (top + torch.log(total)).squeeze(-1)


def zlpr_row_loss(logits, labels):
    """Per-row loss in fp32/fp64, shape ``logits.shape[:-1]``. Labels are constants."""
    acc = opmath_dtype(logits.dtype)
    s = logits.to(acc)
    t = labels.detach().to(acc)
    masked = torch.isneginf(s)
    # A class is left out of a sum when its logit is masked or its label leaves it out
    # (t >= 1: no negative weight, t <= 0: no positive weight); a NaN label stays in both.
    negatives = ~(masked | (t >= 1))
    positives = ~(masked | (t <= 0))
    return (log_one_plus_sum_exp(s, torch.log1p(-t), negatives)
            + log_one_plus_sum_exp(-s, torch.log(t), positives))


def check_grad_filter(grad_filter, prefix=""):
    """grad_filter as a float: a finite number >= 0 (0: no filter), else ValueError."""
    value = None
    # Any real number (numpy's scalars too), not a bool; an int too large for a float is inf.
    if isinstance(grad_filter, numbers.Real) and not isinstance(grad_filter, bool):
        try:
            value = float(grad_filter)
        except OverflowError:
            value = float("inf")
    if value is None or not (0 <= value < float("inf")):
        raise ValueError(f"{prefix}grad_filter must be a finite number >= 0 (0: no filter), got "
                         f"{grad_filter!r}")
    return value + 0.0  # -0.0 is 0.0


def filter_negative_grads(logits, labels, grad_filter):
    """``logits`` with the gradient-filtered negatives cut from autograd (same values).

    A negative (a class in the negative sum only) whose own gradient ``e^{s_j} / (1 + sum_neg
    e^s)`` (of its row's loss, before any reduction's scale or upstream gradient) is below
    ``grad_filter`` gets no gradient; positives never lose theirs. 0: ``logits`` itself.
    """
    if grad_filter == 0:
        return logits
    with torch.no_grad():
        acc = opmath_dtype(logits.dtype)
        s, t = logits.detach().to(acc), labels.detach().to(acc)
        masked = torch.isneginf(s)
        in_negative = ~(masked | (t >= 1))
        negative_only = in_negative & (masked | (t <= 0))
        finite = torch.where(in_negative & torch.isfinite(s), s, 0)
        top = torch.cat([s.new_zeros((*s.shape[:-1], 1)), finite], -1).amax(-1, keepdim=True)
        terms = torch.where(in_negative, torch.exp(s - top) * (1 - t), 0)
        inv_total = 1 / (torch.exp(-top) + terms.sum(-1, keepdim=True))
        drop = negative_only & (terms * inv_total < grad_filter)
    return torch.where(drop, logits.detach(), logits)


def zlpr_loss(logits, labels, *, reduction="mean"):
    """ZLPR loss with dense hard (bool/int/0-1 float) or soft (float in [0, 1]) labels."""
    check_zlpr_inputs(logits, labels, reduction)
    return reduce_loss(zlpr_row_loss(logits, labels), reduction, logits.dtype)


def positives_to_dense(positives, ignore_index, num_classes):
    """Bool labels [..., C] from class indices [..., P]; duplicates count once."""
    index = positives.long()  # int64 before comparing: an int32 comparison would wrap ignore_index
    # Padding goes to an extra column that is then dropped.
    index = torch.where(index == ignore_index, num_classes, index)
    dense = torch.zeros((*positives.shape[:-1], num_classes + 1), dtype=torch.bool,
                        device=positives.device)
    # Out of place: under vmap the zeros are not batched but the indices are.
    return dense.scatter(-1, index, True)[..., :num_classes]


def sparse_zlpr_loss(logits, positives, *, ignore_index=-1, reduction="mean", grad_filter=0.0):
    """ZLPR loss with labels given as positive class indices per row, padded by ignore_index.

    The negative sum runs over the classes that are not positive (exact, no subtraction).
    ``grad_filter``: see ``filter_negative_grads`` (the loss is unchanged).
    """
    check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction)
    grad_filter = check_grad_filter(grad_filter)
    num_classes = logits.shape[-1]
    check_positives_in_range(positives, ignore_index, num_classes)
    labels = positives_to_dense(positives, ignore_index, num_classes)
    logits = filter_negative_grads(logits, labels, grad_filter)
    return reduce_loss(zlpr_row_loss(logits, labels), reduction, logits.dtype)
