"""GlobalPointer span grid + sparse ZLPR, materialised: the ground truth of
``kxops.global_pointer_zlpr_loss``.

For each (batch, head), the score of span ``(i, j)`` is ``s_ij = q_i . k_j + start_i + end_j``;
the ZLPR row is the whole flattened ``L x L`` grid and positive ``i*L + j`` indexes it. Spans with
``i`` or ``j`` at a padded step (``mask == 0``), and ``i > j`` when ``tril``, are masked out of
both sums (``-inf`` logits), so a positive there is ignored. Padded steps take no part at all:
their values (even NaN) reach neither the loss nor a gradient, which is zero there.
"""

import torch

from kxops.reference import zlpr


def check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril,
                                ignore_index, reduction):
    """The contract the compiled op shares: types (TypeError), shapes and values (ValueError)."""
    for name, t in (("q", q), ("k", k), ("positives", positives), ("mask", mask),
                    ("start_bias", start_bias), ("end_bias", end_bias)):
        if isinstance(t, torch.Tensor) and (t.layout != torch.strided or t.is_quantized):
            raise TypeError(f"{name} must be a dense (strided, unquantized) tensor, got "
                            f"{'a quantized tensor' if t.is_quantized else t.layout}")
    zlpr.check_logits(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, L, D], got shape {tuple(q.shape)}")
    batch, heads, length, _ = q.shape
    zlpr.check_like("k", k, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    for name, bias in (("start_bias", start_bias), ("end_bias", end_bias)):
        if bias is None:
            continue
        zlpr.check_like(name, bias, "q", q)
        if bias.shape != (batch, heads, length):
            raise ValueError(f"{name} must be [batch, heads, L] = {(batch, heads, length)}, got "
                             f"{tuple(bias.shape)}")
    zlpr.check_tensor("positives", positives)
    if positives.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positives must be an int32 or int64 tensor of span ids, got "
                        f"{positives.dtype}")
    if positives.dim() != 3 or positives.shape[:2] != (batch, heads):
        raise ValueError(f"positives must be [batch, heads, P] = {(batch, heads)} + (P,), got "
                         f"{tuple(positives.shape)}")
    if positives.device != q.device:
        raise ValueError(f"positives are on {positives.device} but q is on {q.device}; put all "
                         "inputs on the same device")
    if mask is not None:
        zlpr.check_tensor("mask", mask)
        if mask.is_complex() or mask.dtype == torch.float4_e2m1fn_x2:
            raise TypeError(f"mask must be bool, integer or floating point, got {mask.dtype}")
        if mask.shape != (batch, length):
            raise ValueError(f"mask must be [batch, L] = {(batch, length)}, got "
                             f"{tuple(mask.shape)}")
        zlpr.check_on_device("mask", mask, "q", q)
    if not isinstance(tril, bool):
        raise TypeError(f"tril must be a bool, got {type(tril).__name__}")
    if length * length >= 2**63:
        raise ValueError(f"L = {length} is too long (L * L span ids must fit in int64)")
    zlpr.check_ignore_index(ignore_index)
    zlpr.check_reduction(reduction)


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
    check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril, ignore_index,
                                reduction)
    length = q.shape[2]
    zlpr.check_positives_in_range(positives, ignore_index, length * length)
    logits = global_pointer_logits(q, k, mask, start_bias=start_bias, end_bias=end_bias,
                                   tril=tril)
    return zlpr.sparse_zlpr_loss(logits.flatten(-2), positives, ignore_index=ignore_index,
                                 reduction=reduction, grad_filter=grad_filter)
