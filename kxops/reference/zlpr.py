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


import torch

from kxops import _checks


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    _checks.check_zlpr_inputs(logits, labels, reduction)
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
    _checks.check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction)
    grad_filter = _checks.check_grad_filter("sparse_zlpr", grad_filter)
    num_classes = logits.shape[-1]
    _checks.check_positives_in_range("sparse_zlpr", positives, ignore_index, num_classes)
    labels = positives_to_dense(positives, ignore_index, num_classes)
    logits = filter_negative_grads(logits, labels, grad_filter)
    return reduce_loss(zlpr_row_loss(logits, labels), reduction, logits.dtype)
