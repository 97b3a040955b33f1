"""The linear + sparse ZLPR head in pure PyTorch, materialised: the ground truth.

``linear_sparse_zlpr_loss(input, weight, positives, bias)`` is
``sparse_zlpr_loss(F.linear(input, weight, bias), positives)``. The two slice functions are the
label-parallel split of the same loss (each process holds the classes
``[class_offset, class_offset + C)`` of ``num_classes``), used where no compiled kernel exists.
"""

import torch

from kxops import _checks
from kxops.reference import zlpr


def linear_sparse_zlpr_loss(input, weight, positives, bias=None, *, ignore_index=-1,
                            reduction="mean", grad_filter=0.0):
    """``sparse_zlpr_loss(F.linear(input, weight, bias), positives)``, the full logits held;
    ``grad_filter`` as ``zlpr.filter_negative_grads``."""
    _checks.check_linear_inputs(input, weight, bias, positives, ignore_index, reduction)
    grad_filter = _checks.check_grad_filter("linear_sparse_zlpr", grad_filter)
    logits = torch.nn.functional.linear(input, weight, bias)
    return zlpr.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index,
                                 reduction=reduction, grad_filter=grad_filter)


def _slice(logits, positives, ignore_index, class_offset, num_classes):
    """(logits in fp32/fp64, bool [..., C] of the slice's positives)."""
    _checks.check_positives_in_range("linear_sparse_zlpr", positives, ignore_index, num_classes)
    classes = logits.shape[-1]
    local = positives.long() - class_offset
    mine = (positives.long() != ignore_index) & (local >= 0) & (local < classes)
    dense = zlpr.positives_to_dense(torch.where(mine, local, classes), classes, classes)
    return logits.to(zlpr.opmath_dtype(logits.dtype)), dense


def slice_partials(input, weight, bias, positives, ignore_index, class_offset, num_classes):
    """[..., 2]: per row, ``log sum e^{s_j}`` over the slice's negatives and ``log sum
    e^{-s_j}`` over its positives (-inf for an empty sum; -inf logits left out)."""
    s, pos = _slice(torch.nn.functional.linear(input, weight, bias), positives, ignore_index,
                    class_offset, num_classes)
    kept = ~torch.isneginf(s)
    neg = torch.where(pos | ~kept, -torch.inf, s).logsumexp(-1)
    pos = torch.where(pos & kept, -s, -torch.inf).logsumexp(-1)
    return torch.stack([neg, pos], -1)


def slice_partials_backward(grad_loss, log_z, input, weight, bias, positives, ignore_index,
                            class_offset, num_classes, grad_filter=0.0):
    """Gradients (input's share, weight, bias) of ``sum(grad_loss * row_loss)`` given ``log_z``
    = log(1 + each merged sum): ``e^{s - log Z_neg}`` at a negative, ``-e^{-s - log Z_pos}`` at
    a positive, 0 at a -inf logit; a negative's below ``grad_filter`` is 0."""
    logits = torch.nn.functional.linear(input, weight, bias)
    s, pos = _slice(logits, positives, ignore_index, class_offset, num_classes)
    z = log_z.unsqueeze(-2)
    negative = torch.exp(s - z[..., 0])
    negative = torch.where(negative < grad_filter, 0, negative)
    g = torch.where(pos, -torch.exp(-s - z[..., 1]), negative)
    g = torch.where(torch.isneginf(s), 0, g) * grad_loss.unsqueeze(-1).to(s.dtype)
    g = g.to(logits.dtype)
    rows = g.reshape(-1, g.shape[-1])
    grad_weight = rows.T @ input.reshape(-1, input.shape[-1])
    grad_bias = rows.sum(0, dtype=s.dtype).to(logits.dtype) if bias is not None else None
    return g @ weight, grad_weight, grad_bias
