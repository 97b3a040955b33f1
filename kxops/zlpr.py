"""ZLPR loss: public functions, fake kernels and autograd of kxops::zlpr / sparse_zlpr."""

import torch

from kxops import _ext
from kxops.reference import zlpr as ref

# The logits dtypes the compiled kernels take; any other floating type runs the reference.
_KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _use_kernel(op, logits):
    # functorch transforms (torch.func.grad, vmap, ...) cannot run the autograd that
    # register_autograd gives the op (no setup_context): the reference runs under them.
    return (_ext.has_kernel(op, logits.device) and logits.dtype in _KERNEL_DTYPES
            and not torch._C._are_functorch_transforms_active())


def _needs_grad(logits):
    return torch.is_grad_enabled() and logits.requires_grad


def zlpr_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"):
    """ZLPR ("multilabel categorical cross-entropy") loss; the last dim is the class dim.

    ``labels``: same shape as ``logits``; bool/int (hard) or float in [0, 1] (soft). ``-inf``
    logits are masked out with zero gradient. Reduction ``none`` keeps ``logits.shape[:-1]``;
    ``mean`` averages over rows. The loss is computed in fp32 (fp64 for fp64 logits) and returned
    in the logits' dtype.

    Labels are constants: they get no gradient, even with ``requires_grad`` (they are targets;
    the kernels compute d loss / d logits only). NaN and inf follow the reference: a NaN logit
    or label makes its row's loss NaN, and the gradient NaN at the classes of the sum it
    enters (a NaN label enters both); a ``+inf`` term (a ``+inf`` logit among the negatives,
    an infinite label) makes the loss ``inf``, the gradient NaN at that class and 0 at the
    finite terms of its sum. Only first derivatives: differentiating the gradient again raises
    (``kxops.reference.zlpr_loss`` supports it).
    """
    ref.check_zlpr_inputs(logits, labels, reduction)
    labels = labels.detach()
    if _use_kernel("zlpr", logits):
        row_loss, _ = torch.ops.kxops.zlpr(logits, labels, _needs_grad(logits))
    else:
        row_loss = ref.zlpr_row_loss(logits, labels)
    return ref.reduce_loss(row_loss, reduction, logits.dtype)


def sparse_zlpr_loss(logits: torch.Tensor, positives: torch.Tensor, *, ignore_index: int = -1,
                     reduction: str = "mean"):
    """ZLPR loss with labels as class indices: ``positives`` int32/int64 ``[..., P]``.

    Entries equal to ``ignore_index`` are padding; duplicates count once; the negative sum is
    exact (positives excluded, not subtracted). An index out of range raises ``IndexError`` on
    CPU; on CUDA the compiled kernel raises a device-side assert, as ``torch.gather`` does.
    ``ignore_index`` is any int64, compared with the indices as int64: one that int32
    positives cannot hold marks no entry as padding. NaN and inf as in ``zlpr_loss``.
    """
    ref.check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction)
    if _use_kernel("sparse_zlpr", logits):
        row_loss, _ = torch.ops.kxops.sparse_zlpr(logits, positives, ignore_index,
                                                  _needs_grad(logits))
        return ref.reduce_loss(row_loss, reduction, logits.dtype)
    return ref.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index,
                                reduction=reduction)


def _fake_forward(logits, compute_grad):
    row_loss = logits.new_empty(logits.shape[:-1], dtype=ref.opmath_dtype(logits.dtype))
    # The kernels return a contiguous gradient whatever the logits' strides.
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return row_loss, grad


def _save_grad(ctx, inputs, output):
    ctx.grad_computed = inputs[-1]
    ctx.save_for_backward(output[1])
    # The gradient output is internal: no logits-sized zeros for its "gradient" per backward.
    ctx.set_materialize_grads(False)


def _scaled_grad(ctx, grad_loss):
    if grad_loss is None:  # the loss got no gradient (grads are not materialised)
        return None
    if not ctx.grad_computed:
        raise RuntimeError("kxops ZLPR: backward through a forward called with "
                           "compute_grad=False; the gradient was not computed")
    (grad,) = ctx.saved_tensors
    return torch.ops.kxops.zlpr_backward(grad_loss, grad)


if _ext.LOADED:

    @torch.library.register_fake("kxops::zlpr")
    def _zlpr_fake(logits, labels, compute_grad):
        _ext.check_devices("zlpr", "logits", logits, labels=labels)
        if labels.shape != logits.shape:
            raise ValueError(f"kxops.zlpr: labels must have the logits' shape "
                             f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::sparse_zlpr")
    def _sparse_zlpr_fake(logits, positives, ignore_index, compute_grad):
        _ext.check_devices("sparse_zlpr", "logits", logits, positives=positives)
        if positives.shape[:-1] != logits.shape[:-1]:
            raise ValueError(f"kxops.sparse_zlpr: positives must be [*{tuple(logits.shape[:-1])}"
                             f", P], got {tuple(positives.shape)}")
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::zlpr_backward")
    def _zlpr_backward_fake(grad_loss, grad):
        _ext.check_devices("zlpr_backward", "grad", grad, grad_loss=grad_loss)
        return torch.empty_like(grad)

    def _zlpr_backward(ctx, grad_loss, _grad_of_grad):
        return _scaled_grad(ctx, grad_loss), None, None

    def _sparse_zlpr_backward(ctx, grad_loss, _grad_of_grad):
        return _scaled_grad(ctx, grad_loss), None, None, None

    def _no_double_backward(ctx, grad):
        raise RuntimeError(
            "kxops ZLPR: double backward is not supported (the gradient of the loss was "
            "differentiated again, e.g. after create_graph=True); use "
            "kxops.reference.zlpr_loss / sparse_zlpr_loss for higher-order gradients")

    torch.library.register_autograd("kxops::zlpr", _zlpr_backward, setup_context=_save_grad)
    torch.library.register_autograd("kxops::sparse_zlpr", _sparse_zlpr_backward,
                                    setup_context=_save_grad)
    # Raises only when the scaled gradient is itself differentiated, not on create_graph=True.
    torch.library.register_autograd("kxops::zlpr_backward", _no_double_backward)
