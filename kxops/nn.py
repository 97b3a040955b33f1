"""Modules over the kxops ops: DilatedGatedConv1d, DGCNN, ZLPRLoss, SparseZLPRLoss,
GlobalPointer, EfficientGlobalPointer."""

import math
import operator

import torch
from torch import nn

from kxops._checks import check_dilation, check_drop_gate, check_grad_filter
from kxops.gated_conv import dilated_gated_conv1d
from kxops.global_pointer_zlpr import global_pointer_zlpr_loss
from kxops.reference.global_pointer_zlpr import global_pointer_logits
from kxops.zlpr import sparse_zlpr_loss, zlpr_loss

__all__ = ["DGCNN", "DilatedGatedConv1d", "EfficientGlobalPointer", "GlobalPointer",
           "SparseZLPRLoss", "ZLPRLoss"]


def _init_like_conv1d(weight, bias):
    """nn.Conv1d.reset_parameters: kaiming_uniform(a=sqrt(5)) and U(-1/sqrt(fan_in), ...)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class DilatedGatedConv1d(nn.Module):
    """One DGCNN block on ``[batch, time, channels]`` activations (see
    ``kxops.dilated_gated_conv1d``).

    Parameters use the ``nn.Conv1d(in, 2*out, kernel_size)`` layout: ``weight`` ``[2*out, in,
    k]`` (value half first, gate half second) and ``bias`` ``[2*out]``. When ``residual`` and
    ``out != in``, a 1x1 projection ``residual_weight`` ``[out, in, 1]`` (+ ``residual_bias``)
    maps ``x`` to the residual path.
    """

    def __init__(self, in_channels, out_channels=None, kernel_size=3, dilation=1,
                 drop_gate=0.0, residual=True, bias=True, *, device=None, dtype=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        # Python ints from here on (NumPy integers accepted), so the shapes are plain ints.
        in_channels, out_channels, kernel_size = (
            operator.index(v) for v in (in_channels, out_channels, kernel_size))
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got in={in_channels}, out={out_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a 'same' convolution, got "
                             f"{kernel_size}")
        dilation, drop_gate = check_dilation(dilation), check_drop_gate(drop_gate)
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.drop_gate, self.residual = drop_gate, residual
        self.weight = nn.Parameter(torch.empty(2 * out_channels, in_channels, kernel_size,
                                               **factory))
        self.bias = nn.Parameter(torch.empty(2 * out_channels, **factory)) if bias else None
        if residual and out_channels != in_channels:
            self.residual_weight = nn.Parameter(torch.empty(out_channels, in_channels, 1,
                                                            **factory))
            self.residual_bias = (nn.Parameter(torch.empty(out_channels, **factory)) if bias
                                  else None)
        else:
            self.residual_weight = self.residual_bias = None
        self.reset_parameters()

    def reset_parameters(self):
        _init_like_conv1d(self.weight, self.bias)
        if self.residual_weight is not None:
            _init_like_conv1d(self.residual_weight, self.residual_bias)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, *, drop_gate=0.0, residual=True, residual_conv=None):
        """Build a block from an ``nn.Conv1d(in, 2*out, k, dilation=d, padding='same')``
        (value channels first), and the 1x1 ``residual_conv`` when ``out != in``."""
        pad = conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
        if (conv.groups != 1 or conv.stride != (1,) or conv.padding_mode != "zeros"
                or conv.padding not in ("same", (pad,))):
            raise ValueError("from_conv1d needs a stride-1, groups-1 conv with zero 'same' "
                             f"padding, got {conv}")
        out_channels = conv.out_channels // 2
        block = cls(conv.in_channels, out_channels, conv.kernel_size[0], conv.dilation[0],
                    drop_gate, residual, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None:
                block.bias.copy_(conv.bias)
            if block.residual_weight is None:
                if residual_conv is not None:
                    raise ValueError("residual_conv is given but the block has no projection "
                                     f"(out_channels == in_channels or residual=False): {block}")
            else:
                check_residual_conv(residual_conv, block)
                block.residual_weight.copy_(residual_conv.weight)
                if block.residual_bias is not None:
                    block.residual_bias.copy_(residual_conv.bias)
        return block

    def forward(self, x, mask=None):
        return dilated_gated_conv1d(
            x, self.weight, self.bias, mask, dilation=self.dilation, drop_gate=self.drop_gate,
            training=self.training, residual=self.residual,
            residual_weight=self.residual_weight, residual_bias=self.residual_bias)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, drop_gate={self.drop_gate}, "
                f"residual={self.residual}, bias={self.bias is not None}")


def check_residual_conv(residual_conv, block):
    """The 1x1 projection that from_conv1d copies: its shape, and a bias exactly when the
    block has one (the block's residual bias follows the conv's bias)."""
    if residual_conv is None:
        raise ValueError(f"out_channels={block.out_channels} != in_channels="
                         f"{block.in_channels}: pass residual_conv (1x1 nn.Conv1d)")
    want = (block.out_channels, block.in_channels, 1)
    if tuple(residual_conv.weight.shape) != want:
        raise ValueError(f"residual_conv must be nn.Conv1d({block.in_channels}, "
                         f"{block.out_channels}, 1), got weight shape "
                         f"{tuple(residual_conv.weight.shape)}")
    if (residual_conv.bias is None) != (block.residual_bias is None):
        raise ValueError("residual_conv must have a bias exactly when the conv has one "
                         f"(conv bias: {block.residual_bias is not None}, residual_conv bias: "
                         f"{residual_conv.bias is not None})")


class DGCNN(nn.Module):
    """A stack of residual DilatedGatedConv1d blocks of width ``dim``, one per dilation."""

    def __init__(self, dim, dilations=(1, 2, 5, 1, 2, 5, 1, 2, 5, 1, 1, 1), kernel_size=3,
                 drop_gate=0.1, *, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            DilatedGatedConv1d(dim, dim, kernel_size, d, drop_gate, device=device, dtype=dtype)
            for d in dilations)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class ZLPRLoss(nn.Module):
    """``kxops.zlpr_loss`` as a module: ``forward(logits, labels)``."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, labels):
        return zlpr_loss(logits, labels, reduction=self.reduction)


class SparseZLPRLoss(nn.Module):
    """``kxops.sparse_zlpr_loss`` as a module: ``forward(logits, positives)``."""

    def __init__(self, ignore_index=-1, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, positives):
        return sparse_zlpr_loss(logits, positives, ignore_index=self.ignore_index,
                                reduction=self.reduction)


# ---- the fused linear + sparse ZLPR head ----

from kxops.linear_sparse_zlpr import block_rows_for, linear_sparse_zlpr_loss  # noqa: E402

__all__ += ["LinearZLPR"]


class LinearZLPR(nn.Module):
    """A linear classification head over ``num_labels`` labels trained with the sparse ZLPR
    loss without its ``[N, num_labels]`` logits (``kxops.linear_sparse_zlpr_loss``): for
    extreme multi-label heads (hundreds of thousands of labels).

    ``weight`` ``[num_labels, in_features]`` and ``bias`` ``[num_labels]`` have ``nn.Linear``'s
    names, layout and initialisation (a trained ``nn.Linear``'s state dict loads as is).
    How the loss is taken is fixed at construction, as in torch's loss modules:
    ``ignore_index``, ``reduction``, ``process_group`` (label parallel: this module holds its
    rank's contiguous slice of the labels, in rank order, and ``num_labels`` is the slice's
    size; see ``linear_sparse_zlpr_loss``), ``block_rows`` (rows of logits per block; None:
    chosen from the sizes) and ``grad_filter`` (0: exact; ``2**-12`` recommended: skip the
    negligible negatives' gradients, see ``linear_sparse_zlpr_loss``).

    ``forward(input, positives)`` is the loss; ``logits(input)`` the full ``[..., num_labels]``
    scores (materialised); ``predict`` the top-k labels or the labels above a threshold, one
    block of rows at a time. ``logits`` and ``predict`` see this module's own labels (its
    slice under label parallel, numbered from 0).
    """

    def __init__(self, in_features, num_labels, bias=True, *, ignore_index=-1,
                 reduction="mean", process_group=None, block_rows=None, grad_filter=0.0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.num_labels = num_labels
        # The loss's options, kept as torch's loss modules keep theirs.
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.process_group = process_group
        self.block_rows = block_rows
        self.grad_filter = check_grad_filter("linear_sparse_zlpr", grad_filter)
        self.weight = nn.Parameter(torch.empty(num_labels, in_features, device=device,
                                               dtype=dtype))
        self.register_parameter("bias", nn.Parameter(torch.empty(
            num_labels, device=device, dtype=dtype)) if bias else None)
        self.reset_parameters()

    reset_parameters = nn.Linear.reset_parameters

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A head that shares ``linear``'s weight and bias (the same Parameter objects: training
        either trains both). ``kwargs``: the constructor's keywords but device and dtype."""
        head = cls(linear.in_features, linear.out_features, linear.bias is not None,
                   device="meta", **kwargs)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_labels={self.num_labels}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}"
                + (f", grad_filter={self.grad_filter}" if self.grad_filter else ""))

    def forward(self, input, positives):
        return linear_sparse_zlpr_loss(input, self.weight, positives, self.bias,
                                       ignore_index=self.ignore_index, reduction=self.reduction,
                                       process_group=self.process_group,
                                       block_rows=self.block_rows, grad_filter=self.grad_filter)

    def logits(self, input):
        """``input @ weight.T + bias``: ``[..., num_labels]``, materialised."""
        return nn.functional.linear(input, self.weight, self.bias)

    @torch.no_grad()
    def predict(self, input, k=None, threshold=0.0):
        """Top-``k`` ``(scores, indices)`` per row (each ``[..., k]``) when ``k`` is given, as
        ``logits(input).topk(k)``; otherwise the ``(row..., label)`` index pairs whose score is
        above ``threshold``, ``[M, input.dim()]``, as ``(logits(input) > threshold).nonzero()``.
        The logits exist one block of rows at a time (the loss's block size); a block's GEMM
        may round differently from one over all rows (BLAS picks its kernel by shape), so a
        score can differ from ``logits(input)``'s in its last bit."""
        if not isinstance(input, torch.Tensor) or input.dim() < 1:
            raise ValueError("predict: input must be a tensor [..., in_features]")
        if input.shape[-1] != self.in_features:
            raise ValueError(f"predict: input must have {self.in_features} features, got "
                             f"{input.shape[-1]}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)
                              or not 0 <= k <= self.num_labels):
            raise ValueError(f"predict: k must be an int in [0, {self.num_labels}], got {k!r}")
        lead = input.shape[:-1]
        rows = input.reshape(-1, self.in_features)
        step = self.block_rows or block_rows_for(rows.shape[0], self.weight)
        # Zero rows still make one (empty) block: the scores' dtype is the logits' (autocast).
        starts = range(0, max(rows.shape[0], 1), step)
        if k is not None:
            tops = [self.logits(rows[start:start + step]).topk(k, dim=-1) for start in starts]
            scores = torch.cat([top.values for top in tops])
            indices = torch.cat([top.indices for top in tops])
            return scores.view(*lead, k), indices.view(*lead, k)
        pairs = []
        for start in starts:
            found = (self.logits(rows[start:start + step]) > threshold).nonzero()
            found[:, 0] += start
            pairs.append(found)
        pairs = torch.cat(pairs)
        row_index = torch.unravel_index(pairs[:, 0], lead) if lead else ()
        return torch.stack([*row_index, pairs[:, 1]], -1)
# GlobalPointer heads: bert4torch's parameters, names and RoPE; the loss fused (no grid).

def _rope(x):
    """RoPE as bert4torch's GlobalPointer applies it: adjacent pairs, base 10000, positions
    0..L-1 along dim -2 of ``x`` ``[..., L, D]``; the tables are built in fp32 whatever x's
    dtype and then cast to it, as bert4torch does."""
    length, dim = x.shape[-2], x.shape[-1]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=x.device).float()
                         * (-math.log(10000.0) / dim))
    position = torch.arange(length, device=x.device, dtype=torch.float)
    angles = (position[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(x)
    return x * cos + rotated * sin


# Scores held at once by decode: blocks of start rows of one sequence, all heads.
_DECODE_SCORES = 2**22


class _GlobalPointerBase(nn.Module):
    """What both heads share: the grid for inspection, the fused loss and decoding.
    Subclasses give ``_projections(hidden) -> (q, k, start_bias, end_bias)`` with q, k
    ``[B, heads, L, head_size]`` (RoPE and the 1/sqrt(head_size) scale applied)."""

    def __init__(self, heads, head_size, rope, tril_mask, grad_filter):
        super().__init__()
        self.grad_filter = check_grad_filter("global_pointer_zlpr", grad_filter)
        heads, head_size = operator.index(heads), operator.index(head_size)
        if heads < 1 or head_size < 1:
            raise ValueError(f"heads and head_size must be >= 1, got {heads}, {head_size}")
        if rope and head_size % 2:
            raise ValueError(f"RoPE rotates pairs: head_size must be even, got {head_size}")
        self.heads, self.head_size = heads, head_size
        self.rope, self.tril_mask = bool(rope), bool(tril_mask)

    def _rotate_and_scale(self, q, k):
        if self.rope:
            q, k = _rope(q), _rope(k)
        return q / self.head_size ** 0.5, k

    def forward(self, hidden, mask=None):
        """The span scores ``[B, heads, L, L]`` (``-inf`` at masked spans), for inspection:
        train with ``.loss``, which never builds them."""
        q, k, start, end = self._projections(hidden)
        return global_pointer_logits(q, k, mask, start_bias=start, end_bias=end,
                                     tril=self.tril_mask)

    def loss(self, hidden, mask, positives, *, ignore_index=-1, reduction="mean",
             grad_filter=None):
        """``kxops.global_pointer_zlpr_loss`` of the scores, without the grid. ``mask``
        ``[B, L]`` (bool or 0/1, nonzero = keep, or None); ``positives`` ``[B, heads, P]`` span
        ids ``start * L + end``; ``grad_filter``: None takes the constructor's."""
        q, k, start, end = self._projections(hidden)
        return global_pointer_zlpr_loss(
            q, k, positives, mask, start_bias=start, end_bias=end, tril=self.tril_mask,
            ignore_index=ignore_index, reduction=reduction,
            grad_filter=self.grad_filter if grad_filter is None else grad_filter)

    @torch.no_grad()
    def decode(self, hidden, mask=None, threshold=0.0):
        """The spans scored above ``threshold`` as a LongTensor ``[n, 4]`` of
        ``(batch, head, start, end)``, sorted; masked spans never count. Scores are computed a
        block of start rows at a time (at most ``2**22`` scores at once), never the grid; a
        block's GEMM may round differently from ``forward``'s (BLAS picks its kernel by shape),
        so a score exactly at the threshold can fall on the other side of it."""
        q, k, start, end = self._projections(hidden)
        batch, heads, length, _ = q.shape
        steps = torch.arange(length, device=q.device)
        keep = None if mask is None else mask != 0
        rows = max(1, _DECODE_SCORES // max(heads * length, 1))
        found = [torch.empty(0, 4, dtype=torch.long, device=q.device)]
        for b in range(batch):
            for i0 in range(0, length, rows):
                i1 = min(i0 + rows, length)
                scores = q[b, :, i0:i1] @ k[b].transpose(-1, -2)
                if start is not None:
                    scores = scores + start[b, :, i0:i1, None]
                if end is not None:
                    scores = scores + end[b, :, None, :]
                hit = scores > threshold
                if self.tril_mask:
                    hit &= steps[i0:i1, None] <= steps[None, :]
                if keep is not None:
                    hit &= keep[b, i0:i1, None] & keep[b, None, :]
                h, i, j = hit.nonzero(as_tuple=True)
                found.append(torch.stack([torch.full_like(h, b), h, i + i0, j], 1))
        spans = torch.cat(found)
        key = ((spans[:, 0] * heads + spans[:, 1]) * length + spans[:, 2]) * length + spans[:, 3]
        return spans[torch.argsort(key)]

    def extra_repr(self):
        return (f"heads={self.heads}, head_size={self.head_size}, rope={self.rope}, "
                f"tril_mask={self.tril_mask}"
                + (f", grad_filter={self.grad_filter}" if self.grad_filter else ""))


class GlobalPointer(_GlobalPointerBase):
    """GlobalPointer (span scores per head from ``q_i . k_j``) with bert4torch's layout:
    ``dense`` ``nn.Linear(hidden_size, heads * head_size * 2)`` whose output is ``heads``
    blocks of ``[q, k]``, RoPE on both, scores scaled by ``1/sqrt(head_size)``, so that a
    trained bert4torch ``GlobalPointer`` loads with ``load_state_dict`` and scores the same."""

    def __init__(self, hidden_size, heads, head_size=64, rope=True, use_bias=True,
                 tril_mask=True, *, grad_filter=0.0, device=None, dtype=None):
        super().__init__(heads, head_size, rope, tril_mask, grad_filter)
        self.dense = nn.Linear(hidden_size, self.heads * self.head_size * 2, bias=use_bias,
                               device=device, dtype=dtype)

    def _projections(self, hidden):
        out = self.dense(hidden)
        out = out.view(*out.shape[:-1], self.heads, 2 * self.head_size).transpose(1, 2)
        q, k = self._rotate_and_scale(out[..., :self.head_size], out[..., self.head_size:])
        return q, k, None, None


class EfficientGlobalPointer(_GlobalPointerBase):
    """Efficient GlobalPointer with bert4torch's layout: ``p_dense``
    ``nn.Linear(hidden_size, head_size * 2)`` gives one ``[q, k]`` shared by all heads (RoPE,
    ``1/sqrt(head_size)``), and ``q_dense`` ``nn.Linear(head_size * 2, heads * 2)`` on the
    pre-RoPE ``p_dense`` output gives each head's start and end biases, halved, as bert4torch
    does; a trained bert4torch ``EfficientGlobalPointer`` loads and scores the same."""

    def __init__(self, hidden_size, heads, head_size=64, rope=True, use_bias=True,
                 tril_mask=True, *, grad_filter=0.0, device=None, dtype=None):
        super().__init__(heads, head_size, rope, tril_mask, grad_filter)
        factory = dict(bias=use_bias, device=device, dtype=dtype)
        self.p_dense = nn.Linear(hidden_size, self.head_size * 2, **factory)
        self.q_dense = nn.Linear(self.head_size * 2, self.heads * 2, **factory)

    def _projections(self, hidden):
        out = self.p_dense(hidden)
        batch, length = out.shape[:2]
        q, k = self._rotate_and_scale(out[..., :self.head_size], out[..., self.head_size:])
        # The shared q, k as stride-0 views over the heads: no copies.
        shape = (batch, self.heads, length, self.head_size)
        q, k = q[:, None].expand(shape), k[:, None].expand(shape)
        bias = self.q_dense(out).view(batch, length, self.heads, 2).transpose(1, 2) / 2
        return q, k, bias[..., 0], bias[..., 1]
