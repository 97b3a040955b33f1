"""GlobalPointer span grid + sparse ZLPR without the grid: the public function, fake kernel and
autograd of kxops::global_pointer_zlpr."""

import torch

from kxops import _checks, _ext
from kxops.reference import global_pointer_zlpr as ref
from kxops.reference.zlpr import in_dtype, opmath_dtype

_OP = "global_pointer_zlpr"


def global_pointer_zlpr_loss(q: torch.Tensor, k: torch.Tensor, positives: torch.Tensor,
                             mask=None, *, start_bias=None, end_bias=None, tril: bool = True,
                             ignore_index: int = -1, reduction: str = "mean", block_bytes=None,
                             grad_filter: float = 0.0):
    """Sparse ZLPR loss of GlobalPointer's span grid, without building the grid.

    Equals ``kxops.sparse_zlpr_loss`` on each ``(batch, head)`` row of the grid
    ``s_ij = q_i . k_j + start_bias_i + end_bias_j`` (``[B, heads, L, L]`` flattened to
    ``L*L`` classes), with ``-inf`` at spans whose ``i`` or ``j`` is a padded step and below the
    diagonal (``i > j``) when ``tril``; and its gradients of ``q``, ``k``, ``start_bias`` and
    ``end_bias``.

    ``q``, ``k``: ``[B, heads, L, D]``, RoPE and the ``1/sqrt(D)`` scale already applied;
    ``start_bias``, ``end_bias``: ``[B, heads, L]`` or None; ``positives``: int32/int64
    ``[B, heads, P]`` of span ids ``i*L + j``, padded with ``ignore_index`` (duplicates count
    once; a positive at a masked span is ignored; an id outside ``[0, L*L)`` raises
    ``IndexError`` on CPU, a device-side assert on CUDA); ``mask``: ``[B, L]`` bool or 0/1
    integer or float, nonzero = keep (None: all kept). Padded steps take no part: their values,
    even NaN, reach neither the loss nor a gradient (zero there). NaN/inf at a valid step
    propagate as in the materialised path, to its own (batch, head) row only; there the
    materialised backward may give NaN at more places (it multiplies the zero gradient of a
    masked span by an infinite q or k: 0 * inf), the fused op never computing those spans.
    ``reduction`` over the ``(batch, head)`` rows: ``none`` gives ``[B, heads]``. The logits
    are produced in the inputs' dtype (as the grid's GEMM would be), the ZLPR math is fp32
    (fp64 for fp64 inputs), gradients are accumulated in fp32 and returned in the inputs'
    dtype. Under autocast, q, k
    and the biases run in the autocast dtype, as a matmul would (float64 is left alone).

    Memory: the compiled op never holds the grid. Per batch it gathers the valid steps and
    scores, a few heads at a time, only the unmasked spans (under ``tril`` the upper trapezoid
    of row blocks: the masked half is never computed). The packed logits of those heads and
    their gradient stay within ``block_bytes`` (default: a quarter of the materialised grid's
    bytes, within [8 MiB, 32 MiB]), or, if that is larger, one ``(batch, head)``'s spans
    (about ``L*L/2`` under ``tril``) and their gradient per CPU thread (the CPU splits the
    ``(batch, head)`` rows among its threads); beyond that it holds those heads' gathered q, k
    and their gradients (fp32). The gradients are computed in the forward when an input
    requires grad (three GEMMs per block, no recomputation); the backward scales them per row.
    Second derivatives are not supported (use ``kxops.reference.global_pointer_zlpr_loss``).

    ``grad_filter`` (default 0: exact): as ``kxops.linear_sparse_zlpr_loss``'s, on each
    ``(batch, head)`` row of spans: a negative span whose own gradient is below it gets none
    (the loss is unchanged); the spans near the positives survive, and each block's two
    gradient GEMMs run as sparse products over them where few enough survive (CPU fp32/fp64).
    Without a compiled kernel for the device (or under a ``torch.func`` transform) the
    materialised reference runs.
    """
    # The span scores run in the autocast dtype, as a matmul's would.
    q, k, start_bias, end_bias = _ext.autocast(q, q, k, start_bias, end_bias)
    _checks.check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril,
                                        ignore_index, reduction)
    block_bytes = _checks.check_global_pointer_block_bytes(block_bytes)
    grad_filter = _checks.check_grad_filter(_OP, grad_filter)
    if not _ext.runs_compiled(_OP, q):
        return ref.global_pointer_zlpr_loss(q, k, positives, mask, start_bias=start_bias,
                                            end_bias=end_bias, tril=tril,
                                            ignore_index=ignore_index, reduction=reduction,
                                            grad_filter=grad_filter)
    grad_mask = [_ext.needs_grad(t) for t in (q, k, start_bias, end_bias)]
    loss = torch.ops.kxops.global_pointer_zlpr(q, k, positives, mask, start_bias, end_bias, tril,
                                               ignore_index, reduction, grad_mask, block_bytes,
                                               grad_filter)[0]
    return in_dtype(loss, q.dtype)


if _ext.LOADED:

    @torch.library.register_fake("kxops::global_pointer_zlpr")
    def _global_pointer_zlpr_fake(q, k, positives, mask, start_bias, end_bias, tril,
                                  ignore_index, reduction, grad_mask, block_bytes=None,
                                  grad_filter=0.0):
        _checks.check_devices(_OP, "q", q, k=k, positives=positives, mask=mask,
                              start_bias=start_bias, end_bias=end_bias)
        _checks.check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril,
                                            ignore_index, reduction)
        _checks.check_kernel_dtype(_OP, "q", q)
        _checks.check_global_pointer_block_bytes(block_bytes)
        _checks.check_grad_filter(_OP, grad_filter)
        _checks.check_grad_mask(_OP, grad_mask, ("q", "k", "start_bias", "end_bias"))
        loss = q.new_empty(q.shape[:2] if reduction == "none" else (),
                           dtype=opmath_dtype(q.dtype))
        # The kernel returns contiguous gradients.
        shapes = (q.shape, q.shape, None if start_bias is None else q.shape[:3],
                  None if end_bias is None else q.shape[:3])
        return (loss, *(q.new_empty(shape if wanted and shape is not None else (0,))
                        for wanted, shape in zip(grad_mask, shapes)))

    def _setup_context(ctx, inputs, output):
        q, k, positives, mask, start_bias, end_bias, tril, ignore_index, reduction, grad_mask = (
            inputs[:10])
        ctx.num_inputs = len(inputs)
        ctx.config = (tril, ignore_index, reduction)
        ctx.options = inputs[10:]  # block_bytes, grad_filter
        differentiable = (q, k, start_bias, end_bias)
        # A present input whose gradient the forward did not compute (a direct call): the
        # backward computes it from the saved inputs.
        ctx.recompute = any(t is not None and not wanted
                            for t, wanted in zip(differentiable, grad_mask))
        saved = [mask, *output[1:]]
        if ctx.recompute:
            saved += [q, k, positives, start_bias, end_bias]
        ctx.save_for_backward(*saved)
        # The gradient outputs are internal: no gradient flows into them (and no zeros are
        # materialised for them on every backward).
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def _scaled(grad, scale, padded):
        """The gradient times its upstream gradient; 0 at padded steps even for an infinite or
        NaN upstream gradient (padded steps take no part, as in the reference)."""
        scaled = (grad * scale).to(grad.dtype)
        return scaled if padded is None else scaled.masked_fill_(padded, 0)

    def _backward(ctx, grad_loss, *_):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "kxops.global_pointer_zlpr_loss does not support double backward (second-order "
                "gradients); use kxops.reference.global_pointer_zlpr_loss for them")
        if grad_loss is None:
            return (None,) * ctx.num_inputs
        wanted = [ctx.needs_input_grad[i] for i in (0, 1, 4, 5)]  # q, k, start_bias, end_bias
        mask, *grads = ctx.saved_tensors[:5]
        if ctx.recompute:
            q, k, positives, start_bias, end_bias = ctx.saved_tensors[5:]
            grads = torch.ops.kxops.global_pointer_zlpr(q, k, positives, mask, start_bias,
                                                        end_bias, *ctx.config, wanted,
                                                        *ctx.options)[1:]
        # The op's gradients are those of its loss (for "none", of the rows' sum), and each
        # row's touches only its own (batch, head) slice: scale each slice by the row's
        # upstream gradient (one value for "mean" and "sum").
        # Not where the graph is kept: the saved gradients would be handed out as they are.
        if _ext.grad_is_one(grad_loss) and not _ext.graph_kept():
            # x * 1 is x, and padded steps are 0 already: the op's gradients as they are.
            return (*(g if w else None for g, w in zip(grads[:2], wanted[:2])), None, None,
                    *(g if w else None for g, w in zip(grads[2:], wanted[2:])),
                    *(None,) * (ctx.num_inputs - 6))
        scale = grad_loss[..., None]
        padded = None if mask is None else (mask == 0)[:, None, :]  # [B, 1, L]
        scales = (scale[..., None], scale[..., None], scale, scale)
        paddings = (None if padded is None else padded[..., None],) * 2 + (padded, padded)
        grad_q, grad_k, grad_start, grad_end = (
            _scaled(g, s, p) if w else None
            for g, s, p, w in zip(grads, scales, paddings, wanted))
        return (grad_q, grad_k, None, None, grad_start, grad_end,
                *(None,) * (ctx.num_inputs - 6))

    torch.library.register_autograd("kxops::global_pointer_zlpr", _backward,
                                    setup_context=_setup_context)
