"""The DGCNN modules: DilatedGatedConv1d (one block) and DGCNN (a stack of them)."""

import math
import operator

import torch
from torch import nn

from kxops._checks import check_dilation, check_drop_gate
from kxops.gated_conv import dilated_gated_conv1d

__all__ = ["DGCNN", "DilatedGatedConv1d"]


def _init_like_conv1d(weight, bias):
    """nn.Conv1d.reset_parameters: kaiming_uniform(a=sqrt(5)) and U(-1/sqrt(fan_in), ...)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class DilatedGatedConv1d(nn.Module):
    """One DGCNN block on ``[batch, time, channels]`` activations (see
    ``kxops.dilated_gated_conv1d``).

    Parameters use the ``nn.Conv1d(in, 2*out, kernel_size)`` layout: ``weight`` ``[2*out, in,
    k]`` (value half first, gate half second) and ``bias`` ``[2*out]``. When ``residual`` and
    ``out != in``, a 1x1 projection ``residual_weight`` ``[out, in, 1]`` (+ ``residual_bias``)
    maps ``x`` to the residual path.
    """

    def __init__(self, in_channels, out_channels=None, kernel_size=3, dilation=1,
                 drop_gate=0.0, residual=True, bias=True, *, device=None, dtype=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        # Python ints from here on (NumPy integers accepted), so the shapes are plain ints.
        in_channels, out_channels, kernel_size = (
            operator.index(v) for v in (in_channels, out_channels, kernel_size))
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"kxops.gated_conv: channels must be >= 1, got in={in_channels}, "
                             f"out={out_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kxops.gated_conv: kernel_size must be odd for a 'same' convolution, "
                             f"got {kernel_size}")
        dilation, drop_gate = check_dilation(dilation), check_drop_gate(drop_gate)
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.drop_gate, self.residual = drop_gate, residual
        self.weight = nn.Parameter(torch.empty(2 * out_channels, in_channels, kernel_size,
                                               **factory))
        self.bias = nn.Parameter(torch.empty(2 * out_channels, **factory)) if bias else None
        if residual and out_channels != in_channels:
            self.residual_weight = nn.Parameter(torch.empty(out_channels, in_channels, 1,
                                                            **factory))
            self.residual_bias = (nn.Parameter(torch.empty(out_channels, **factory)) if bias
                                  else None)
        else:
            self.residual_weight = self.residual_bias = None
        self.reset_parameters()

    def reset_parameters(self):
        _init_like_conv1d(self.weight, self.bias)
        if self.residual_weight is not None:
            _init_like_conv1d(self.residual_weight, self.residual_bias)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, *, drop_gate=0.0, residual=True, residual_conv=None):
        """Build a block from an ``nn.Conv1d(in, 2*out, k, dilation=d, padding='same')``
        (value channels first), and the 1x1 ``residual_conv`` when ``out != in``."""
        pad = conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
        if (conv.groups != 1 or conv.stride != (1,) or conv.padding_mode != "zeros"
                or conv.padding not in ("same", (pad,))):
            raise ValueError("from_conv1d needs a stride-1, groups-1 conv with zero 'same' "
                             f"padding, got {conv}")
        out_channels = conv.out_channels // 2
        block = cls(conv.in_channels, out_channels, conv.kernel_size[0], conv.dilation[0],
                    drop_gate, residual, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None:
                block.bias.copy_(conv.bias)
            if block.residual_weight is None:
                if residual_conv is not None:
                    raise ValueError("residual_conv is given but the block has no projection "
                                     f"(out_channels == in_channels or residual=False): {block}")
            else:
                check_residual_conv(residual_conv, block)
                block.residual_weight.copy_(residual_conv.weight)
                if block.residual_bias is not None:
                    block.residual_bias.copy_(residual_conv.bias)
        return block

    def forward(self, x, mask=None):
        return dilated_gated_conv1d(
            x, self.weight, self.bias, mask, dilation=self.dilation, drop_gate=self.drop_gate,
            training=self.training, residual=self.residual,
            residual_weight=self.residual_weight, residual_bias=self.residual_bias)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, drop_gate={self.drop_gate}, "
                f"residual={self.residual}, bias={self.bias is not None}")


def check_residual_conv(residual_conv, block):
    """The 1x1 projection that from_conv1d copies: its shape, and a bias exactly when the
    block has one (the block's residual bias follows the conv's bias)."""
    if residual_conv is None:
        raise ValueError(f"out_channels={block.out_channels} != in_channels="
                         f"{block.in_channels}: pass residual_conv (1x1 nn.Conv1d)")
    want = (block.out_channels, block.in_channels, 1)
    if tuple(residual_conv.weight.shape) != want:
        raise ValueError(f"residual_conv must be nn.Conv1d({block.in_channels}, "
                         f"{block.out_channels}, 1), got weight shape "
                         f"{tuple(residual_conv.weight.shape)}")
    if (residual_conv.bias is None) != (block.residual_bias is None):
        raise ValueError("residual_conv must have a bias exactly when the conv has one "
                         f"(conv bias: {block.residual_bias is not None}, residual_conv bias: "
                         f"{residual_conv.bias is not None})")


class DGCNN(nn.Module):
    """A stack of residual DilatedGatedConv1d blocks of width ``dim``, one per dilation."""

    def __init__(self, dim, dilations=(1, 2, 5, 1, 2, 5, 1, 2, 5, 1, 1, 1), kernel_size=3,
                 drop_gate=0.1, *, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            DilatedGatedConv1d(dim, dim, kernel_size, d, drop_gate, device=device, dtype=dtype)
            for d in dilations)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x
