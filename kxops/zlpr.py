"""ZLPR loss: public functions, fake kernels and autograd of kxops::zlpr / sparse_zlpr."""

import torch

from kxops import _ext
from kxops.reference import zlpr as ref

# The logits dtypes the compiled kernels take; any other floating type runs the reference.
_KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _use_kernel(op, logits):
    return (_ext.has_kernel(op, logits.device) and logits.dtype in _KERNEL_DTYPES
            and not _ext.functorch_active())


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
    finite terms of its sum. Second derivatives (double backward) run through the
    reference's autograd.
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
    """Saves the inputs (for a recomputation or a second derivative; no copies) and the
    gradient the forward computed, if it did (a direct call may pass compute_grad=False)."""
    *args, compute_grad = inputs
    ctx.grad_computed = compute_grad
    ctx.op = torch.ops.kxops.zlpr if len(args) == 2 else torch.ops.kxops.sparse_zlpr
    ctx.ignore_index = args[2:]
    ctx.save_for_backward(*args[:2], output[1] if compute_grad else None)
    # The gradient output is internal: no logits-sized zeros for its "gradient" per backward.
    ctx.set_materialize_grads(False)


def _row_grad_of_reference(ctx, logits, targets):
    """d row_loss / d logits by the reference, differentiable (for second derivatives)."""
    if ctx.op is torch.ops.kxops.sparse_zlpr:  # the forward checked the ids' range
        targets = ref.positives_to_dense(targets, ctx.ignore_index[0], logits.shape[-1])
    row_loss = ref.zlpr_row_loss(logits, targets)
    return torch.autograd.grad(row_loss.sum(), logits, create_graph=True)[0]


def _logits_grad(ctx, grad_loss, grad_of_grad):
    """The logits' gradient: grad_loss times the saved per-row gradient (recomputed by the
    kernel if the forward did not compute it), plus, when the forward's gradient output was
    itself differentiated (double backward), the Hessian-vector product with that gradient,
    through the reference's autograd."""
    logits, targets, grad = ctx.saved_tensors
    total = None
    if grad_loss is not None:
        if grad is None:
            grad = ctx.op(logits, targets, *ctx.ignore_index, True)[1]
        total = torch.ops.kxops.zlpr_backward(grad_loss, grad)
    if grad_of_grad is not None:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            hvp = torch.autograd.grad(_row_grad_of_reference(ctx, leaf, targets), leaf,
                                      grad_of_grad)[0]
        total = hvp if total is None else total + hvp
    return total


if _ext.LOADED:

    def _check_kernel_logits(op, logits):
        if logits.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"kxops.{op}: logits must be float64, float32, float16 or bfloat16, "
                            f"got {logits.dtype}")

    # The fake kernels check what the C++ kernels check: they also run for a direct call with
    # a meta tensor among real ones.
    @torch.library.register_fake("kxops::zlpr")
    def _zlpr_fake(logits, labels, compute_grad):
        _ext.check_devices("zlpr", "logits", logits, labels=labels)
        ref.check_zlpr_inputs(logits, labels, "none")
        _check_kernel_logits("zlpr", logits)
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::sparse_zlpr")
    def _sparse_zlpr_fake(logits, positives, ignore_index, compute_grad):
        _ext.check_devices("sparse_zlpr", "logits", logits, positives=positives)
        ref.check_sparse_zlpr_inputs(logits, positives, ignore_index, "none")
        _check_kernel_logits("sparse_zlpr", logits)
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::zlpr_backward")
    def _zlpr_backward_fake(grad_loss, grad):
        _ext.check_devices("zlpr_backward", "grad", grad, grad_loss=grad_loss)
        if not (grad.is_floating_point() and grad_loss.is_floating_point()):
            raise TypeError(f"kxops.zlpr_backward: grad_loss and grad must be floating point, "
                            f"got {grad_loss.dtype} and {grad.dtype}")
        if grad_loss.shape != grad.shape[:-1]:
            raise ValueError(f"kxops.zlpr_backward: grad_loss must have shape "
                             f"{tuple(grad.shape[:-1])}, got {tuple(grad_loss.shape)}")
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def _zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None

    def _sparse_zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None

    def _save_scaling(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _scaling_backward(ctx, grad_out):
        """zlpr_backward is grad * grad_loss[..., None]; a gradient reaching grad flows on to
        the forward's gradient output (see _logits_grad)."""
        grad_loss, grad = ctx.saved_tensors
        return ((grad_out * grad).sum(-1).to(grad_loss.dtype),
                (grad_out * grad_loss.unsqueeze(-1)).to(grad.dtype))

    torch.library.register_autograd("kxops::zlpr", _zlpr_backward, setup_context=_save_grad)
    torch.library.register_autograd("kxops::sparse_zlpr", _sparse_zlpr_backward,
                                    setup_context=_save_grad)
    torch.library.register_autograd("kxops::zlpr_backward", _scaling_backward,
                                    setup_context=_save_scaling)
