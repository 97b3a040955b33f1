"""Dilated gated convolution: public function, fake kernels and autograd of kxops::gated_conv."""

import torch

from kxops import _checks, _ext
from kxops.reference import gated_conv as ref


def dilated_gated_conv1d(x: torch.Tensor, weight: torch.Tensor, bias=None, mask=None, *,
                         dilation: int = 1, drop_gate: float = 0.0, training: bool = False,
                         residual: bool = True, residual_weight=None, residual_bias=None):
    """One DGCNN block: ``y = (r*(1-s) + h*s) * m`` with ``[h, g] = conv1d(x*m)``, ``s = σ(g)``.

    ``x`` is ``[batch, time, in]``; ``weight`` ``[2*out, in, k]`` (``nn.Conv1d`` layout, value
    half first, k odd, 'same' padding); ``mask`` ``[batch, time]`` bool or float. The gate
    pre-activation gets dropout ``drop_gate`` when ``training``. ``r`` is ``x`` or, when
    ``residual_weight`` ``[out, in, 1]`` is given, its 1x1 projection; ``residual=False`` gives
    ``h*s*m``. Returns ``[batch, time, out]``.

    A float ``mask`` that requires grad, and ``torch.func`` transforms, run the reference (the
    compiled op differentiates neither); second-order gradients are not supported.
    """
    if (isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type)
            and x.is_floating_point() and x.dtype != torch.float64):
        # A convolution under autocast runs in the autocast dtype, as nn.Conv1d would (float64
        # is left alone, as autocast leaves it).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, residual_weight, residual_bias = (
            None if t is None else t.to(dtype)
            for t in (x, weight, bias, residual_weight, residual_bias))
    out_channels, dilation, drop_gate = _checks.check_gated_conv_inputs(
        x, weight, bias, mask, dilation, drop_gate, residual, residual_weight, residual_bias)
    keep = ref.gate_keep_mask(x, out_channels, drop_gate) if training and drop_gate > 0 else None
    args = (x, weight, bias, mask, keep, residual_weight, residual_bias, dilation, drop_gate,
            residual)
    mask_needs_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
    if (not _ext.has_kernel("gated_conv", x.device) or mask_needs_grad
            or _ext.transform_active()):
        return ref.gated_conv_from_keep(*args)
    if mask is not None:
        mask = mask.to(x.dtype)
    return torch.ops.kxops.gated_conv(x, weight, bias, mask, *args[4:])[0]


def _autocast_enabled(device_type):
    # is_autocast_enabled raises for device types without autocast (meta, ...).
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _gap(time, kernel_size, dilation):
    """The rows after each sequence in the kernels' gapped layout of z (csrc/gated_conv_host.h,
    Gapped::pad): the reach of the taps that can touch a real step."""
    reach = min(kernel_size // 2, (time - 1) // dilation) if time > 0 else 0
    return reach * dilation


def _empty_grad_unless(present, like, shape):
    return like.new_empty(shape if present else (0,))


if _ext.LOADED:

    @torch.library.register_fake("kxops::gated_conv")
    def _gated_conv_fake(x, weight, bias, mask, gate_keep, residual_weight, residual_bias,
                         dilation, drop_gate, residual):
        _checks.check_devices("gated_conv", "x", x, weight=weight, bias=bias, mask=mask,
                           gate_keep=gate_keep, residual_weight=residual_weight,
                           residual_bias=residual_bias)
        _checks.check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                                    residual_weight, residual_bias)
        batch, time, _ = x.shape
        two_out = weight.shape[0]
        z_steps = time + _gap(time, weight.shape[2], dilation)
        return x.new_empty(batch, time, two_out // 2), x.new_empty(batch, z_steps, two_out)

    @torch.library.register_fake("kxops::gated_conv_backward")
    def _gated_conv_backward_fake(grad_y, x, z, weight, mask, gate_keep, residual_weight,
                                  residual_bias, has_bias, dilation, drop_gate, residual):
        _checks.check_devices("gated_conv_backward", "x", x, grad_y=grad_y, z=z, weight=weight,
                           mask=mask, gate_keep=gate_keep, residual_weight=residual_weight,
                           residual_bias=residual_bias)
        _checks.check_gated_conv_inputs(x, weight, None, mask, dilation, drop_gate, residual,
                                    residual_weight, residual_bias)
        out_channels = weight.shape[0] // 2
        batch, time, _ = x.shape
        z_steps = time + _gap(time, weight.shape[2], dilation)
        for name, t, shape in (("grad_y", grad_y, (batch, time, out_channels)),
                               ("z", z, (batch, z_steps, 2 * out_channels))):
            if tuple(t.shape) != shape:
                raise ValueError(f"kxops gated_conv_backward: {name} must have shape {shape}, "
                                 f"got {tuple(t.shape)}")
        return (
            x.new_empty(x.shape),  # the kernels return contiguous gradients
            weight.new_empty(weight.shape),
            _empty_grad_unless(has_bias, weight, (weight.shape[0],)),
            _empty_grad_unless(residual_weight is not None, weight,
                               (out_channels, weight.shape[1], 1)),
            _empty_grad_unless(residual_bias is not None, weight, (out_channels,)),
        )

    def _setup_context(ctx, inputs, output):
        (x, weight, bias, mask, keep, residual_weight, residual_bias, dilation, drop_gate,
         residual) = inputs
        if mask is not None and mask.requires_grad:  # rather than silently no gradient
            raise NotImplementedError(
                "kxops::gated_conv does not differentiate mask; pass mask.detach(), or call "
                "kxops.dilated_gated_conv1d, which computes the mask's gradient")
        ctx.save_for_backward(x, output[1], weight, mask, keep, residual_weight, residual_bias)
        # z is internal and never gets a gradient: without this, autograd would pass the
        # backward an activation-sized tensor of zeros for it, filled on every call.
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        ctx.config = (dilation, drop_gate, residual)

    def _backward(ctx, grad_y, _grad_z):
        if grad_y is None:  # y got no gradient (grads are not materialised): nothing flows
            return (None,) * 10
        x, z, weight, mask, keep, residual_weight, residual_bias = ctx.saved_tensors
        grad_x, grad_w, grad_b, grad_rw, grad_rb = torch.ops.kxops.gated_conv_backward(
            grad_y, x, z, weight, mask, keep, residual_weight, residual_bias, ctx.has_bias,
            *ctx.config)
        return (grad_x, grad_w, grad_b if ctx.has_bias else None, None, None,
                grad_rw if residual_weight is not None else None,
                grad_rb if residual_bias is not None else None, None, None, None)

    torch.library.register_autograd("kxops::gated_conv", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "kxops.dilated_gated_conv1d does not support double backward (second-order "
            "gradients); use kxops.reference.dilated_gated_conv1d for them")

    # Registered so that differentiating the gradients fails with this message rather than a
    # confusing one from inside the kernel.
    torch.library.register_autograd("kxops::gated_conv_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
