"""ZLPR loss: public functions, fake kernels and autograd of kxops::zlpr / sparse_zlpr.

The autograd of both ops is one backward over one state, `_LossCall`: which op ran, with which
arguments, and the forward's gradient when the backward may return it as it is. Two entry
points build it: `_PublicLoss`, the public wrappers' eager autograd, and the ops' registered
autograd (direct calls of torch.ops.kxops.*, torch.compile).
"""

import torch

from kxops import _checks, _ext
from kxops.reference import zlpr as ref


class _LossCall:
    """One call of kxops::zlpr or kxops::sparse_zlpr, as its backward needs it.

    op: the op; between: its arguments between the targets and grad_mask (sparse_zlpr's
    ignore_index); reduction; options: its arguments after reduction (grad_filter).
    forward_grad: the forward's gradient, held (outside save_for_backward, detached) only where
    the backward may return it as the logits' gradient: the gradient of a public wrapper's call
    (no one else sees it; a direct caller keeps theirs), on CPU (on CUDA the test of grad_loss
    would synchronise; under torch.compile the tensors are fakes), and with no saved-tensor
    hooks active (checkpointing must see every tensor the graph keeps, to drop it). Every
    backward takes it out (list.pop is atomic, for backwards of one retained graph in several
    threads): one backward at most returns it, autograd may then write into it, a later
    backward recomputes it, and a loss kept after its backward keeps nothing logits-sized.
    """

    def __init__(self, op, between, reduction, options):
        self.op, self.between, self.reduction, self.options = op, between, reduction, options
        self.forward_grad = []

    def run(self, logits, targets, compute_grad):
        """(loss, gradient of the loss or an empty tensor)."""
        return self.op(logits, targets, *self.between, [compute_grad], self.reduction,
                       *self.options)

    def gradient(self, logits, targets):
        """The gradient output recomputed: differentiable under create_graph."""
        return self.run(logits, targets, True)[1]

    def reference_gradient(self, logits, targets):
        """The gradient output by the reference, differentiable (for second derivatives). The
        rows are independent: the gradient of their sum holds each row's own gradient."""
        if self.op is torch.ops.kxops.sparse_zlpr:  # the forward checked the ids' range
            targets = ref.positives_to_dense(targets, self.between[0], logits.shape[-1])
        reduction = "sum" if self.reduction == "none" else self.reduction
        row_loss = ref.zlpr_row_loss(logits, targets)
        loss = ref.reduce_loss(row_loss, reduction, row_loss.dtype)
        return torch.autograd.grad(loss, logits, create_graph=True)[0]

    def take_forward_grad(self):
        try:
            return self.forward_grad.pop()
        except IndexError:
            return None


def _save(ctx, call, logits, targets, grad, public):
    """The forward's half of the autograd: ctx.call, and the tensors the backward reads (no
    copies). grad: the forward's gradient, or None where it was not computed."""
    reusable = (grad is not None and public and grad.device.type == "cpu"
                and not _saved_tensors_hooks_active())
    if reusable:
        call.forward_grad.append(grad.detach())
    # fp16's backward recomputes its gradient in fp32 (see _grad_loss_term): none to keep.
    kept = None if reusable or logits.dtype == torch.float16 else grad
    ctx.call = call
    ctx.save_for_backward(logits, targets, kept)
    # The gradient output is internal: no logits-sized zeros for its "gradient" per backward.
    ctx.set_materialize_grads(False)


def _saved_tensors_hooks_active():
    """Whether saved-tensor hooks are active (activation checkpointing, save_on_cpu). torch has
    no public query (its checkpoint asks this private one); without it, assume they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _grad_loss_term(call, logits, targets, saved_grad, grad_loss):
    """grad_loss times the forward's gradient output. A backward that starts at the loss
    (loss.backward()) passes 1: a gradient no one else sees (the forward's, taken from call,
    or recomputed) is then the answer as it is, without a logits-sized pass."""
    owned = call.take_forward_grad()
    half = logits.dtype == torch.float16
    if not torch.is_grad_enabled():
        if owned is None and saved_grad is None and not half:  # a call without the gradient
            owned = call.gradient(logits, targets)
        if owned is not None and _ext.grad_is_one(grad_loss):
            return owned
        if not half:
            return _scaled(grad_loss, saved_grad if owned is None else owned, logits.dtype)
    # create_graph: the product must carry the graph of a gradient recomputed from the saved
    # logits (rare: the second derivative's own cost dominates). fp16: its five exponent bits
    # flush the small gradients that a grad_loss such as a loss scale lifts, so the product
    # comes from an fp32 gradient, rounded once as the reference rounds it.
    grad = call.gradient(logits.float() if half else logits, targets)
    return _scaled(grad_loss, grad, logits.dtype)


def _scaled(grad_loss, grad, dtype):
    # A reduced loss's 0-dim grad_loss reaches every row.
    product = torch.ops.kxops.zlpr_backward(grad_loss.expand(grad.shape[:-1]), grad)
    return ref.in_dtype(product, dtype)


def _logits_grad(ctx, grad_loss, grad_of_grad):
    """The logits' gradient: from grad_loss plus, when the forward's gradient output was itself
    differentiated (double backward), the Hessian-vector product with that gradient, through
    the reference's autograd (differentiable again under create_graph)."""
    logits, targets, saved_grad = ctx.saved_tensors
    total = None
    if grad_loss is not None:
        total = _grad_loss_term(ctx.call, logits, targets, saved_grad, grad_loss)
    if grad_of_grad is not None:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            at = logits if create_graph else logits.detach().requires_grad_(True)
            hvp = torch.autograd.grad(ctx.call.reference_gradient(at, targets), at,
                                      grad_of_grad, create_graph=create_graph)[0]
        total = hvp if total is None else total + hvp
    return total


class _PublicLoss(torch.autograd.Function):
    """The public wrappers' eager autograd: the registered autograd's state and backward
    without torch.library's per-call wrapping (argument defaults filled from the schema, a
    metadata object, a redispatch, a check of the backward's outputs; see docs/design.md).
    Returns the loss only: its gradient output is the wrapper's, so its backward may return
    that tensor."""

    @staticmethod
    def forward(ctx, call, logits, targets, compute_grad):
        loss, grad = call.run(logits, targets, compute_grad)  # grad mode is off here
        _save(ctx, call, logits, targets, grad if compute_grad else None, public=True)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return None, _logits_grad(ctx, grad_loss, None), None, None


def _loss(call, logits, targets):
    """The loss of a public wrapper's call of the op. Under torch.compile the op's registered
    autograd runs (its traced backward has no values to test grad_loss with)."""
    needs_grad = _ext.needs_grad(logits)
    # An fp16 gradient from the forward serves only to be returned as it is, which is CPU-only:
    # elsewhere fp16's backward recomputes it in fp32.
    compute_grad = needs_grad and (logits.dtype != torch.float16 or logits.device.type == "cpu")
    if needs_grad and not torch.compiler.is_compiling():
        loss = _PublicLoss.apply(call, logits, targets, compute_grad)
    else:
        loss = call.run(logits, targets, compute_grad)[0]
    return ref.in_dtype(loss, logits.dtype)


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
    _checks.check_zlpr_inputs(logits, labels, reduction)
    labels = labels.detach()
    if _ext.runs_compiled("zlpr", logits):
        return _loss(_LossCall(torch.ops.kxops.zlpr, (), reduction, ()), logits, labels)
    return ref.reduce_loss(ref.zlpr_row_loss(logits, labels), reduction, logits.dtype)


def sparse_zlpr_loss(logits: torch.Tensor, positives: torch.Tensor, *, ignore_index: int = -1,
                     reduction: str = "mean", grad_filter: float = 0.0):
    """ZLPR loss with labels as class indices: ``positives`` int32/int64 ``[..., P]``.

    Entries equal to ``ignore_index`` are padding; duplicates count once; the negative sum is
    exact (positives excluded, not subtracted). An index out of range raises ``IndexError`` on
    CPU; on CUDA the compiled kernel raises a device-side assert, as ``torch.gather`` does.
    ``ignore_index`` is any int64, compared with the indices as int64: one that int32
    positives cannot hold marks no entry as padding. NaN and inf as in ``zlpr_loss``.

    ``grad_filter`` (default 0: exact): in each row's gradient, before the reduction's scale,
    every negative entry ``e^{s_j} / (1 + sum_neg e^s)`` below it is set to 0 (positives never);
    the loss is unchanged. See ``linear_sparse_zlpr_loss`` for its bound and use.
    """
    _checks.check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction)
    grad_filter = _checks.check_grad_filter("sparse_zlpr", grad_filter)
    if _ext.runs_compiled("zlpr", logits):
        # The op's grad_filter argument only when set: its default call stays the one of before.
        options = (grad_filter,) if grad_filter else ()
        call = _LossCall(torch.ops.kxops.sparse_zlpr, (ignore_index,), reduction, options)
        return _loss(call, logits, positives)
    return ref.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index,
                                reduction=reduction, grad_filter=grad_filter)


if _ext.LOADED:

    def _fake_outputs(logits, grad_mask, reduction):
        loss = logits.new_empty(logits.shape[:-1] if reduction == "none" else (),
                                dtype=ref.opmath_dtype(logits.dtype))
        # The kernels return a contiguous gradient whatever the logits' strides.
        grad = logits.new_empty(logits.shape) if grad_mask[0] else logits.new_empty(0)
        return loss, grad

    # The fake kernels check what the C++ ops check: they also run for a direct call with a
    # meta tensor among real ones.
    @torch.library.register_fake("kxops::zlpr")
    def _zlpr_fake(logits, labels, grad_mask, reduction="none"):
        _checks.check_zlpr_op(logits, labels, grad_mask, reduction)
        return _fake_outputs(logits, grad_mask, reduction)

    @torch.library.register_fake("kxops::sparse_zlpr")
    def _sparse_zlpr_fake(logits, positives, ignore_index, grad_mask, reduction="none",
                          grad_filter=0.0):
        _checks.check_sparse_zlpr_op(logits, positives, ignore_index, grad_mask, reduction,
                                     grad_filter)
        return _fake_outputs(logits, grad_mask, reduction)

    @torch.library.register_fake("kxops::zlpr_backward")
    def _zlpr_backward_fake(grad_loss, grad):
        _checks.check_zlpr_backward_op(grad_loss, grad)
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def _setup_zlpr(ctx, inputs, output):
        logits, labels, grad_mask, reduction = inputs
        call = _LossCall(torch.ops.kxops.zlpr, (), reduction, ())
        _save(ctx, call, logits, labels, output[1] if grad_mask[0] else None, public=False)
        if not grad_mask[0]:  # the empty gradient output: nothing to differentiate
            ctx.mark_non_differentiable(output[1])

    def _setup_sparse_zlpr(ctx, inputs, output):
        logits, positives, ignore_index, grad_mask, reduction, grad_filter = inputs
        call = _LossCall(torch.ops.kxops.sparse_zlpr, (ignore_index,), reduction,
                         (grad_filter,))
        _save(ctx, call, logits, positives, output[1] if grad_mask[0] else None, public=False)
        if not grad_mask[0]:  # the empty gradient output: nothing to differentiate
            ctx.mark_non_differentiable(output[1])

    def _zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None

    def _sparse_zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None, None, None

    def _setup_scaling(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _scaling_backward(ctx, grad_out):
        """zlpr_backward is grad * grad_loss[..., None]; a gradient reaching grad flows on to
        the forward's gradient output (see _logits_grad)."""
        grad_loss, grad = ctx.saved_tensors
        return ((grad_out * grad).sum(-1).to(grad_loss.dtype),
                (grad_out * grad_loss.unsqueeze(-1)).to(grad.dtype))

    torch.library.register_autograd("kxops::zlpr", _zlpr_backward, setup_context=_setup_zlpr)
    torch.library.register_autograd("kxops::sparse_zlpr", _sparse_zlpr_backward,
                                    setup_context=_setup_sparse_zlpr)
    torch.library.register_autograd("kxops::zlpr_backward", _scaling_backward,
                                    setup_context=_setup_scaling)
