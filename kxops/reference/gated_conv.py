"""The dilated gated convolution block of DGCNN in pure PyTorch: the ground truth.

Activations are ``[batch, time, channels]``; weights use the ``nn.Conv1d(in, 2*out, k)`` layout::

    m = mask[..., None];  z = conv1d_same(x * m, weight, bias, dilation);  h, g = z.split(out)
    g = dropout(g) when training;  s = sigmoid(g);  r = x or the 1x1 projection of x
    y = (r * (1 - s) + h * s) * m   (residual)      y = h * s * m   (residual=False)

A tap that lies wholly outside the sequence (``|j - k//2| * dilation >= T``) reads padding
only and is not applied (its weight gets a zero gradient), so any dilation, however large, costs
no more than one that reaches past both ends.

The arguments are checked by kxops/_checks.py, in the words of the compiled ops.
"""


import torch
import torch.nn.functional as F

from kxops import _checks


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
    out_channels, dilation, drop_gate = _checks.check_gated_conv_inputs(
        x, weight, bias, mask, dilation, drop_gate, residual, residual_weight, residual_bias)
    keep = gate_keep_mask(x, out_channels, drop_gate) if training and drop_gate > 0 else None
    return gated_conv_from_keep(x, weight, bias, mask, keep, residual_weight, residual_bias,
                                dilation, drop_gate, residual)
