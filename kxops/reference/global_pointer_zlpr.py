"""GlobalPointer span grid + sparse ZLPR, materialised: the ground truth of
``kxops.global_pointer_zlpr_loss``.

For each (batch, head), the score of span ``(i, j)`` is ``s_ij = q_i . k_j + start_i + end_j``;
the ZLPR row is the whole flattened ``L x L`` grid and positive ``i*L + j`` indexes it. Spans with
``i`` or ``j`` at a padded step (``mask == 0``), and ``i > j`` when ``tril``, are masked out of
both sums (``-inf`` logits), so a positive there is ignored. Padded steps take no part at all:
their values (even NaN) reach neither the loss nor a gradient, which is zero there.
"""

import torch

from kxops import _checks
from kxops.reference import zlpr


def span_keep(mask, length, tril, device):
    """bool [batch or 1, 1, L, L]: the spans that are scored (both ends kept, i <= j if tril)."""
    keep = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    if mask is not None:
        step = mask != 0
        keep = step[:, None, :, None] & step[:, None, None, :]
    if tril:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=device).triu()
    return keep


def global_pointer_logits(q, k, mask=None, *, start_bias=None, end_bias=None, tril=True):
    """The materialised grid ``[B, heads, L, L]``, ``-inf`` at masked spans."""
    if mask is not None:
        # Padded steps are zeroed before the product, so that their values never reach a sum
        # or a gradient (0 * NaN would).
        step = (mask != 0)[:, None, :]
        q = torch.where(step[..., None], q, 0)
        k = torch.where(step[..., None], k, 0)
        start_bias = None if start_bias is None else torch.where(step, start_bias, 0)
        end_bias = None if end_bias is None else torch.where(step, end_bias, 0)
    logits = q @ k.transpose(-1, -2)
    if start_bias is not None:
        logits = logits + start_bias[..., :, None]
    if end_bias is not None:
        logits = logits + end_bias[..., None, :]
    keep = span_keep(mask, q.shape[2], tril, q.device)
    return logits.masked_fill(~keep, -torch.inf)


def global_pointer_zlpr_loss(q, k, positives, mask=None, *, start_bias=None, end_bias=None,
                             tril=True, ignore_index=-1, reduction="mean", grad_filter=0.0):
    """Sparse ZLPR over each (batch, head)'s span grid; ``none`` keeps ``[B, heads]``;
    ``grad_filter`` as ``zlpr.filter_negative_grads``."""
    _checks.check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril,
                                        ignore_index, reduction)
    length = q.shape[2]
    _checks.check_positives_in_range("global_pointer_zlpr", positives, ignore_index,
                                     length * length)
    logits = global_pointer_logits(q, k, mask, start_bias=start_bias, end_bias=end_bias,
                                   tril=tril)
    return zlpr.sparse_zlpr_loss(logits.flatten(-2), positives, ignore_index=ignore_index,
                                 reduction=reduction, grad_filter=grad_filter)
