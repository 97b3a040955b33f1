"""The GlobalPointer heads, GlobalPointer and EfficientGlobalPointer: bert4torch's parameters,
names and RoPE, with the ZLPR loss fused (no span grid held)."""

import math
import operator

import torch
from torch import nn

from kxops._checks import check_grad_filter
from kxops.global_pointer_zlpr import global_pointer_zlpr_loss
from kxops.reference.global_pointer_zlpr import global_pointer_logits

__all__ = ["EfficientGlobalPointer", "GlobalPointer"]


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
            raise ValueError(f"kxops.global_pointer_zlpr: heads and head_size must be >= 1, got "
                             f"{heads}, {head_size}")
        if rope and head_size % 2:
            raise ValueError(f"kxops.global_pointer_zlpr: RoPE rotates pairs: head_size must be "
                             f"even, got {head_size}")
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
