"""kxops: fused, exact PyTorch kernels for DGCNN's dilated gated convolution, the ZLPR
multi-label loss and the AdaX / AdaX-W optimizer.

Every op has a pure-PyTorch reference in ``kxops.reference``, used wherever no compiled kernel
exists for the tensors' device (or everywhere with ``KXOPS_DISABLE_EXT=1``).
"""

from kxops import nn, optim, reference
from kxops._info import info
from kxops._version import __version__
from kxops.gated_conv import dilated_gated_conv1d
from kxops.global_pointer_zlpr import global_pointer_zlpr_loss
from kxops.linear_sparse_zlpr import linear_sparse_zlpr_loss
from kxops.zlpr import sparse_zlpr_loss, zlpr_loss

__all__ = ["__version__", "dilated_gated_conv1d", "global_pointer_zlpr_loss", "info",
           "linear_sparse_zlpr_loss", "nn", "optim", "reference", "sparse_zlpr_loss", "zlpr_loss"]
