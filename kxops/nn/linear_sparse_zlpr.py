"""LinearZLPR: a linear multi-label head trained with the fused linear + sparse ZLPR loss."""

import torch
from torch import nn

from kxops._checks import check_grad_filter
from kxops.linear_sparse_zlpr import block_rows_for, linear_sparse_zlpr_loss

__all__ = ["LinearZLPR"]


class LinearZLPR(nn.Module):
    """A linear classification head over ``num_labels`` labels trained with the sparse ZLPR
    loss without its ``[N, num_labels]`` logits (``kxops.linear_sparse_zlpr_loss``): for
    extreme multi-label heads (hundreds of thousands of labels).

    ``weight`` ``[num_labels, in_features]`` and ``bias`` ``[num_labels]`` have ``nn.Linear``'s
    names, layout and initialisation (a trained ``nn.Linear``'s state dict loads as is).
    How the loss is taken is fixed at construction, as in torch's loss modules:
    ``ignore_index``, ``reduction``, ``process_group`` (label parallel: this module holds its
    rank's contiguous slice of the labels, in rank order, and ``num_labels`` is the slice's
    size; see ``linear_sparse_zlpr_loss``), ``block_rows`` (rows of logits per block; None:
    chosen from the sizes) and ``grad_filter`` (0: exact; ``2**-12`` recommended: skip the
    negligible negatives' gradients, see ``linear_sparse_zlpr_loss``).

    ``forward(input, positives)`` is the loss; ``logits(input)`` the full ``[..., num_labels]``
    scores (materialised); ``predict`` the top-k labels or the labels above a threshold, one
    block of rows at a time. ``logits`` and ``predict`` see this module's own labels (its
    slice under label parallel, numbered from 0).
    """

    def __init__(self, in_features, num_labels, bias=True, *, ignore_index=-1,
                 reduction="mean", process_group=None, block_rows=None, grad_filter=0.0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.num_labels = num_labels
        # The loss's options, kept as torch's loss modules keep theirs.
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.process_group = process_group
        self.block_rows = block_rows
        self.grad_filter = check_grad_filter("linear_sparse_zlpr", grad_filter)
        self.weight = nn.Parameter(torch.empty(num_labels, in_features, device=device,
                                               dtype=dtype))
        self.register_parameter("bias", nn.Parameter(torch.empty(
            num_labels, device=device, dtype=dtype)) if bias else None)
        self.reset_parameters()

    reset_parameters = nn.Linear.reset_parameters

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A head that shares ``linear``'s weight and bias (the same Parameter objects: training
        either trains both). ``kwargs``: the constructor's keywords but device and dtype."""
        head = cls(linear.in_features, linear.out_features, linear.bias is not None,
                   device="meta", **kwargs)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_labels={self.num_labels}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}"
                + (f", grad_filter={self.grad_filter}" if self.grad_filter else ""))

    def forward(self, input, positives):
        return linear_sparse_zlpr_loss(input, self.weight, positives, self.bias,
                                       ignore_index=self.ignore_index, reduction=self.reduction,
                                       process_group=self.process_group,
                                       block_rows=self.block_rows, grad_filter=self.grad_filter)

    def logits(self, input):
        """``input @ weight.T + bias``: ``[..., num_labels]``, materialised."""
        return nn.functional.linear(input, self.weight, self.bias)

    @torch.no_grad()
    def predict(self, input, k=None, threshold=0.0):
        """Top-``k`` ``(scores, indices)`` per row (each ``[..., k]``) when ``k`` is given, as
        ``logits(input).topk(k)``; otherwise the ``(row..., label)`` index pairs whose score is
        above ``threshold``, ``[M, input.dim()]``, as ``(logits(input) > threshold).nonzero()``.
        The logits exist one block of rows at a time (the loss's block size); a block's GEMM
        may round differently from one over all rows (BLAS picks its kernel by shape), so a
        score can differ from ``logits(input)``'s in its last bit."""
        where = "kxops.linear_sparse_zlpr: predict:"
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{where} input must be a Tensor, got {type(input).__name__}")
        if input.dim() < 1:
            raise ValueError(f"{where} input must be a tensor [..., in_features]")
        if input.shape[-1] != self.in_features:
            raise ValueError(f"{where} input must have {self.in_features} features, got "
                             f"{input.shape[-1]}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise TypeError(f"{where} k must be an int in [0, {self.num_labels}], got {k!r}")
        if k is not None and not 0 <= k <= self.num_labels:
            raise ValueError(f"{where} k must be an int in [0, {self.num_labels}], got {k!r}")
        lead = input.shape[:-1]
        rows = input.reshape(-1, self.in_features)
        step = self.block_rows or block_rows_for(rows.shape[0], self.weight)
        # Zero rows still make one (empty) block: the scores' dtype is the logits' (autocast).
        starts = range(0, max(rows.shape[0], 1), step)
        if k is not None:
            tops = [self.logits(rows[start:start + step]).topk(k, dim=-1) for start in starts]
            scores = torch.cat([top.values for top in tops])
            indices = torch.cat([top.indices for top in tops])
            return scores.view(*lead, k), indices.view(*lead, k)
        pairs = []
        for start in starts:
            found = (self.logits(rows[start:start + step]) > threshold).nonzero()
            found[:, 0] += start
            pairs.append(found)
        pairs = torch.cat(pairs)
        row_index = torch.unravel_index(pairs[:, 0], lead) if lead else ()
        return torch.stack([*row_index, pairs[:, 1]], -1)
