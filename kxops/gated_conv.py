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
    # The convolution runs in the autocast dtype, as nn.Conv1d's would.
    x, weight, bias, residual_weight, residual_bias = _ext.autocast(
        x, x, weight, bias, residual_weight, residual_bias)
    out_channels, dilation, drop_gate = _checks.check_gated_conv_inputs(
        x, weight, bias, mask, dilation, drop_gate, residual, residual_weight, residual_bias)
    keep = ref.gate_keep_mask(x, out_channels, drop_gate) if training and drop_gate > 0 else None
    args = (x, weight, bias, mask, keep, residual_weight, residual_bias, dilation, drop_gate,
            residual)
    if (not _ext.has_kernel("gated_conv", x.device) or _ext.needs_grad(mask)
            or _ext.transform_active()):
        return ref.gated_conv_from_keep(*args)
    if mask is not None:
        mask = mask.to(x.dtype)
    return torch.ops.kxops.gated_conv(x, weight, bias, mask, *args[4:])[0]


def _gap(time, kernel_size, dilation):
    """The rows after each sequence in the kernels' gapped layout of z (csrc/gated_conv_host.h,
    Gapped::pad): the reach of the taps that can touch a real step."""
    reach = min(kernel_size // 2, (time - 1) // dilation) if time > 0 else 0
    return reach * dilation


def _grad_or_empty(wanted, like, shape):
    return like.new_empty(shape if wanted else (0,))


if _ext.LOADED:

    @torch.library.register_fake("kxops::gated_conv")
    def _gated_conv_fake(x, weight, bias, mask, gate_keep, residual_weight, residual_bias,
                         dilation, drop_gate, residual):
        _checks.check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                                        residual_weight, residual_bias, gate_keep=gate_keep,
                                        mask_like_x=True)
        batch, time, _ = x.shape
        two_out = weight.shape[0]
        z_steps = time + _gap(time, weight.shape[2], dilation)
        return x.new_empty(batch, time, two_out // 2), x.new_empty(batch, z_steps, two_out)

    @torch.library.register_fake("kxops::gated_conv_backward")
    def _gated_conv_backward_fake(grad_y, x, z, weight, mask, gate_keep, residual_weight,
                                  residual_bias, grad_mask, dilation, drop_gate, residual):
        _checks.check_gated_conv_backward_inputs(grad_y, x, z, weight, mask, gate_keep,
                                                 residual_weight, residual_bias, dilation,
                                                 drop_gate, residual, _gap)
        _checks.check_grad_mask("gated_conv_backward", grad_mask,
                                ("x", "weight", "bias", "residual_weight", "residual_bias"))
        out_channels = weight.shape[0] // 2
        wants_x, wants_weight, wants_bias, wants_rw, wants_rb = grad_mask
        return (
            _grad_or_empty(wants_x, x, x.shape),  # the kernels return contiguous gradients
            _grad_or_empty(wants_weight, weight, weight.shape),
            _grad_or_empty(wants_bias, weight, (weight.shape[0],)),
            _grad_or_empty(wants_rw and residual_weight is not None, weight,
                           (out_channels, weight.shape[1], 1)),
            _grad_or_empty(wants_rb and residual_bias is not None, weight, (out_channels,)),
        )

    def _setup_context(ctx, inputs, output):
        (x, weight, _bias, mask, keep, residual_weight, residual_bias, dilation, drop_gate,
         residual) = inputs
        if mask is not None and mask.requires_grad:  # rather than silently no gradient
            raise NotImplementedError(
                "kxops.gated_conv: the op does not differentiate mask; pass mask.detach(), or "
                "call kxops.dilated_gated_conv1d, which computes the mask's gradient")
        ctx.save_for_backward(x, output[1], weight, mask, keep, residual_weight, residual_bias)
        # z is internal and never gets a gradient: without this, autograd would pass the
        # backward an activation-sized tensor of zeros for it, filled on every call.
        ctx.set_materialize_grads(False)
        ctx.config = (dilation, drop_gate, residual)

    # The differentiable inputs in gated_conv_backward's grad_mask order (x, weight, bias,
    # residual_weight, residual_bias) among gated_conv's inputs.
    _GRAD_INPUTS = (0, 1, 2, 5, 6)

    def _backward(ctx, grad_y, _grad_z):
        if grad_y is None:  # y got no gradient (grads are not materialised): nothing flows
            return (None,) * 10
        x, z, weight, mask, keep, residual_weight, residual_bias = ctx.saved_tensors
        grad_mask = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        grads = torch.ops.kxops.gated_conv_backward(
            grad_y, x, z, weight, mask, keep, residual_weight, residual_bias, grad_mask,
            *ctx.config)
        result = [None] * 10
        for i, wanted, grad in zip(_GRAD_INPUTS, grad_mask, grads):
            result[i] = grad if wanted else None
        return tuple(result)

    torch.library.register_autograd("kxops::gated_conv", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "kxops.gated_conv_backward: kxops.dilated_gated_conv1d does not support double "
            "backward (second-order gradients); use kxops.reference.dilated_gated_conv1d for "
            "them")

    # Registered so that differentiating the gradients fails with this message rather than a
    # confusing one from inside the kernel.
    torch.library.register_autograd("kxops::gated_conv_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
