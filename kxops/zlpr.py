"""ZLPR loss: public functions, fake kernels and autograd of kxops::zlpr / sparse_zlpr."""

import threading

import torch

from kxops import _ext
from kxops.reference import zlpr as ref


def _needs_grad(logits):
    return torch.is_grad_enabled() and logits.requires_grad


class _PublicCall(threading.local):
    """Set while a public wrapper calls an op: the op's gradient output is then seen by no one
    else (the wrapper drops it), so that its backward may return it as the logits' gradient
    (see _save_grad). A direct caller of torch.ops.kxops.* keeps their output to themselves."""
    active = False


_public_call = _PublicCall()


def _row_loss(op, *args):
    """The row losses of a public wrapper's op call. Not marked under torch.compile, whose
    traced backward has no values to decide with (and whose tracer would not take the
    thread-local)."""
    if torch.compiler.is_compiling():
        return op(*args)[0]
    _public_call.active = True
    try:
        return op(*args)[0]
    finally:
        _public_call.active = False


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
    if _ext.runs_compiled("zlpr", logits):
        row_loss = _row_loss(torch.ops.kxops.zlpr, logits, labels, _needs_grad(logits),
                             reduction == "mean")
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
    if _ext.runs_compiled("zlpr", logits):
        row_loss = _row_loss(torch.ops.kxops.sparse_zlpr, logits, positives, ignore_index,
                             _needs_grad(logits), reduction == "mean")
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
    gradient the forward computed, if it did (a direct call may pass compute_grad=False).

    A public wrapper's gradient on CPU is kept outside save_for_backward, for the backward to
    take over (a saved tensor can only be read, and its storage stays with the graph), and
    detached, so that ctx holds no reference back to the graph: see _loss_grad. Elsewhere the
    check that allows the hand-on would synchronise (CUDA), a direct caller still sees the
    tensor, and saved-tensor hooks must see it."""
    *args, compute_grad, grad_of_mean = inputs
    ctx.op = torch.ops.kxops.zlpr if len(args) == 2 else torch.ops.kxops.sparse_zlpr
    ctx.ignore_index = args[2:]
    ctx.grad_of_mean = grad_of_mean
    grad = output[1] if compute_grad else None
    hand_on = (compute_grad and _public_call.active and grad.device.type == "cpu"
               and not _saved_tensors_hooks_active())
    ctx.forward_grad = [grad.detach()] if hand_on else []
    ctx.save_for_backward(*args[:2], None if hand_on else grad)
    # The gradient output is internal: no logits-sized zeros for its "gradient" per backward.
    ctx.set_materialize_grads(False)


def _saved_tensors_hooks_active():
    """Whether saved-tensor hooks are active (activation checkpointing, save_on_cpu): they must
    see every tensor the graph keeps, to drop or move it. torch has no public query (its
    checkpoint asks this private one); without it, assume they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _grad_scale(ctx, grad_loss):
    """The factor of the kernel's gradient output (grad_of_mean): 1 / rows, divided as torch's
    mean backward divides its 1 (so that a mean's grad_loss holds exactly this value), or 1;
    0-dim, in grad_loss's dtype."""
    one = grad_loss.new_ones(())
    return one.div(grad_loss.numel()) if ctx.grad_of_mean and grad_loss.numel() else one


def _recomputed_grad(ctx, logits, targets):
    return ctx.op(logits, targets, *ctx.ignore_index, True, ctx.grad_of_mean)[1]


def _take_forward_grad(ctx):
    """The gradient the forward left for a backward to take (see _save_grad), or None. Every
    backward takes it, so that one backward at most returns it, and a loss kept alive after
    its backward does not keep it; list.pop is atomic, for backwards of one retained graph
    running in several threads."""
    try:
        return ctx.forward_grad.pop()
    except IndexError:
        return None


def _is_everywhere(grad_loss, scale):
    """Whether grad_loss equals scale at every row, asked only where the answer costs no
    synchronisation and values exist: a plain CPU tensor (not CUDA, not a tracer's fake)."""
    return (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu"
            and bool(torch.all(grad_loss == scale)))


def _loss_grad(ctx, logits, targets, saved_grad, grad_loss):
    """grad_loss times d row_loss / d logits, from the forward's gradient output (that times
    the scale, see _grad_scale). A mean or sum reduction's backward passes the scale at every
    row: a gradient no one else sees (taken from ctx, or recomputed) is then the answer,
    returned as it is, without a logits-sized pass; autograd may write into it (accumulate a
    later gradient). A later backward of a retained graph recomputes it."""
    scale = _grad_scale(ctx, grad_loss)
    owned = _take_forward_grad(ctx)
    if torch.is_grad_enabled():
        # create_graph: the product must carry the graph of the gradient output, so that is
        # recomputed from the saved logits (rare: the second derivative's own cost dominates).
        grad = _recomputed_grad(ctx, logits, targets)
    else:
        if owned is None and saved_grad is None:
            owned = _recomputed_grad(ctx, logits, targets)
        if owned is not None and _is_everywhere(grad_loss, scale):
            return owned
        grad = saved_grad if owned is None else owned
    return torch.ops.kxops.zlpr_backward(grad_loss / scale if ctx.grad_of_mean else grad_loss,
                                         grad)


def _row_grad_of_reference(ctx, logits, targets):
    """The forward's gradient output by the reference, differentiable (for second
    derivatives)."""
    if ctx.op is torch.ops.kxops.sparse_zlpr:  # the forward checked the ids' range
        targets = ref.positives_to_dense(targets, ctx.ignore_index[0], logits.shape[-1])
    row_loss = ref.zlpr_row_loss(logits, targets)
    grad = torch.autograd.grad(row_loss.sum(), logits, create_graph=True)[0]
    return grad * _grad_scale(ctx, row_loss.detach()) if ctx.grad_of_mean else grad


def _logits_grad(ctx, grad_loss, grad_of_grad):
    """The logits' gradient: from grad_loss (see _loss_grad) plus, when the forward's gradient
    output was itself differentiated (double backward), the Hessian-vector product with that
    gradient, through the reference's autograd (differentiable again under create_graph)."""
    logits, targets, saved_grad = ctx.saved_tensors
    total = None
    if grad_loss is not None:
        total = _loss_grad(ctx, logits, targets, saved_grad, grad_loss)
    if grad_of_grad is not None:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            at = logits if create_graph else logits.detach().requires_grad_(True)
            hvp = torch.autograd.grad(_row_grad_of_reference(ctx, at, targets), at,
                                      grad_of_grad, create_graph=create_graph)[0]
        total = hvp if total is None else total + hvp
    return total


if _ext.LOADED:

    # The fake kernels check what the C++ kernels check: they also run for a direct call with
    # a meta tensor among real ones.
    @torch.library.register_fake("kxops::zlpr")
    def _zlpr_fake(logits, labels, compute_grad, grad_of_mean=False):
        _ext.check_devices("zlpr", "logits", logits, labels=labels)
        ref.check_zlpr_inputs(logits, labels, "none")
        _ext.check_kernel_dtype("zlpr", "logits", logits)
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::sparse_zlpr")
    def _sparse_zlpr_fake(logits, positives, ignore_index, compute_grad, grad_of_mean=False):
        _ext.check_devices("sparse_zlpr", "logits", logits, positives=positives)
        ref.check_sparse_zlpr_inputs(logits, positives, ignore_index, "none")
        _ext.check_kernel_dtype("sparse_zlpr", "logits", logits)
        return _fake_forward(logits, compute_grad)

    @torch.library.register_fake("kxops::zlpr_backward")
    def _zlpr_backward_fake(grad_loss, grad):
        _ext.check_devices("zlpr_backward", "grad", grad, grad_loss=grad_loss)
        _ext.check_kernel_dtype("zlpr_backward", "grad", grad)
        if grad.dim() == 0:
            raise ValueError("kxops.zlpr_backward: grad must have at least 1 dim (the class "
                             "dim), got a 0-dim tensor")
        _ext.check_grad_loss("zlpr_backward", grad_loss, grad.shape[:-1], "grad.shape[:-1]")
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def _zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None

    def _sparse_zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None, None

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
