"""Pure-PyTorch references: the ground truth in tests and the fallback where no kernel exists.

Same signatures as the public API (``kxops.reference.zlpr_loss`` mirrors ``kxops.zlpr_loss``);
the optimizer step is ``kxops.reference.adax.adax`` (functional, one tensor at a time).
"""

from kxops.reference import adax
from kxops.reference.gated_conv import dilated_gated_conv1d
from kxops.reference.global_pointer_zlpr import global_pointer_zlpr_loss
from kxops.reference.linear_sparse_zlpr import linear_sparse_zlpr_loss
from kxops.reference.zlpr import sparse_zlpr_loss, zlpr_loss

__all__ = ["adax", "dilated_gated_conv1d", "global_pointer_zlpr_loss", "linear_sparse_zlpr_loss",
           "sparse_zlpr_loss", "zlpr_loss"]
