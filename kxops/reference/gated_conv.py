"""The dilated gated convolution block of DGCNN in pure PyTorch: the ground truth.

Activations are ``[batch, time, channels]``; weights use the ``nn.Conv1d(in, 2*out, k)`` layout::

    m = mask[..., None];  z = conv1d_same(x * m, weight, bias, dilation);  h, g = z.split(out)
    g = dropout(g) when training;  s = sigmoid(g);  r = x or the 1x1 projection of x
    y = (r * (1 - s) + h * s) * m   (residual)      y = h * s * m   (residual=False)

A tap that lies wholly outside the sequence (``|j - k//2| * dilation >= T``) reads padding
only and is not applied (its weight gets a zero gradient), so any dilation, however large, costs
no more than one that reaches past both ends.

The input checks here are the contract that the compiled ops share: they check the same in the
same words (csrc/gated_conv_host.h), after the op's name.
"""

import numbers
import operator

import torch
import torch.nn.functional as F

_INT64_MAX = 2**63 - 1
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _shape(t):
    return tuple(t.shape)


def check_dilation(dilation):
    """The dilation as a Python int (NumPy and other integer types accepted)."""
    try:
        value = None if isinstance(dilation, bool) else operator.index(dilation)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if value > _INT64_MAX:
        raise ValueError(f"dilation must be at most 2**63 - 1, got {dilation!r} (any dilation "
                         "of at least the sequence length gives the same result)")
    return value


def check_drop_gate(drop_gate):
    """The gate dropout probability as a float in [0, 1]."""
    if isinstance(drop_gate, bool) or not isinstance(drop_gate, numbers.Real):
        raise TypeError(f"drop_gate must be a real number, got {type(drop_gate).__name__}")
    if not 0.0 <= float(drop_gate) <= 1.0:  # NaN fails too
        raise ValueError(f"drop_gate must be in [0, 1], got {drop_gate!r}")
    return float(drop_gate)


def check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                            residual_weight, residual_bias):
    """Validate the arguments of dilated_gated_conv1d; return (out_channels, dilation as an
    int, drop_gate as a float)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError("x must be a floating-point tensor (float64, float32, float16 or "
                        f"bfloat16), got dtype {x.dtype}")
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
    dilation = check_dilation(dilation)
    drop_gate = check_drop_gate(drop_gate)
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
    if residual_weight is not None and not residual:
        raise ValueError("residual_weight is given but residual=False: the projection belongs "
                         "to the residual branch (drop it, or set residual=True)")
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
    return out_channels, dilation, drop_gate


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
    batch, time, in_channels = x.shape
    out_channels = weight.shape[0] // 2
    m = None if mask is None else mask.to(x.dtype).unsqueeze(-1)
    xm = x if m is None else x * m
    half = weight.shape[-1] // 2
    reach = min(half, (time - 1) // dilation) if time else 0  # taps that can reach a real step
    weight = weight[..., half - reach:half + reach + 1]
    pad = reach * dilation
    if in_channels == 0:
        # conv1d returns a wrong shape without input channels; z is the bias alone (the empty
        # weight is summed in so that it still gets its, empty, gradient).
        z = x.new_zeros(batch, time, 2 * out_channels) + weight.sum((1, 2))
        z = z if bias is None else z + bias
    else:
        # An empty sequence gets one spare zero step (conv1d refuses an input shorter than its
        # kernel), whose output column is dropped. Only there: its 0 * weight products would
        # make a gradient NaN where the true one is infinite.
        padded = F.pad(xm.transpose(1, 2), (pad, pad + (time == 0)))
        z = F.conv1d(padded, weight, bias, dilation=dilation)[..., :time].transpose(1, 2)
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
    out_channels, dilation, drop_gate = check_gated_conv_inputs(
        x, weight, bias, mask, dilation, drop_gate, residual, residual_weight, residual_bias)
    keep = gate_keep_mask(x, out_channels, drop_gate) if training and drop_gate > 0 else None
    return gated_conv_from_keep(x, weight, bias, mask, keep, residual_weight, residual_bias,
                                dilation, drop_gate, residual)
