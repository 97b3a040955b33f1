"""Every Python argument check of kxops, shared by the wrappers, the references and the fake
kernels (docs/design.md §4, "The op contract"). The registered C++ ops check the same in the
same words (csrc/checks.h and csrc/<op>_host.h): every message starts with ``kxops.<op>:``,
the registered op's name, and prints shapes as tuples and dtypes as torch prints them. Error
types: TypeError for a wrong type or dtype, ValueError for a bad value or shape, IndexError
for an out-of-range id, RuntimeError for tensors on different devices.

This module imports torch only: the references import it, never the other way round.
"""

import math
import numbers
import operator
import sys

import torch

# The floating dtypes of every compiled kernel (csrc/checks.h is_kernel_float).
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_kernel_dtype(op: str, name: str, tensor: torch.Tensor) -> None:
    """A tensor that the C++ kernels take in KERNEL_DTYPES only."""
    if tensor.dtype not in KERNEL_DTYPES:
        raise TypeError(f"kxops.{op}: {name} must be a float64, float32, float16 or bfloat16 "
                        f"tensor, got {tensor.dtype}")


def check_grad_loss(op: str, grad_loss: torch.Tensor, rows_shape, rows_name: str) -> None:
    """A backward op's grad_loss: one value per row."""
    check_kernel_dtype(op, "grad_loss", grad_loss)
    if grad_loss.shape != rows_shape:
        raise ValueError(f"kxops.{op}: grad_loss shape {tuple(grad_loss.shape)} must be "
                         f"{rows_name} = {tuple(rows_shape)}")


def check_devices(op: str, anchor_name: str, anchor, **tensors) -> None:
    """Every tensor on the anchor's device. The fake (meta) kernels run for every call with a
    meta tensor among its arguments, so a mix of meta and real tensors reaches them: they refuse
    it as the C++ kernels' device check does, instead of returning empty tensors. Lists of
    tensors are checked element by element."""
    if not isinstance(anchor, torch.Tensor):
        return  # None or another type: the op's own checks name it ("must be a Tensor")
    for name, value in tensors.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(items):
            if isinstance(t, torch.Tensor) and t.device != anchor.device:
                label = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise RuntimeError(f"kxops.{op}: {label} is on {t.device} but {anchor_name} is "
                                   f"on {anchor.device}; put all inputs on one device")


# ---- zlpr ------------------------------------------------------------------------------


# ---- shared by every op -----------------------------------------------------------------

REDUCTIONS = ("none", "sum", "mean")

# The integer dtypes of a tensor of one value per element (the C++ kernels' isIntegralType with
# bool): not the bit or sub-byte types.
INTEGER_LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                        torch.int64, torch.uint16, torch.uint32, torch.uint64)


def check_reduction(op, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"kxops.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_tensor(op, name, t):
    """A tensor argument at all."""
    if not isinstance(t, torch.Tensor):
        kind = "None" if t is None else type(t).__name__
        raise TypeError(f"kxops.{op}: {name} must be a Tensor, got {kind}")


def check_dense(op, name, t):
    """A dense (strided) tensor: sparse, nested, quantized and mkldnn tensors are refused by
    name."""
    check_tensor(op, name, t)
    if t.layout != torch.strided or t.is_nested or t.is_quantized:
        kind = ("a nested tensor" if t.is_nested else "a quantized tensor" if t.is_quantized
                else f"layout {t.layout}")
        raise TypeError(f"kxops.{op}: {name} must be a dense (strided) tensor, got {kind}")


def check_logits(op, logits, name="logits"):
    """A dense floating-point tensor with a class (or feature) dim."""
    check_dense(op, name, logits)
    if not logits.is_floating_point() or logits.dtype == torch.float4_e2m1fn_x2:
        raise TypeError(f"kxops.{op}: {name} must be a floating-point tensor, got dtype "
                        f"{logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"kxops.{op}: {name} must have at least 1 dim (the class dim), got a "
                         "0-dim tensor")


def check_real_values(op, name, t):
    """A dense tensor of one bool, integer or floating-point value per element (labels,
    masks)."""
    check_dense(op, name, t)
    floating = t.is_floating_point() and t.dtype != torch.float4_e2m1fn_x2
    if not floating and t.dtype not in INTEGER_LABEL_DTYPES:
        raise TypeError(f"kxops.{op}: {name} must be a bool, integer or floating-point tensor, "
                        f"got {t.dtype}")


def check_ids(op, name, t):
    """A dense int32 or int64 tensor of ids."""
    check_dense(op, name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kxops.{op}: {name} must be an int32 or int64 tensor, got {t.dtype}")


def check_same_device(op, name, t, anchor_name, anchor):
    if t.device != anchor.device:
        raise RuntimeError(f"kxops.{op}: {name} is on {t.device} but {anchor_name} is on "
                           f"{anchor.device}; put all inputs on one device")


def check_like(op, name, t, anchor_name, anchor):
    """A dense tensor of the anchor's dtype, on its device (an operand of its GEMM)."""
    check_dense(op, name, t)
    check_same_device(op, name, t, anchor_name, anchor)
    if t.dtype != anchor.dtype:
        raise TypeError(f"kxops.{op}: {name} has dtype {t.dtype} but {anchor_name} has dtype "
                        f"{anchor.dtype}; they must match")


def check_shape(op, name, t, shape):
    """t.shape == shape (a tuple), in csrc/checks.h check_shape's words."""
    if tuple(t.shape) != shape:
        raise ValueError(f"kxops.{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def check_ignore_index(op, ignore_index):
    """ignore_index is any int64 (compared with the ids as int64); NumPy's and other integer
    types are accepted, as the ops' int arguments accept them; a bool is refused, a bool tensor
    (whose __index__ would make it 0 or 1) too."""
    try:
        is_bool = isinstance(ignore_index, bool) or (isinstance(ignore_index, torch.Tensor)
                                                     and ignore_index.dtype == torch.bool)
        value = None if is_bool else operator.index(ignore_index)
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"kxops.{op}: ignore_index must be an int, got "
                        f"{type(ignore_index).__name__}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"kxops.{op}: ignore_index must fit in int64, got {ignore_index}")


def check_positives_in_range(op, positives, ignore_index, num_classes):
    """Every index that is not ignore_index must lie in [0, num_classes). Syncs on CUDA. Under
    a torch.func transform (vmap: no branching on values) the scatter's own bounds check
    stands in."""
    if torch._C._are_functorch_transforms_active():
        return
    positives = positives.long()  # as in positives_to_dense
    bad = (positives != ignore_index) & ((positives < 0) | (positives >= num_classes))
    if bool(bad.any()):
        value = positives[bad][0].item()
        raise IndexError(
            f"kxops.{op}: positives holds class index {value}, out of range for {num_classes} "
            f"classes (valid: 0..{num_classes - 1}, or ignore_index={ignore_index} for padding)"
        )


def check_grad_filter(op, grad_filter):
    """grad_filter as a float: a finite number >= 0 (0: no filter), else ValueError."""
    value = None
    # Any real number (numpy's scalars too), not a bool; an int too large for a float is inf.
    if isinstance(grad_filter, numbers.Real) and not isinstance(grad_filter, bool):
        try:
            value = float(grad_filter)
        except OverflowError:
            value = float("inf")
    if value is None or not (0 <= value < float("inf")):
        raise ValueError(f"kxops.{op}: grad_filter must be a finite number >= 0 (0: no filter), "
                         f"got {grad_filter!r}")
    return value + 0.0  # -0.0 is 0.0


# ---- zlpr, sparse_zlpr, zlpr_backward ----------------------------------------------------

def check_zlpr_inputs(logits, labels, reduction, op="zlpr"):
    check_logits(op, logits)
    check_reduction(op, reduction)
    check_real_values(op, "labels", labels)
    if labels.shape != logits.shape:
        raise ValueError(f"kxops.{op}: labels shape {tuple(labels.shape)} must equal logits "
                         f"shape {tuple(logits.shape)}")
    check_same_device(op, "labels", labels, "logits", logits)


def check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction, op="sparse_zlpr"):
    check_logits(op, logits)
    check_reduction(op, reduction)
    check_ids(op, "positives", positives)
    check_ignore_index(op, ignore_index)
    if positives.dim() != logits.dim() or positives.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"kxops.{op}: positives shape {tuple(positives.shape)} must be logits.shape[:-1] + "
            f"(P,) = {tuple(logits.shape[:-1])} + (P,)"
        )
    check_same_device(op, "positives", positives, "logits", logits)


def check_grad_mask(op, grad_mask, names=("logits",)):
    """A grad_mask of one flag per name, in csrc/checks.h check_grad_mask's words: a schema's
    bool[N] does not fix the list's length, so the C++ ops and the fake kernels check it."""
    if len(grad_mask) != len(names):
        flags = "flag" if len(names) == 1 else "flags"
        raise ValueError(f"kxops.{op}: grad_mask must hold {len(names)} {flags} "
                         f"({', '.join(names)}), got {len(grad_mask)}")


def check_zlpr_op(logits, labels, grad_mask, reduction):
    """What kxops::zlpr checks (csrc/zlpr_host.h), for its fake kernel."""
    check_dense("zlpr", "logits", logits)
    check_kernel_dtype("zlpr", "logits", logits)  # first, in the C++ op's words
    check_zlpr_inputs(logits, labels, reduction)
    check_grad_mask("zlpr", grad_mask)


def check_sparse_zlpr_op(logits, positives, ignore_index, grad_mask, reduction, grad_filter):
    """What kxops::sparse_zlpr checks (csrc/zlpr_host.h), for its fake kernel."""
    check_dense("sparse_zlpr", "logits", logits)
    check_kernel_dtype("sparse_zlpr", "logits", logits)  # first, in the C++ op's words
    check_sparse_zlpr_inputs(logits, positives, ignore_index, reduction)
    check_grad_mask("sparse_zlpr", grad_mask)
    check_grad_filter("sparse_zlpr", grad_filter)


def check_zlpr_backward_op(grad_loss, grad):
    """What kxops::zlpr_backward checks (csrc/zlpr_host.h), for its fake kernel."""
    check_dense("zlpr_backward", "grad", grad)
    check_kernel_dtype("zlpr_backward", "grad", grad)
    check_dense("zlpr_backward", "grad_loss", grad_loss)
    check_kernel_dtype("zlpr_backward", "grad_loss", grad_loss)
    if grad.dim() == 0:
        raise ValueError("kxops.zlpr_backward: grad must have at least 1 dim (the class dim), "
                         "got a 0-dim tensor")
    check_grad_loss("zlpr_backward", grad_loss, grad.shape[:-1], "grad.shape[:-1]")
    check_same_device("zlpr_backward", "grad_loss", grad_loss, "grad", grad)


# ---- gated_conv, gated_conv_backward ---------------------------------------------------
# The checks of csrc/gated_conv_host.h, in its order and words: the wrapper, the reference and
# the fake kernels of both ops call check_gated_conv_inputs (op: the registered op's name).

_INT64_MAX = 2**63 - 1


def check_dilation(dilation, op="gated_conv"):
    """The dilation as a Python int (NumPy and other integer types accepted)."""
    try:
        value = None if isinstance(dilation, bool) else operator.index(dilation)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"kxops.{op}: dilation must be an int >= 1, got {dilation!r}")
    if value > _INT64_MAX:
        raise ValueError(f"kxops.{op}: dilation must be at most 2**63 - 1, got {dilation!r} "
                         "(any dilation of at least the sequence length gives the same result)")
    return value


def check_drop_gate(drop_gate, op="gated_conv"):
    """The gate dropout probability as a float in [0, 1]."""
    if isinstance(drop_gate, bool) or not isinstance(drop_gate, numbers.Real):
        raise TypeError(f"kxops.{op}: drop_gate must be a real number, got "
                        f"{type(drop_gate).__name__}")
    if not 0.0 <= float(drop_gate) <= 1.0:  # NaN fails too
        raise ValueError(f"kxops.{op}: drop_gate must be in [0, 1], got {drop_gate!r}")
    return float(drop_gate)


def _check_optional_tensor(op, name, t):
    """None or a tensor (the ops' Tensor? arguments)."""
    if t is not None and not isinstance(t, torch.Tensor):
        raise TypeError(f"kxops.{op}: {name} must be a Tensor or None, got {type(t).__name__}")


def _check_optional_like_x(op, name, t, x, shape):
    """None, or an operand of x's dtype and device of the given shape."""
    if t is not None:
        check_like(op, name, t, "x", x)
        check_shape(op, name, t, shape)


def _check_x_and_weight(op, x, weight):
    """x [B, T, in] of a kernel dtype, weight [2 out, in, k] like it, k odd; returns out."""
    check_dense(op, "x", x)
    check_kernel_dtype(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"kxops.{op}: x must be [batch, time, channels], got shape "
                         f"{tuple(x.shape)}")
    check_like(op, "weight", weight, "x", x)
    if weight.dim() != 3:
        raise ValueError(f"kxops.{op}: weight must be [2*out_channels, in_channels, "
                         f"kernel_size] (the nn.Conv1d layout), got shape {tuple(weight.shape)}")
    two_out, in_channels, kernel_size = weight.shape
    if in_channels != x.shape[-1]:
        raise ValueError(f"kxops.{op}: channel mismatch: x has {x.shape[-1]} channels but "
                         f"weight expects {in_channels} (weight shape {tuple(weight.shape)})")
    if two_out == 0 or two_out % 2:
        raise ValueError(f"kxops.{op}: weight.shape[0] must be 2*out_channels (value and gate "
                         f"halves), got {two_out}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kxops.{op}: kernel_size must be odd for a 'same' convolution, got "
                         f"{kernel_size}")
    return two_out // 2


def _check_mask(op, mask, x, mask_like_x):
    """mask [B, T]: of x's dtype for the ops (mask_like_x), any real dtype for the wrapper and
    the reference (which convert it)."""
    if mask is None:
        return
    if mask_like_x:
        check_like(op, "mask", mask, "x", x)
    else:
        check_real_values(op, "mask", mask)
        check_same_device(op, "mask", mask, "x", x)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"kxops.{op}: mask must be [batch, time] = {tuple(x.shape[:2])}, got "
                         f"{tuple(mask.shape)}")


def _check_gate_keep(op, gate_keep, x, out_channels):
    """The ops' gate-dropout keep mask: bool [B, T, out] on x's device."""
    if gate_keep is None:
        return
    check_dense(op, "gate_keep", gate_keep)
    check_same_device(op, "gate_keep", gate_keep, "x", x)
    if gate_keep.dtype != torch.bool:
        raise TypeError(f"kxops.{op}: gate_keep must be a bool tensor, got {gate_keep.dtype}")
    shape = (*x.shape[:2], out_channels)
    if gate_keep.shape != shape:
        raise ValueError(f"kxops.{op}: gate_keep must be [batch, time, out_channels] = {shape}, "
                         f"got {tuple(gate_keep.shape)}")


def _check_residual(op, residual, residual_weight, residual_bias, x, out_channels):
    """The residual branch: x itself (out == in) or its 1x1 projection [out, in, 1] (+ bias)."""
    in_channels = x.shape[-1]
    if residual_weight is not None:
        if not residual:
            raise ValueError(f"kxops.{op}: residual_weight is given but residual=False: the "
                             "projection belongs to the residual branch (drop it, or set "
                             "residual=True)")
    elif residual_bias is not None:
        raise ValueError(f"kxops.{op}: residual_bias needs residual_weight (the 1x1 projection)")
    elif residual and out_channels != in_channels:
        raise ValueError(
            f"kxops.{op}: residual=True with out_channels={out_channels} != "
            f"in_channels={in_channels} needs residual_weight [out_channels, in_channels, 1] (a "
            "1x1 projection of x)")
    _check_optional_like_x(op, "residual_weight", residual_weight, x,
                           (out_channels, in_channels, 1))
    _check_optional_like_x(op, "residual_bias", residual_bias, x, (out_channels,))


def check_gated_conv_inputs(x, weight, bias, mask, dilation, drop_gate, residual,
                            residual_weight, residual_bias, *, op="gated_conv", gate_keep=None,
                            mask_like_x=False):
    """The arguments of dilated_gated_conv1d and of both ops, as csrc/gated_conv_host.h
    checks them; returns (out_channels, dilation as an int, drop_gate as a float)."""
    for name, t in (("bias", bias), ("mask", mask), ("gate_keep", gate_keep),
                    ("residual_weight", residual_weight), ("residual_bias", residual_bias)):
        _check_optional_tensor(op, name, t)
    out_channels = _check_x_and_weight(op, x, weight)
    dilation = check_dilation(dilation, op)
    drop_gate = check_drop_gate(drop_gate, op)
    _check_optional_like_x(op, "bias", bias, x, (2 * out_channels,))
    _check_mask(op, mask, x, mask_like_x)
    _check_gate_keep(op, gate_keep, x, out_channels)
    _check_residual(op, residual, residual_weight, residual_bias, x, out_channels)
    return out_channels, dilation, drop_gate


def check_gated_conv_backward_inputs(grad_y, x, z, weight, mask, gate_keep, residual_weight,
                                     residual_bias, dilation, drop_gate, residual, gap):
    """kxops::gated_conv_backward's arguments; gap(time, kernel_size, dilation): the rows
    after each sequence in z's gapped layout."""
    op = "gated_conv_backward"
    out_channels, dilation, _ = check_gated_conv_inputs(
        x, weight, None, mask, dilation, drop_gate, residual, residual_weight, residual_bias,
        op=op, gate_keep=gate_keep, mask_like_x=True)
    batch, time, _ = x.shape
    z_steps = time + gap(time, weight.shape[2], dilation)
    for name, t, shape in (("grad_y", grad_y, (batch, time, out_channels)),
                           ("z", z, (batch, z_steps, 2 * out_channels))):
        check_like(op, name, t, "x", x)
        check_shape(op, name, t, shape)


# ---- global_pointer_zlpr ---------------------------------------------------------------


_GP = "global_pointer_zlpr"


def _check_global_pointer_operands(q, k, start_bias, end_bias):
    """q, k and the biases: the GEMMs' operands, all of q's dtype and device."""
    check_dense(_GP, "q", q)
    # The kernels' dtypes on every path: the reference's bmm has no float8 either.
    check_kernel_dtype(_GP, "q", q)
    if q.dim() != 4:
        raise ValueError(f"kxops.{_GP}: q must be [batch, heads, L, D] (4 dims), got shape "
                         f"{tuple(q.shape)}")
    batch, heads, length, _ = q.shape
    if length * length >= 2**63:
        raise ValueError(f"kxops.{_GP}: L = {length} is too long (L * L span ids must fit in "
                         "int64)")
    check_like(_GP, "k", k, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"kxops.{_GP}: k must have shape {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    for name, bias in (("start_bias", start_bias), ("end_bias", end_bias)):
        if bias is None:
            continue
        check_like(_GP, name, bias, "q", q)
        if bias.shape != (batch, heads, length):
            raise ValueError(f"kxops.{_GP}: {name} must have shape {(batch, heads, length)}, "
                             f"got {tuple(bias.shape)}")


def _check_global_pointer_positives_and_mask(q, positives, mask):
    """positives [batch, heads, P] of span ids; mask [batch, L] of any real values."""
    batch, heads, length, _ = q.shape
    check_ids(_GP, "positives", positives)
    if positives.dim() != 3 or positives.shape[:2] != (batch, heads):
        raise ValueError(f"kxops.{_GP}: positives must be [batch, heads, P] = {(batch, heads)} "
                         f"+ (P,), got shape {tuple(positives.shape)}")
    check_same_device(_GP, "positives", positives, "q", q)
    if mask is None:
        return
    check_real_values(_GP, "mask", mask)
    if mask.shape != (batch, length):
        raise ValueError(f"kxops.{_GP}: mask must have shape {(batch, length)}, got "
                         f"{tuple(mask.shape)}")
    check_same_device(_GP, "mask", mask, "q", q)


def check_global_pointer_inputs(q, k, positives, mask, start_bias, end_bias, tril,
                                ignore_index, reduction):
    """The arguments of kxops.global_pointer_zlpr_loss, its reference and the op's fake kernel,
    in the C++ op's order: types (TypeError), shapes and values (ValueError)."""
    _check_global_pointer_operands(q, k, start_bias, end_bias)
    _check_global_pointer_positives_and_mask(q, positives, mask)
    if not isinstance(tril, bool):
        raise TypeError(f"kxops.{_GP}: tril must be a bool, got {type(tril).__name__}")
    check_ignore_index(_GP, ignore_index)
    check_reduction(_GP, reduction)


def check_global_pointer_block_bytes(block_bytes):
    """block_bytes: None (the default budget) or a positive int64."""
    if block_bytes is None:
        return None
    if isinstance(block_bytes, bool):
        raise TypeError(f"kxops.{_GP}: block_bytes must be an int or None, got bool")
    try:
        block_bytes = operator.index(block_bytes)
    except TypeError:
        raise TypeError(f"kxops.{_GP}: block_bytes must be an int or None, got "
                        f"{type(block_bytes).__name__}") from None
    if block_bytes <= 0:  # csrc/global_pointer_zlpr_host.h's words
        raise ValueError(f"kxops.{_GP}: block_bytes must be positive, got {block_bytes}")
    if block_bytes >= 2**63:
        raise ValueError(f"kxops.{_GP}: block_bytes must fit in int64, got {block_bytes}")
    return block_bytes


# ---- linear_sparse_zlpr -------------------------------------------------------------------
# The fused linear head's four ops (linear_sparse_zlpr, linear_sparse_zlpr_backward,
# linear_sparse_zlpr_partials, linear_sparse_zlpr_partials_backward): the words of
# csrc/linear_sparse_zlpr_host.h's checks, for the wrapper, the reference and the fake kernels.


def check_linear_inputs(input, weight, bias, positives, ignore_index, reduction,
                        op="linear_sparse_zlpr", kernel_dtypes=False):
    """input [..., d], weight [C, d], bias [C] or None, positives [..., P] of int32/int64
    ids (host header: check_arguments). ``kernel_dtypes``: input of the C++ kernels' dtypes
    (the ops), else any floating dtype (the wrapper and the reference)."""
    check_dense(op, "input", input)
    if kernel_dtypes:
        check_kernel_dtype(op, "input", input)
    elif not input.is_floating_point() or input.dtype == torch.float4_e2m1fn_x2:
        raise TypeError(f"kxops.{op}: input must be a floating-point tensor, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError(f"kxops.{op}: input must have at least 1 dim (the feature dim), got a "
                         "0-dim tensor")
    check_like(op, "weight", weight, "input", input)
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"kxops.{op}: weight must be (num_classes, in_features="
                         f"{input.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_like(op, "bias", bias, "input", input)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"kxops.{op}: bias must have shape {tuple(weight.shape[:1])}, got "
                             f"{tuple(bias.shape)}")
    check_ids(op, "positives", positives)
    check_same_device(op, "positives", positives, "input", input)
    rows = tuple(input.shape[:-1])
    if positives.dim() != input.dim() or tuple(positives.shape[:-1]) != rows:
        raise ValueError(f"kxops.{op}: positives shape {tuple(positives.shape)} must be "
                         f"input.shape[:-1] + (P,) = {rows} + (P,)")
    check_ignore_index(op, ignore_index)
    check_reduction(op, reduction)


def check_block_rows(block_rows, op="linear_sparse_zlpr"):
    """The public block_rows (None: chosen from the sizes) as the ops' int (0: chosen)."""
    if block_rows is None:
        return 0
    if not isinstance(block_rows, int) or isinstance(block_rows, bool):
        raise TypeError(f"kxops.{op}: block_rows must be an int or None, got "
                        f"{type(block_rows).__name__}")
    if block_rows < 1:
        raise ValueError(f"kxops.{op}: block_rows must be >= 1 (or None: chosen from the "
                         f"sizes), got {block_rows}")
    return min(block_rows, 2**62)  # more rows than any tensor holds: one block, in int64


def check_linear_op_arguments(op, input, weight, bias, positives, ignore_index, block_rows,
                              grad_filter=0.0, **others):
    """What the C++ ops check of their common arguments (the fake kernels: every tensor on
    input's device, meta among them included; ``others``: the op's further tensors)."""
    check_devices(op, "input", input, weight=weight, bias=bias, positives=positives, **others)
    check_linear_inputs(input, weight, bias, positives, ignore_index, "none", op,
                        kernel_dtypes=True)
    if block_rows < 0:
        raise ValueError(f"kxops.{op}: block_rows must be >= 0 (0: chosen from the sizes), got "
                         f"{block_rows}")
    check_grad_filter(op, grad_filter)


def check_class_slice(op, weight, class_offset, num_classes):
    """The weight's classes are [class_offset, class_offset + C) of num_classes."""
    if not 0 <= class_offset <= num_classes - weight.shape[0]:
        raise ValueError(f"kxops.{op}: the weight's {weight.shape[0]} classes from class_offset "
                         f"{class_offset} do not fit in num_classes={num_classes}")


def check_log_z(op, log_z, input):
    """The merged log-sums: input.shape[:-1] + (2,), in the partials' dtype."""
    check_tensor(op, "log_z", log_z)
    check_same_device(op, "log_z", log_z, "input", input)
    opmath = torch.float64 if input.dtype == torch.float64 else torch.float32
    if log_z.dtype != opmath:
        raise TypeError(f"kxops.{op}: log_z must be {opmath} (the partials' dtype), got "
                        f"{log_z.dtype}")
    shape = (*input.shape[:-1], 2)
    if log_z.shape != shape:
        raise ValueError(f"kxops.{op}: log_z must have shape {shape}, got "
                         f"{tuple(log_z.shape)}")


def check_ranks_agree(table, ignore_index, op="linear_sparse_zlpr"):
    """Label parallel: ``table`` holds every rank's (arguments valid, classes, key of what must
    agree, lowest id, highest id), gathered before the first data collective, so that every
    rank raises the same error."""
    bad = [rank for rank, entry in enumerate(table) if not entry[0]]
    if bad:
        raise RuntimeError(f"kxops.{op}: rank(s) {bad} of the process group got invalid "
                           "arguments (their own error says which)")
    if len({entry[2] for entry in table}) != 1:
        raise ValueError(f"kxops.{op}: input, positives (shapes, dtype), ignore_index, "
                         "reduction, grad_filter and whether input requires grad must be the "
                         "same on every rank")
    num_classes = sum(entry[1] for entry in table)
    low, high = min(e[3] for e in table), max(e[4] for e in table)
    if low < 0 or high >= num_classes:
        raise IndexError(f"kxops.{op}: positives holds class index {low if low < 0 else high}, "
                         f"out of range for {num_classes} classes (valid: 0..{num_classes - 1}, "
                         f"or ignore_index={ignore_index} for padding)")


# ---- adax ------------------------------------------------------------------------------


STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.uint8)

def check_state_options(state_dtype_option, stochastic_rounding):
    """The optimizers' ``state_dtype`` and ``stochastic_rounding`` arguments."""
    if not any(state_dtype_option is choice for choice in STATE_DTYPES):  # no __eq__ calls
        raise ValueError(f"state_dtype must be None, torch.float32, torch.bfloat16 or "
                         f"torch.uint8, got {state_dtype_option!r}")
    if stochastic_rounding is not None and not isinstance(stochastic_rounding, bool):
        raise TypeError(f"stochastic_rounding must be None, True or False, got "
                        f"{stochastic_rounding!r}")

def check_hyperparameters(lr, betas, eps, weight_decay):
    """The optimizer constructors' argument checks, in torch.optim.Adam's words (ValueError);
    unlike Adam's, infinities are rejected too (beta2 has no upper bound in AdaX)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (need 0 <= beta1 < 1)")
    # 1 / B_1 = 1 / beta2 must be finite: beta2 at least the smallest normal double.
    if not sys.float_info.min <= betas[1] < math.inf:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (need "
                         f"{sys.float_info.min} <= beta2 < inf)")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")

def check_adax_hyper(lr, beta1, beta2, weight_decay, eps):
    """The step's hyperparameters as csrc/adax_host.h check_hyper checks them, in its words
    (numbers as C++ prints them: %g), for every path: a param group edited after construction
    must not step the for-loop or foreach path with a NaN lr (or divide by a zero beta2) where
    the fused op refuses it. Tensors (a tensor lr, differentiable betas) are left to the op
    and to torch: reading them would synchronise."""
    def bad(value, ok):
        return not isinstance(value, torch.Tensor) and not ok(float(value))

    if bad(beta1, lambda v: 0.0 <= v < 1.0):
        raise ValueError(f"kxops.adax_: beta1 must be in [0, 1), got {float(beta1):g}")
    if bad(beta2, lambda v: sys.float_info.min <= v < math.inf):
        raise ValueError(f"kxops.adax_: beta2 must be positive (at least "
                         f"{sys.float_info.min:g}) and finite, got {float(beta2):g}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if bad(value, lambda v: 0.0 <= v < math.inf):
            raise ValueError(f"kxops.adax_: {name} must be finite and >= 0, got "
                             f"{float(value):g}")


def check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps):
    """The lists are of one length (in the op's words, csrc/adax_host.h)."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if len({len(tensors) for tensors in lists}) > 1:
        raise ValueError("kxops.adax_: params, grads, exp_avgs, exp_avg_sqs and state_steps must "
                         f"have the same length, got {', '.join(str(len(t)) for t in lists)}")


def check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps):
    """The list checks of the paths without the compiled op, in the op's words (it also checks
    dtypes, devices and layouts, which torch's own ops check on these paths)."""
    check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.layout != torch.strided:
            raise TypeError(f"kxops.adax_: grads[{i}] must be a dense (strided) tensor; AdaX "
                            "does not support sparse gradients or state")
        if g.shape != p.shape:
            raise ValueError(f"kxops.adax_: grads[{i}] has shape {tuple(g.shape)} but "
                             f"params[{i}] has shape {tuple(p.shape)}")


def check_lr_for_capture(params, lr):
    """A tensor lr is read on the device at each replay of a captured step, so that a
    scheduler's changes take effect; one on another device would need a copy inside the
    capture (which fails) or be baked into the graph."""
    if not isinstance(lr, torch.Tensor) or not params:
        return
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    devices = sorted({str(p.device) for p in params if p.device != lr.device})
    if devices:
        raise RuntimeError(
            f"kxops.adax_: lr is a Tensor on {lr.device} but the params are on "
            f"{', '.join(devices)}; a step captured in a CUDA graph needs lr on the params' "
            "device (e.g. lr=torch.tensor(1e-3, device='cuda')) so that lr_scheduler's changes "
            "reach the replays")
