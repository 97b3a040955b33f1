"""Fused linear + sparse ZLPR head: public function, fake kernels and autograd of
kxops::linear_sparse_zlpr and its recompute ops; label parallel over torch.distributed."""

import zlib

import torch
import torch.distributed as dist

from kxops import _checks, _ext
from kxops.reference import linear_sparse_zlpr as ref
from kxops.reference import zlpr as zlpr_ref


def block_rows_for(rows, weight):
    """The rows of logits per block that the loss picks for ``rows`` rows and this weight
    (block_rows None): the C++ driver's rule, asked of its CPU op (weight's shape and dtype
    only, on a zero-stride stand-in, whatever weight's device). Without the compiled ops, all
    rows: the reference holds every row's logits."""
    if not _ext.has_kernel("linear_sparse_zlpr", torch.device("cpu")):
        return max(rows, 1)
    shape_only = torch.empty((), dtype=weight.dtype).expand(weight.shape)
    return torch.ops.kxops.linear_sparse_zlpr_block_rows(shape_only, rows)


def linear_sparse_zlpr_loss(input: torch.Tensor, weight: torch.Tensor, positives: torch.Tensor,
                            bias=None, *, ignore_index: int = -1, reduction: str = "mean",
                            process_group=None, block_rows=None, grad_filter: float = 0.0):
    """``sparse_zlpr_loss(F.linear(input, weight, bias), positives)`` without the logits.

    ``input`` ``[..., d]`` (every leading index is a row), ``weight`` ``[C, d]`` and ``bias``
    ``[C]`` (``nn.Linear``'s layout), ``positives`` ``[..., P]`` int32/int64 class ids padded by
    ``ignore_index``; duplicates count once, an out-of-range id raises ``IndexError`` (CPU;
    a device-side assert on CUDA, as ``sparse_zlpr_loss``). Same loss and same gradients of
    ``input``, ``weight`` and ``bias``; the ZLPR math in fp32 (fp64 for fp64), the logits made
    in the input dtype as ``F.linear`` makes them (under autocast, in the autocast dtype).

    Memory: the logits exist one block of rows at a time, never ``[N, C]``. A block holds at
    most ``max(weight bytes, 128 MiB)`` of logits (``block_rows`` overrides the rows per
    block); beyond the inputs and the gradients, a step needs about two such blocks (the logits
    and their gradient) plus, for fp16/bf16, an fp32 accumulator of ``weight``'s gradient and a
    scratch of its size. At N 512, d 64, C 2^19 (1 GiB of fp32 logits) a forward+backward grows
    the peak memory by 0.38 GiB, ``weight.grad`` included.

    ``reduction`` ``"mean"``/``"sum"`` computes the gradients in the forward pass (three GEMMs
    per block, as the materialised path); ``"none"`` (per-row loss, ``input.shape[:-1]``)
    recomputes each block's logits in backward (four GEMMs), since the weight's gradient needs
    each row's upstream gradient; so does label parallel.

    ``process_group`` (label parallel): each rank holds a contiguous slice of the classes in
    rank order (``weight``/``bias`` are its rows); ``input`` and ``positives`` (global ids) are
    the same on every rank. Every rank returns the loss of the whole label set, the full
    ``input`` gradient, and its slice's ``weight``/``bias`` gradients. Forward all-gathers two
    numbers per row, backward all-reduces ``input``'s gradient; a bad argument on any rank
    raises on every rank (checked before the first data collective).

    Second derivatives (mean/sum, one process) run through the reference's autograd
    (materialised, unfiltered); ``"none"`` and label parallel refuse them.

    ``grad_filter`` (``f``, default 0: exact, bit for bit the call without it): skip the
    negligible negatives' gradients, as Cut Cross-Entropy does for single-label cross-entropy.
    The loss stays exact; in the gradient of each row's loss with respect to its logits
    (before the reduction's scale and the upstream gradient), every negative entry
    ``e^{s_j} / (1 + sum_neg e^s)`` below ``f`` is set to 0 (positives never), whatever the
    block size, thread count or device. The dropped entries are each below ``f`` and together
    below the row's negative gradient mass ``Z_neg / (1 + Z_neg) < 1``, so per row the logits'
    gradient changes by at most ``f`` per entry (max norm) and ``min(C * f, 1)`` in L1.
    Recommended: ``2**-12`` (bf16's resolution, Cut Cross-Entropy's choice): on a trained head
    a few hard negatives per row survive, and the two gradient GEMMs then run as sparse
    products over the surviving entries (CPU fp32/fp64; a block where more than 5% survive, or
    any other device or dtype, keeps the dense GEMMs). ``f`` must be a finite number >= 0
    (``ValueError`` otherwise).
    """
    grad_filter = _checks.check_grad_filter("linear_sparse_zlpr", grad_filter)
    # The logits GEMM runs in the autocast dtype, as F.linear's would.
    input, weight, bias = _ext.autocast(input, input, weight, bias)
    if process_group is not None:
        return _label_parallel(input, weight, bias, positives, ignore_index, reduction,
                               block_rows, process_group, grad_filter)
    block = _checks.check_block_rows(block_rows)
    _checks.check_linear_inputs(input, weight, bias, positives, ignore_index, reduction)
    if not _ext.runs_compiled("linear_sparse_zlpr", input):
        return ref.linear_sparse_zlpr_loss(input, weight, positives, bias,
                                           ignore_index=ignore_index, reduction=reduction,
                                           grad_filter=grad_filter)
    # "none": the gradients need each row's upstream gradient; backward computes them.
    grad_mask = [reduction != "none" and _ext.needs_grad(t) for t in (input, weight, bias)]
    # The op's grad_filter argument only when set: its default call stays the one of before.
    options = (grad_filter,) if grad_filter else ()
    loss = torch.ops.kxops.linear_sparse_zlpr(input, weight, bias, positives, ignore_index,
                                              reduction, grad_mask, block, *options)[0]
    return loss.to(input.dtype)


# ---- label parallel: per-row sums of each rank's class slice, merged over the ranks ----

def _slice_ops(input):
    if _ext.runs_compiled("linear_sparse_zlpr", input):
        return (torch.ops.kxops.linear_sparse_zlpr_partials,
                torch.ops.kxops.linear_sparse_zlpr_partials_backward)

    def partials(input, weight, bias, positives, ignore_index, offset, num_classes, block):
        return ref.slice_partials(input, weight, bias, positives, ignore_index, offset,
                                  num_classes)

    def backward(grad_loss, log_z, input, weight, bias, positives, ignore_index, offset,
                 num_classes, grad_mask, block, grad_filter):
        return ref.slice_partials_backward(grad_loss, log_z, input, weight, bias, positives,
                                           ignore_index, offset, num_classes, grad_filter)

    return partials, backward


class _Recompute(torch.autograd.Function):
    """Row losses ``log(1 + Z_neg) + log(1 + Z_pos)`` from each rank's partial sums merged over
    ``group``; backward recomputes the logits block by block given the merged sums and
    all-reduces ``input``'s gradient over the ranks."""

    @staticmethod
    def forward(ctx, input, weight, bias, positives, ignore_index, block, group, offset,
                num_classes, grad_filter):
        partials_op, _ = _slice_ops(input)
        args = (positives, ignore_index, offset, num_classes)
        partials = _merge_over_ranks(partials_op(input, weight, bias, *args, block), group)
        log_z = torch.logaddexp(partials, partials.new_zeros(()))
        ctx.save_for_backward(input, weight, bias, positives, log_z)
        ctx.config = (ignore_index, offset, num_classes, block, group, grad_filter)
        return log_z.sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        input, weight, bias, positives, log_z = ctx.saved_tensors
        ignore_index, offset, num_classes, block, group, grad_filter = ctx.config
        mask = list(ctx.needs_input_grad[:3])
        _, backward_op = _slice_ops(input)
        grad_input, grad_weight, grad_bias = backward_op(
            grad_loss, log_z, input, weight, bias, positives, ignore_index, offset, num_classes,
            mask, block, grad_filter)
        if mask[0]:
            torch.distributed.all_reduce(grad_input, group=group)
        return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
                grad_bias if mask[2] else None, None, None, None, None, None, None, None)


def _merge_over_ranks(partials, group):
    """Each row's log-sums over all ranks' slices (exact: a log-sum-exp of log-sums)."""
    gathered = [torch.empty_like(partials) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, partials.contiguous(), group=group)
    return torch.stack(gathered).logsumexp(0)


def _label_parallel(input, weight, bias, positives, ignore_index, reduction, block_rows,
                    group, grad_filter):
    """Checks every rank's arguments in one first collective (a bad argument raises on every
    rank, nothing waits for a rank that raised), then the recompute path over the ranks."""
    error, row = None, [0, 0, 0, 0, -1]
    try:  # whatever fails here (a bad argument, meta tensors) must reach every rank
        block = _checks.check_block_rows(block_rows)
        _checks.check_linear_inputs(input, weight, bias, positives, ignore_index, reduction)
        ids = positives.long()[positives.long() != ignore_index]
        shape = [input.dim(), *input.shape[:-1], input.shape[-1], positives.shape[-1]]
        # What must agree across ranks, reduced to a few integers; whether input needs a
        # gradient decides whether backward all-reduces it.
        key = zlib.crc32(repr((shape, str(input.dtype), ignore_index, reduction,
                               _ext.needs_grad(input), grad_filter)).encode())
        row = [1, weight.shape[0], key, int(ids.min()) if ids.numel() else 0,
               int(ids.max()) if ids.numel() else -1]
    except Exception as exc:
        error = exc
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = (input.device if isinstance(input, torch.Tensor) and input.device.type != "meta"
              else torch.device("cpu"))
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).tolist()
    if error is not None:
        raise error
    _checks.check_ranks_agree(table, ignore_index)
    sizes = [entry[1] for entry in table]
    offset, num_classes = sum(sizes[:rank]), sum(sizes)
    row_loss = _Recompute.apply(input, weight, bias, positives, ignore_index, block, group,
                                offset, num_classes, grad_filter)
    return zlpr_ref.reduce_loss(row_loss, reduction, input.dtype)


if _ext.LOADED:

    def _grads_fake(op, input, weight, bias, grad_mask):
        _checks.check_grad_mask(op, grad_mask, ("input", "weight", "bias"))
        present = (grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None)
        shapes = (input.shape, weight.shape, weight.shape[:1])
        # The kernels return contiguous gradients.
        return tuple(input.new_empty(shape if want else (0,))
                     for want, shape in zip(present, shapes))

    @torch.library.register_fake("kxops::linear_sparse_zlpr")
    def _forward_fake(input, weight, bias, positives, ignore_index, reduction, grad_mask,
                      block_rows, grad_filter=0.0):
        _checks.check_linear_op_arguments("linear_sparse_zlpr", input, weight, bias, positives,
                                          ignore_index, block_rows, grad_filter)
        _checks.check_reduction("linear_sparse_zlpr", reduction)
        loss = input.new_empty(input.shape[:-1] if reduction == "none" else (),
                               dtype=zlpr_ref.opmath_dtype(input.dtype))
        return (loss, *_grads_fake("linear_sparse_zlpr", input, weight, bias, grad_mask))

    @torch.library.register_fake("kxops::linear_sparse_zlpr_backward")
    def _backward_fake(grad_loss, input, weight, bias, positives, ignore_index, grad_mask,
                       block_rows, grad_filter=0.0):
        op = "linear_sparse_zlpr_backward"
        _checks.check_linear_op_arguments(op, input, weight, bias, positives, ignore_index,
                                          block_rows, grad_filter, grad_loss=grad_loss)
        _checks.check_grad_loss(op, grad_loss, input.shape[:-1], "input.shape[:-1]")
        return _grads_fake(op, input, weight, bias, grad_mask)

    @torch.library.register_fake("kxops::linear_sparse_zlpr_partials")
    def _partials_fake(input, weight, bias, positives, ignore_index, class_offset, num_classes,
                       block_rows):
        op = "linear_sparse_zlpr_partials"
        _checks.check_linear_op_arguments(op, input, weight, bias, positives, ignore_index,
                                          block_rows)
        _checks.check_class_slice(op, weight, class_offset, num_classes)
        return input.new_empty((*input.shape[:-1], 2),
                               dtype=zlpr_ref.opmath_dtype(input.dtype))

    @torch.library.register_fake("kxops::linear_sparse_zlpr_partials_backward")
    def _partials_backward_fake(grad_loss, log_z, input, weight, bias, positives, ignore_index,
                                class_offset, num_classes, grad_mask, block_rows,
                                grad_filter=0.0):
        op = "linear_sparse_zlpr_partials_backward"
        _checks.check_linear_op_arguments(op, input, weight, bias, positives, ignore_index,
                                          block_rows, grad_filter, grad_loss=grad_loss,
                                          log_z=log_z)
        _checks.check_class_slice(op, weight, class_offset, num_classes)
        _checks.check_grad_loss(op, grad_loss, input.shape[:-1], "input.shape[:-1]")
        _checks.check_log_z(op, log_z, input)
        return _grads_fake(op, input, weight, bias, grad_mask)

    def _setup_context(ctx, inputs, output):
        input, weight, bias, positives, ignore_index, reduction, grad_mask, block_rows = inputs[:8]
        ctx.save_for_backward(input, weight, bias, positives, *output[1:])
        ctx.options = tuple(inputs[8:])  # grad_filter, where given
        ctx.config = (ignore_index, reduction, tuple(grad_mask), block_rows)
        # The gradient outputs are internal: no zeros for their "gradients" per backward.
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_loss, *grads_of_grads):
        """Mean/sum: the forward's gradients times grad_loss (a scalar); a gradient the forward
        was not asked for (a direct call of the op) is computed by the op again. "none": the
        backward op, the logits recomputed. A gradient reaching the gradient outputs (a double
        backward) adds their Hessian-vector product, through the reference's autograd
        (materialised: second derivatives are not the fused path's purpose)."""
        input, weight, bias, positives, *saved = ctx.saved_tensors
        ignore_index, reduction, grad_mask, block_rows = ctx.config
        wanted = ctx.needs_input_grad[:3]
        total = [None, None, None]
        if grad_loss is not None and reduction == "none":
            total = torch.ops.kxops.linear_sparse_zlpr_backward(
                grad_loss, input, weight, bias, positives, ignore_index, list(wanted),
                block_rows, *ctx.options)
        elif grad_loss is not None:
            if any(w and not m for w, m in zip(wanted, grad_mask)):
                saved = torch.ops.kxops.linear_sparse_zlpr(input, weight, bias, positives,
                                                           ignore_index, reduction,
                                                           list(wanted), block_rows,
                                                           *ctx.options)[1:]
            # x * 1 is x: the op's gradients as they are, unless the graph is kept (its saved
            # gradients would be handed out as they are).
            one = _ext.grad_is_one(grad_loss) and not _ext.graph_kept()
            total = [(g if one else g * grad_loss) if w else None for g, w in zip(saved, wanted)]
        if any(g is not None for g in grads_of_grads):
            hvp = _reference_hvp(input, weight, bias, positives, ignore_index, reduction,
                                 grads_of_grads)
            total = [h if t is None else t if h is None else t + h for t, h in zip(total, hvp)]
        return (*[t if w else None for t, w in zip(total, wanted)],
                *(None,) * (5 + len(ctx.options)))

    def _reference_hvp(input, weight, bias, positives, ignore_index, reduction, vectors):
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in
                      (input, weight, bias)]
            # The forward checked the ids' range (a check here would sync, and break tracing).
            logits = torch.nn.functional.linear(*leaves)
            labels = zlpr_ref.positives_to_dense(positives, ignore_index, logits.shape[-1])
            # The gradient outputs are those of the mean, or of the sum of the row losses.
            loss = zlpr_ref.reduce_loss(zlpr_ref.zlpr_row_loss(logits, labels),
                                        "mean" if reduction == "mean" else "sum", logits.dtype)
            pairs = [(leaf, v) for leaf, v in zip(leaves, vectors)
                     if leaf is not None and v is not None and v.numel()]
            if not pairs:
                return [None, None, None]
            present = [leaf for leaf in leaves if leaf is not None]
            grads = torch.autograd.grad(loss, [leaf for leaf, _ in pairs], create_graph=True)
            hvp = torch.autograd.grad(grads, present, [v for _, v in pairs], allow_unused=True)
        found = iter(hvp)
        return [None if leaf is None else next(found) for leaf in leaves]

    torch.library.register_autograd("kxops::linear_sparse_zlpr", _backward,
                                    setup_context=_setup_context)

    def _not_differentiable(op):
        def backward(ctx, *grads):
            raise NotImplementedError(
                f"kxops.{op}: not differentiable by autograd; kxops.linear_sparse_zlpr_loss "
                "differentiates it (it is part of a custom backward)")
        return backward

    for _op in ("linear_sparse_zlpr_backward", "linear_sparse_zlpr_partials",
                "linear_sparse_zlpr_partials_backward"):
        torch.library.register_autograd(f"kxops::{_op}", _not_differentiable(_op),
                                        setup_context=lambda ctx, inputs, output: None)
