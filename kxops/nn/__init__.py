"""Modules over the kxops ops, one module per op family: DilatedGatedConv1d and DGCNN, ZLPRLoss
and SparseZLPRLoss, LinearZLPR, GlobalPointer and EfficientGlobalPointer."""

from kxops.nn.gated_conv import DGCNN, DilatedGatedConv1d
from kxops.nn.global_pointer_zlpr import EfficientGlobalPointer, GlobalPointer
from kxops.nn.linear_sparse_zlpr import LinearZLPR
from kxops.nn.zlpr import SparseZLPRLoss, ZLPRLoss

__all__ = ["DGCNN", "DilatedGatedConv1d", "EfficientGlobalPointer", "GlobalPointer",
           "LinearZLPR", "SparseZLPRLoss", "ZLPRLoss"]
