"""ZLPR loss: public functions, fake kernels and autograd of kxops::zlpr / sparse_zlpr."""

import torch

from kxops import _checks, _ext
from kxops.reference import zlpr as ref


def _needs_grad(logits):
    return torch.is_grad_enabled() and logits.requires_grad


class _PublicLoss(torch.autograd.Function):
    """The public wrappers' eager autograd: the op's registered setup and backward (below),
    without torch.library's per-call wrapping, which cost about a tenth of a [64, 16384] step
    on the 2-core CPU. Its caller drops the op's gradient output, which no one else then sees,
    so its backward may return that tensor as the logits' gradient (see _save_grad); a direct
    caller of torch.ops.kxops.* keeps their output to themselves."""

    @staticmethod
    def forward(ctx, op, *args):
        output = op(*args)  # grad mode is off here: the op runs below autograd
        _save_grad(ctx, args, output, public=True)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        return None, _logits_grad(ctx, grad_loss, None), *[None] * (ctx.num_args - 1)


def _op_loss(op, logits, targets, reduction, options=()):
    """The loss of a public wrapper's op call; targets: the op's arguments between logits and
    compute_grad; options: those after reduction. Under torch.compile the op's registered
    autograd runs: its traced backward has no values to decide a hand-on with."""
    needs_grad = _needs_grad(logits)
    # An fp16 gradient from the forward serves only the hand-on, which is CPU-only: elsewhere
    # fp16's backward takes its product from an fp32 recomputation (see _loss_grad).
    compute_grad = needs_grad and (logits.dtype != torch.float16 or logits.device.type == "cpu")
    args = (logits, *targets, compute_grad, reduction, *options)
    if needs_grad and not torch.compiler.is_compiling():
        return _PublicLoss.apply(op, *args)
    return op(*args)[0]


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
        loss = _op_loss(torch.ops.kxops.zlpr, logits, (labels,), reduction)
        return ref.in_dtype(loss, logits.dtype)
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
        loss = _op_loss(torch.ops.kxops.sparse_zlpr, logits, (positives, ignore_index),
                        reduction, options)
        return ref.in_dtype(loss, logits.dtype)
    return ref.sparse_zlpr_loss(logits, positives, ignore_index=ignore_index,
                                reduction=reduction, grad_filter=grad_filter)


def _fake_forward(logits, compute_grad, reduction):
    _checks.check_reduction("zlpr", reduction)
    loss = logits.new_empty(logits.shape[:-1] if reduction == "none" else (),
                            dtype=ref.opmath_dtype(logits.dtype))
    # The kernels return a contiguous gradient whatever the logits' strides.
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, grad


def _save_grad(ctx, inputs, output, public=False):
    """Saves the inputs (for a recomputation or a second derivative; no copies) and the
    gradient the forward computed, if it did (a direct call may pass compute_grad=False).

    A public wrapper's gradient on CPU is kept outside save_for_backward, for the backward to
    take over (a saved tensor can only be read, and its storage stays with the graph), and
    detached, so that ctx holds no reference back to the graph: see _loss_grad. Elsewhere the
    check that allows the hand-on would synchronise (CUDA), a direct caller still sees the
    tensor, and saved-tensor hooks must see it."""
    # zlpr: (logits, labels, compute_grad, reduction); sparse_zlpr: (logits, positives,
    # ignore_index, compute_grad, reduction[, grad_filter]).
    sparse = len(inputs) >= 5
    args, (compute_grad, reduction), options = (
        (inputs[:3], inputs[3:5], inputs[5:]) if sparse else (inputs[:2], inputs[2:4], ()))
    ctx.op = torch.ops.kxops.sparse_zlpr if sparse else torch.ops.kxops.zlpr
    ctx.num_args = len(inputs)
    ctx.ignore_index = args[2:]
    ctx.reduction = reduction
    ctx.options = tuple(options)  # grad_filter, for a recomputation
    grad = output[1] if compute_grad else None
    hand_on = (compute_grad and public and grad.device.type == "cpu"
               and not _saved_tensors_hooks_active())
    ctx.forward_grad = [grad.detach()] if hand_on else []
    # fp16 products come from an fp32 recomputation (see _loss_grad): no fp16 gradient to keep.
    kept = None if hand_on or args[0].dtype == torch.float16 else grad
    ctx.save_for_backward(*args[:2], kept)
    # The gradient output is internal: no logits-sized zeros for its "gradient" per backward.
    ctx.set_materialize_grads(False)


def _saved_tensors_hooks_active():
    """Whether saved-tensor hooks are active (activation checkpointing, save_on_cpu): they must
    see every tensor the graph keeps, to drop or move it. torch has no public query (its
    checkpoint asks this private one); without it, assume they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _recomputed_grad(ctx, logits, targets):
    return ctx.op(logits, targets, *ctx.ignore_index, True, ctx.reduction, *ctx.options)[1]


def _take_forward_grad(ctx):
    """The gradient the forward left for a backward to take (see _save_grad), or None. Every
    backward takes it, so that one backward at most returns it, and a loss kept alive after
    its backward does not keep it; list.pop is atomic, for backwards of one retained graph
    running in several threads."""
    try:
        return ctx.forward_grad.pop()
    except IndexError:
        return None


def _is_one(grad_loss):
    """Whether grad_loss is 1 everywhere, asked only where the answer costs no synchronisation
    and values exist: a plain CPU tensor (not CUDA, not a tracer's fake)."""
    if type(grad_loss) is not torch.Tensor or grad_loss.device.type != "cpu":
        return False
    return grad_loss.item() == 1 if grad_loss.dim() == 0 else bool(torch.all(grad_loss == 1))


def _loss_grad(ctx, logits, targets, saved_grad, grad_loss):
    """grad_loss times the forward's gradient output (d loss / d logits). A backward that
    starts at the loss (loss.backward()) passes 1: a gradient no one else sees (taken from ctx,
    or recomputed) is then the answer, returned as it is, without a logits-sized pass; autograd
    may write into it (accumulate a later gradient). A later backward of a retained graph
    recomputes it."""
    owned = _take_forward_grad(ctx)
    half = logits.dtype == torch.float16
    if not torch.is_grad_enabled():
        if owned is None and saved_grad is None and not half:
            owned = _recomputed_grad(ctx, logits, targets)
        if owned is not None and _is_one(grad_loss):
            return owned
    if torch.is_grad_enabled() or half:
        # create_graph: the product must carry the graph of the gradient output, so that is
        # recomputed from the saved logits (rare: the second derivative's own cost dominates).
        # fp16: its five exponent bits flush the small gradients that a grad_loss such as a
        # loss scale would lift, so the product comes from an fp32 gradient, rounded once as
        # the reference rounds it.
        grad = _recomputed_grad(ctx, logits.float() if half else logits, targets)
    else:
        grad = saved_grad if owned is None else owned
    # A reduced loss's 0-dim grad_loss reaches every row.
    product = torch.ops.kxops.zlpr_backward(grad_loss.expand(grad.shape[:-1]), grad)
    return ref.in_dtype(product, logits.dtype)


def _row_grad_of_reference(ctx, logits, targets):
    """The forward's gradient output by the reference, differentiable (for second
    derivatives)."""
    if ctx.op is torch.ops.kxops.sparse_zlpr:  # the forward checked the ids' range
        targets = ref.positives_to_dense(targets, ctx.ignore_index[0], logits.shape[-1])
    # The rows are independent: the gradient of their sum holds each row's own gradient.
    reduction = "sum" if ctx.reduction == "none" else ctx.reduction
    row_loss = ref.zlpr_row_loss(logits, targets)
    loss = ref.reduce_loss(row_loss, reduction, row_loss.dtype)
    return torch.autograd.grad(loss, logits, create_graph=True)[0]


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
    def _zlpr_fake(logits, labels, compute_grad, reduction="none"):
        _checks.check_devices("zlpr", "logits", logits, labels=labels)
        _checks.check_zlpr_inputs(logits, labels, "none")
        _checks.check_kernel_dtype("zlpr", "logits", logits)
        return _fake_forward(logits, compute_grad, reduction)

    @torch.library.register_fake("kxops::sparse_zlpr")
    def _sparse_zlpr_fake(logits, positives, ignore_index, compute_grad, reduction="none",
                          grad_filter=0.0):
        _checks.check_grad_filter("sparse_zlpr", grad_filter)
        _checks.check_devices("sparse_zlpr", "logits", logits, positives=positives)
        _checks.check_sparse_zlpr_inputs(logits, positives, ignore_index, "none")
        _checks.check_kernel_dtype("sparse_zlpr", "logits", logits)
        return _fake_forward(logits, compute_grad, reduction)

    @torch.library.register_fake("kxops::zlpr_backward")
    def _zlpr_backward_fake(grad_loss, grad):
        _checks.check_devices("zlpr_backward", "grad", grad, grad_loss=grad_loss)
        _checks.check_kernel_dtype("zlpr_backward", "grad", grad)
        if grad.dim() == 0:
            raise ValueError("kxops.zlpr_backward: grad must have at least 1 dim (the class "
                             "dim), got a 0-dim tensor")
        _checks.check_grad_loss("zlpr_backward", grad_loss, grad.shape[:-1], "grad.shape[:-1]")
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def _zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), None, None, None

    def _sparse_zlpr_backward(ctx, grad_loss, grad_of_grad):
        return _logits_grad(ctx, grad_loss, grad_of_grad), *[None] * (ctx.num_args - 1)

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
