"""The ZLPR losses as modules: ZLPRLoss and SparseZLPRLoss."""

from torch import nn

from kxops.zlpr import sparse_zlpr_loss, zlpr_loss

__all__ = ["SparseZLPRLoss", "ZLPRLoss"]


class ZLPRLoss(nn.Module):
    """``kxops.zlpr_loss`` as a module: ``forward(logits, labels)``."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, labels):
        return zlpr_loss(logits, labels, reduction=self.reduction)


class SparseZLPRLoss(nn.Module):
    """``kxops.sparse_zlpr_loss`` as a module: ``forward(logits, positives)``."""

    def __init__(self, ignore_index=-1, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, positives):
        return sparse_zlpr_loss(logits, positives, ignore_index=self.ignore_index,
                                reduction=self.reduction)
