"""The dilated gated convolution block of DGCNN in pure PyTorch: the ground truth.

Activations are ``[batch, time, channels]``; weights use the ``nn.Conv1d(in, 2*out, k)`` layout::

    m = mask[..., None];  z = conv1d_same(x * m, weight, bias, dilation);  h, g = z.split(out)
    g = dropout(g) when training;  s = sigmoid(g);  r = x or the 1x1 projection of x
    y = (r * (1 - s) + h * s) * m   (residual)      y = h * s * m   (residual=False)

The input checks here are the contract that the compiled ops share.
"""

import torch
import torch.nn.functional as F


def _shape(t):
    return tuple(t.shape)


def check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                            residual_weight, residual_bias):
    """Validate the arguments of dilated_gated_conv1d; return out_channels."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, time, channels], got shape {_shape(x)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must be [2*out_channels, in_channels, kernel_size] (the "
                         f"nn.Conv1d layout), got shape {_shape(weight)}")
    two_out, in_channels, kernel_size = weight.shape
    if in_channels != x.shape[-1]:
        raise ValueError(f"channel mismatch: x has {x.shape[-1]} channels but weight expects "
                         f"{in_channels} (weight shape {_shape(weight)})")
    if two_out == 0 or two_out % 2:
        raise ValueError(f"weight.shape[0] must be 2*out_channels (value and gate halves), got "
                         f"{two_out}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd for a 'same' convolution, got {kernel_size}")
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if not 0.0 <= float(drop_gate) <= 1.0:
        raise ValueError(f"drop_gate must be in [0, 1], got {drop_gate!r}")
    out_channels = two_out // 2
    tensors = {"weight": weight, "bias": bias, "mask": mask, "residual_weight": residual_weight,
               "residual_bias": residual_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put all inputs "
                             "on the same device")
        if name != "mask" and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must "
                            "match")
    if bias is not None and _shape(bias) != (two_out,):
        raise ValueError(f"bias must have shape ({two_out},), got {_shape(bias)}")
    if mask is not None:
        if _shape(mask) != _shape(x)[:2]:
            raise ValueError(f"mask must be [batch, time] = {_shape(x)[:2]}, got {_shape(mask)}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool or real, got {mask.dtype}")
    if residual_weight is None:
        if residual_bias is not None:
            raise ValueError("residual_bias needs residual_weight (the 1x1 projection)")
        if residual and out_channels != in_channels:
            raise ValueError(
                f"residual=True with out_channels={out_channels} != in_channels={in_channels} "
                "needs residual_weight [out_channels, in_channels, 1] (a 1x1 projection of x)")
    else:
        if _shape(residual_weight) != (out_channels, in_channels, 1):
            raise ValueError(f"residual_weight must have shape ({out_channels}, {in_channels}, "
                             f"1), got {_shape(residual_weight)}")
        if residual_bias is not None and _shape(residual_bias) != (out_channels,):
            raise ValueError(f"residual_bias must have shape ({out_channels},), got "
                             f"{_shape(residual_bias)}")
    return out_channels


def gate_keep_mask(x, out_channels, drop_gate):
    """The gate-dropout keep mask, bool [B, T, out], drawn from PyTorch's generator.

    The compiled path draws it through this same function, so both see the same mask under
    the same seed (and on CUDA it is torch's own graph-safe Philox draw).
    """
    shape = (x.shape[0], x.shape[1], out_channels)
    return torch.rand(shape, device=x.device) >= drop_gate


def gated_conv_from_keep(x, weight, bias, mask, gate_keep, residual_weight, residual_bias,
                         dilation, drop_gate, residual):
    """The block with an explicit keep mask (None: no gate dropout)."""
    out_channels = weight.shape[0] // 2
    m = None if mask is None else mask.to(x.dtype).unsqueeze(-1)
    xm = x if m is None else x * m
    pad = dilation * (weight.shape[-1] - 1) // 2
    # One spare zero step on the right keeps an empty sequence valid (conv1d refuses an input
    # shorter than its kernel); its output column is dropped.
    padded = F.pad(xm.transpose(1, 2), (pad, pad + 1))
    z = F.conv1d(padded, weight, bias, dilation=dilation)[..., :x.shape[1]].transpose(1, 2)
    h, g = z.split(out_channels, dim=-1)
    if gate_keep is not None:
        scale = 0.0 if drop_gate >= 1.0 else 1.0 / (1.0 - drop_gate)
        g = g * gate_keep.to(g.dtype) * scale
    s = torch.sigmoid(g)
    if residual:
        r = x if residual_weight is None else F.linear(x, residual_weight[..., 0], residual_bias)
        y = r * (1 - s) + h * s
    else:
        y = h * s
    return y if m is None else y * m


def dilated_gated_conv1d(x, weight, bias=None, mask=None, *, dilation=1, drop_gate=0.0,
                         training=False, residual=True, residual_weight=None, residual_bias=None):
    """One DGCNN block on ``x`` [B, T, C_in]; returns [B, T, C_out]."""
    out_channels = check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                                           residual_weight, residual_bias)
    keep = gate_keep_mask(x, out_channels, drop_gate) if training and drop_gate > 0 else None
    return gated_conv_from_keep(x, weight, bias, mask, keep, residual_weight, residual_bias,
                                dilation, drop_gate, residual)
