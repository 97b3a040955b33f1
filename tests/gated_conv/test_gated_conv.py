"""Dilated gated convolution: the reference against first principles, modules, bad inputs, and
the compiled ops against the reference wherever a kernel is registered."""

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import kxops
from kxops import _ext
from kxops.reference import gated_conv as ref
from tests.utils import (
    assert_close,
    assert_error_rule,
    cuda_with_memory,
    needs_kernel,
    run_isolated,
)


@contextlib.contextmanager
def tf32_off():
    """Full fp32 convolutions and matmuls (restored after): cuDNN runs fp32 convolutions in TF32
    by default (about 5e-4 relative error), which the fp32 tolerances of the comparisons with
    the reference could not absorb."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def full_fp32():
    with tf32_off():
        yield


def test_tf32_off_pins_and_restores():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with tf32_off():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def block_by_loops(x, weight, bias, mask, keep, drop_gate, residual_weight, residual_bias,
                   dilation, residual):
    """The definition, one output element at a time."""
    batch, time, _ = x.shape
    two_out, _, k = weight.shape
    out = two_out // 2
    pad = dilation * (k - 1) // 2
    m = torch.ones(batch, time, dtype=x.dtype) if mask is None else mask.to(x.dtype)
    y = torch.zeros(batch, time, out, dtype=x.dtype)
    for b in range(batch):
        for t in range(time):
            z = [0.0 if bias is None else float(bias[o]) for o in range(two_out)]
            for j in range(k):
                src = t - pad + j * dilation
                if 0 <= src < time:
                    for o in range(two_out):
                        z[o] += float(weight[o, :, j] @ x[b, src]) * float(m[b, src])
            for o in range(out):
                h, g = z[o], z[out + o]
                if keep is not None:
                    g = g * float(keep[b, t, o]) / (1 - drop_gate)
                s = 1 / (1 + math.exp(-g))
                if not residual:
                    value = h * s
                else:
                    r = (float(x[b, t, o]) if residual_weight is None else
                         float(residual_weight[o, :, 0] @ x[b, t])
                         + (0.0 if residual_bias is None else float(residual_bias[o])))
                    value = r * (1 - s) + h * s
                y[b, t, o] = value * float(m[b, t])
    return y


def make_inputs(batch=2, time=7, cin=3, cout=3, k=3, projection=False, with_bias=True,
                dtype=torch.float64, device="cpu"):
    f = dict(dtype=dtype, device=device)
    x = torch.randn(batch, time, cin, **f)
    weight = torch.randn(2 * cout, cin, k, **f) / math.sqrt(cin * k)
    bias = torch.randn(2 * cout, **f) * 0.1 if with_bias else None
    lengths = torch.randint(1, time + 1, (batch,))
    lengths[0] = time
    mask = (torch.arange(time)[None] < lengths[:, None]).to(device)
    rw = torch.randn(cout, cin, 1, **f) if projection else None
    rb = torch.randn(cout, **f) if projection and with_bias else None
    return x, weight, bias, mask, rw, rb


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("mode", ["identity", "projection", "no_residual"])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_first_principles(dilation, k, mode, masked):
    cout = 4 if mode == "projection" else 3
    x, weight, bias, mask, rw, rb = make_inputs(cout=cout, k=k, projection=mode == "projection")
    mask = mask if masked else None
    residual = mode != "no_residual"
    y = kxops.reference.dilated_gated_conv1d(x, weight, bias, mask, dilation=dilation,
                                             residual=residual, residual_weight=rw,
                                             residual_bias=rb)
    expected = block_by_loops(x, weight, bias, mask, None, 0.0, rw, rb, dilation, residual)
    assert_close(y, expected)


def test_reference_gate_dropout_matches_first_principles():
    x, weight, bias, mask, _, _ = make_inputs()
    keep = torch.rand(2, 7, 3) >= 0.4
    y = ref.gated_conv_from_keep(x, weight, bias, mask.double(), keep, None, None, 2, 0.4, True)
    expected = block_by_loops(x, weight, bias, mask, keep, 0.4, None, None, 2, True)
    assert_close(y, expected)


def test_padded_steps_are_zero_and_do_not_leak():
    x, weight, bias, mask, _, _ = make_inputs(batch=3, time=9)
    mask[1, 5:] = False
    y = kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=2)
    assert y[~mask].eq(0).all()
    garbage = x.clone()
    garbage[~mask] = 1e6 * torch.randn_like(garbage[~mask])
    y_garbage = kxops.dilated_gated_conv1d(garbage, weight, bias, mask, dilation=2)
    assert_close(y_garbage, y)


def test_float_mask_equals_bool_mask():
    x, weight, bias, mask, _, _ = make_inputs()
    assert_close(kxops.dilated_gated_conv1d(x, weight, bias, mask.double()),
                 kxops.dilated_gated_conv1d(x, weight, bias, mask))


def test_gate_dropout_reproducible_and_only_in_training():
    x, weight, bias, mask, _, _ = make_inputs(dtype=torch.float32)
    kwargs = dict(drop_gate=0.5, training=True)
    torch.manual_seed(3)
    first = kxops.dilated_gated_conv1d(x, weight, bias, mask, **kwargs)
    torch.manual_seed(3)
    again = kxops.dilated_gated_conv1d(x, weight, bias, mask, **kwargs)
    other = kxops.dilated_gated_conv1d(x, weight, bias, mask, **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    evaluation = kxops.dilated_gated_conv1d(x, weight, bias, mask, drop_gate=0.5)
    assert torch.equal(evaluation, kxops.dilated_gated_conv1d(x, weight, bias, mask))


def test_drop_gate_one_halves_the_blend():
    x, weight, bias, _, _, _ = make_inputs()
    h = torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, padding=1).transpose(1, 2)
    y = kxops.dilated_gated_conv1d(x, weight, bias, drop_gate=1.0, training=True)
    assert_close(y, 0.5 * x + 0.5 * h[..., :3])


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_float64(dropout):
    x, weight, bias, mask, rw, rb = make_inputs(time=6, cout=4, projection=True)

    def block(x, weight, bias, rw, rb):
        torch.manual_seed(7)  # the same gate-dropout mask at every evaluation
        return kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=2,
                                          drop_gate=0.3 if dropout else 0.0, training=dropout,
                                          residual_weight=rw, residual_bias=rb)

    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias, rw, rb))
    torch.autograd.gradcheck(block, inputs)


def test_compile_fullgraph():
    x, weight, bias, mask, _, _ = make_inputs(dtype=torch.float32)
    x.requires_grad_(True)
    compiled = torch.compile(kxops.dilated_gated_conv1d, fullgraph=True)
    y = compiled(x, weight, bias, mask, dilation=2)
    expected = kxops.reference.dilated_gated_conv1d(x, weight, bias, mask, dilation=2)
    assert_close(y, expected)
    assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


def test_module_parameters_use_the_conv1d_layout():
    block = kxops.nn.DilatedGatedConv1d(8, kernel_size=5, dilation=2)
    assert block.weight.shape == (16, 8, 5) and block.bias.shape == (16,)
    assert block.residual_weight is None and block.residual_bias is None
    assert set(block.state_dict()) == {"weight", "bias"}
    projected = kxops.nn.DilatedGatedConv1d(8, 6, bias=False)
    assert projected.weight.shape == (12, 8, 3) and projected.bias is None
    assert projected.residual_weight.shape == (6, 8, 1) and projected.residual_bias is None
    assert set(projected.state_dict()) == {"weight", "residual_weight"}
    assert kxops.nn.DilatedGatedConv1d(8, 6, residual=False).residual_weight is None
    bound = 1 / math.sqrt(8 * 5)  # nn.Conv1d's init bounds
    assert block.weight.abs().max() <= bound and block.bias.abs().max() <= bound


def test_module_forward_and_from_conv1d():
    conv = nn.Conv1d(4, 8, 3, dilation=5, padding="same")
    block = kxops.nn.DilatedGatedConv1d.from_conv1d(conv)
    x = torch.randn(2, 11, 4)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    expected = kxops.reference.dilated_gated_conv1d(x, conv.weight, conv.bias, mask, dilation=5)
    assert_close(block(x, mask), expected)
    projection = nn.Conv1d(4, 3, 1)
    block = kxops.nn.DilatedGatedConv1d.from_conv1d(nn.Conv1d(4, 6, 3, padding=1),
                                                    residual_conv=projection)
    assert torch.equal(block.residual_weight, projection.weight)
    with pytest.raises(ValueError, match="residual_conv"):
        kxops.nn.DilatedGatedConv1d.from_conv1d(nn.Conv1d(4, 6, 3, padding=1))
    with pytest.raises(ValueError, match="same"):
        kxops.nn.DilatedGatedConv1d.from_conv1d(nn.Conv1d(4, 8, 3, stride=2))


def test_dgcnn_stack():
    model = kxops.nn.DGCNN(6)
    assert [layer.dilation for layer in model.layers] == [1, 2, 5, 1, 2, 5, 1, 2, 5, 1, 1, 1]
    assert all(layer.drop_gate == 0.1 for layer in model.layers)
    x = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4:] = False
    model.eval()
    expected = x
    for layer in model.layers:
        expected = kxops.reference.dilated_gated_conv1d(
            expected, layer.weight, layer.bias, mask, dilation=layer.dilation)
    assert_close(model(x, mask), expected)
    model.train()
    model(x, mask).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x=torch.randn(2, 5, 4), weight=torch.randn(6, 3, 3)), ValueError, "channel mismatch"),
    (dict(weight=torch.randn(6, 3, 2)), ValueError, "kernel_size must be odd"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(mask=torch.ones(2, 4)), ValueError, "mask must be"),
    (dict(x=torch.randn(5, 3)), ValueError, "batch, time, channels"),
    (dict(weight=torch.randn(6, 3, 3, dtype=torch.float64)), TypeError, "dtype"),
    (dict(weight=torch.randn(5, 3, 3)), ValueError, "2\\*out_channels"),
    (dict(weight=torch.randn(8, 3, 3)), ValueError, "residual_weight"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(drop_gate=1.5), ValueError, "drop_gate"),
    (dict(residual_bias=torch.randn(3)), ValueError, "residual_bias needs"),
    (dict(x=torch.ones(2, 5, 3, dtype=torch.long)), TypeError,
     "x must be a float64, float32, float16 or bfloat16 tensor, got torch.int64"),
])
def test_bad_inputs(kwargs, error, message):
    args = dict(x=torch.randn(2, 5, 3), weight=torch.randn(6, 3, 3), bias=None, mask=None)
    args.update(kwargs)
    x, weight, bias, mask = (args.pop(k) for k in ("x", "weight", "bias", "mask"))
    with pytest.raises(error, match=message):
        kxops.dilated_gated_conv1d(x, weight, bias, mask, **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=4), "kernel_size must be odd"),
    (dict(dilation=0), "dilation"),
    (dict(drop_gate=-0.1), "drop_gate"),
])
def test_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kxops.nn.DilatedGatedConv1d(4, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=4), dict(kernel_size=0),
                                    dict(out_channels=0), dict(dilation=0)])
def test_module_bad_arguments_carry_the_op_prefix(kwargs):
    """The module's own checks word an error as the op does, prefix first (kernel_size and
    the channel counts used to come without it, while dilation and drop_gate had it)."""
    with pytest.raises(ValueError, match=r"^kxops\.gated_conv: "):
        kxops.nn.DilatedGatedConv1d(4, **kwargs)


# --- the compiled ops, wherever a kernel is registered --------------------------------------



@pytest.mark.usefixtures("full_fp32")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dilation, k, mode", [(1, 3, "identity"), (2, 5, "projection"),
                                               (5, 3, "no_residual")])
def test_kernel_matches_reference(device, dtype, dilation, k, mode, cpu_gemm):
    """Every dtype, on CPU under each GEMM engine (cpu_gemm: MKL and oneDNN, csrc/gemm.h)."""
    needs_kernel("gated_conv", device)
    cout = 6 if mode == "projection" else 5
    inputs = make_inputs(batch=3, time=13, cin=5, cout=cout, k=k, projection=mode == "projection",
                         dtype=dtype, device=device)
    x, weight, bias, mask, rw, rb = (None if t is None else
                                     t.requires_grad_(t.is_floating_point()) for t in inputs)
    kwargs = dict(dilation=dilation, residual=mode != "no_residual", residual_weight=rw,
                  residual_bias=rb)
    params = [t for t in (x, weight, bias, rw, rb) if t is not None]

    def run(fn, upcast=False):
        cast = [None if t is None else t.double() if upcast and t.is_floating_point() else t
                for t in (x, weight, bias, mask, rw, rb)]
        call_kwargs = dict(kwargs, residual_weight=cast[4], residual_bias=cast[5])
        y = fn(*cast[:4], **call_kwargs)
        grad_y = torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape).to(y.dtype)
        return [y, *torch.autograd.grad(y, params, grad_y)]

    ours = run(kxops.dilated_gated_conv1d)
    theirs = run(kxops.reference.dilated_gated_conv1d)
    if dtype in (torch.float16, torch.bfloat16):
        exact = run(kxops.reference.dilated_gated_conv1d, upcast=True)
        for o, t, e in zip(ours, theirs, exact):
            assert_error_rule(o, t, e, dtype)
    else:
        for o, t in zip(ours, theirs):
            assert_close(o, t)


def test_opcheck(device):
    needs_kernel("gated_conv", device)
    x, weight, bias, mask, rw, rb = make_inputs(cout=4, projection=True, dtype=torch.float32,
                                                device=device)
    keep = torch.rand(2, 7, 4, device=device) >= 0.2
    for t in (x, weight, bias, rw, rb):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.kxops.gated_conv,
                          (x, weight, bias, mask.float(), keep, rw, rb, 2, 0.2, True))


@pytest.mark.usefixtures("full_fp32")
@pytest.mark.parametrize("channels", [16, 128])
@pytest.mark.parametrize("mode", ["identity", "projection", "no_residual"])
def test_kernel_dropout_masks_and_wide_channels(device, channels, mode, cpu_gemm):
    """Training-mode gate dropout (same seed, same mask as the reference), ragged masks with
    garbage at padded steps, and channel counts that take the vectorised paths; on CPU under
    each GEMM engine."""
    needs_kernel("gated_conv", device)
    cout = channels + 8 if mode == "projection" else channels
    x, weight, bias, mask, rw, rb = make_inputs(batch=3, time=11, cin=channels, cout=cout,
                                                projection=mode == "projection",
                                                dtype=torch.float32, device=device)
    x = x.masked_fill(~mask[..., None], 1e4)  # garbage where the mask is off
    params = [t.requires_grad_(True) for t in (x, weight, bias, rw, rb) if t is not None]
    kwargs = dict(dilation=2, drop_gate=0.3, training=True, residual=mode != "no_residual",
                  residual_weight=rw, residual_bias=rb)
    results = []
    for fn in (kxops.dilated_gated_conv1d, kxops.reference.dilated_gated_conv1d):
        torch.manual_seed(5)
        y = fn(x, weight, bias, mask, **kwargs)
        results.append([y, *torch.autograd.grad(y.square().sum(), params)])
    for got, want in zip(*results):  # fp32 sums of large terms: tolerance scaled to the tensor
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    y = results[0][0]
    assert y[~mask].eq(0).all()
    if mode == "no_residual":  # without the residual, masked steps get no gradient at all
        assert results[0][1][~mask].eq(0).all()


@pytest.mark.usefixtures("full_fp32")
@pytest.mark.parametrize("batch, time, k, dilation", [
    (2, 3, 5, 1), (2, 3, 5, 5),  # a dilation whose taps reach past both ends of T = 3
    (3, 6, 1, 1),                # one tap: no padding, no gaps between sequences
    (0, 5, 3, 2), (2, 0, 3, 2),  # empty batch, empty sequences
])
def test_kernel_short_empty_and_strided(device, batch, time, k, dilation):
    """Edges of the kernels' gapped layout (each sequence followed by `pad` zero rows), on a
    strided input: forward and every gradient against the reference."""
    needs_kernel("gated_conv", device)
    weight = torch.randn(8, 4, k, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    x = torch.randn(batch, 4, time, device=device).transpose(1, 2).requires_grad_(True)
    mask = torch.rand(batch, time, device=device) > 0.3
    results = []
    for fn in (kxops.dilated_gated_conv1d, kxops.reference.dilated_gated_conv1d):
        y = fn(x, weight, bias, mask, dilation=dilation)
        results.append([y, *torch.autograd.grad(y.square().sum(), (x, weight, bias))])
    for got, want in zip(*results):
        assert_close(got, want)


@cuda_with_memory(70)
def test_cuda_more_than_2_pow_31_elements():
    """fp16 activations past 2^31 elements (one long sequence): the output at the last steps and
    every gradient of an upstream gradient that lives on those steps only (so all gradients are
    local) match the op run on a window of the last steps alone."""
    needs_kernel("gated_conv", "cuda")
    channels, dilation, window = 256, 2, 64
    time = 2**31 // channels + window  # x holds 2^31 + 16384 elements, z twice as many
    start = time - window - 2 * dilation  # the window's first step: pad steps of context
    torch.manual_seed(0)
    options = dict(device="cuda", dtype=torch.float16)
    weight = (torch.randn(2 * channels, channels, 3, **options) / 16).requires_grad_()
    bias = torch.randn(2 * channels, **options).requires_grad_()
    x = torch.randn(1, time, channels, **options)
    mask = torch.ones(1, time, dtype=torch.bool, device="cuda")
    mask[:, -5:] = False
    grad_y = torch.zeros_like(x)
    grad_y[:, -window:] = torch.randn(1, window, channels, **options)
    results = []
    for first in (0, start):
        x_in = x[:, first:].clone().requires_grad_()
        y = kxops.dilated_gated_conv1d(x_in, weight, bias, mask[:, first:], dilation=dilation)
        grad_x, grad_w, grad_b = torch.autograd.grad(y, (x_in, weight, bias), grad_y[:, first:])
        tail = slice(start + dilation - first, None)  # steps whose taps all lie in the window
        results.append((y[:, tail].clone(), grad_x[:, start - first:].clone(), grad_w, grad_b))
        del x_in, y, grad_x
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


# --- the ops called directly: every argument checked before memory is touched ---------------

# Each case: (op, changes to the valid arguments below as Python source, error, message).
_OP_CASES = [
    ("gated_conv", "{}", None, ""),
    ("gated_conv_backward", "{}", None, ""),
    ("gated_conv", "dict(x=torch.ones(2, 5, 3, dtype=torch.long))", "TypeError", "x must be"),
    ("gated_conv", "dict(x=torch.randn(10, 3))", "ValueError", r"x must be \[batch"),
    ("gated_conv", "dict(weight=W.double())", "TypeError", "weight has dtype"),
    ("gated_conv", "dict(weight=torch.randn(8, 4, 3))", "ValueError", "channel mismatch"),
    ("gated_conv", "dict(weight=torch.randn(8, 3))", "ValueError", "weight must be"),
    ("gated_conv", "dict(weight=torch.randn(7, 3, 3))", "ValueError", r"2\*out"),
    ("gated_conv", "dict(weight=torch.randn(0, 3, 3), residual_weight=None, "
     "residual_bias=None, gate_keep=None, residual=False)", "ValueError", r"2\*out"),
    ("gated_conv", "dict(weight=torch.randn(8, 3, 2))", "ValueError", "kernel_size must be odd"),
    ("gated_conv", "dict(bias=torch.randn(7))", "ValueError", "bias must have shape"),
    ("gated_conv", "dict(bias=torch.randn(8, 1))", "ValueError", "bias must have shape"),
    ("gated_conv", "dict(bias=torch.randn(8, dtype=torch.float16))", "TypeError",
     "bias has dtype"),
    ("gated_conv", "dict(mask=torch.ones(2, 4))", "ValueError", "mask must be"),
    ("gated_conv", "dict(mask=torch.ones(2, 5, dtype=torch.bool))", "TypeError",
     "mask has dtype"),
    ("gated_conv", "dict(gate_keep=torch.ones(2, 5, 4))", "TypeError",
     "gate_keep must be a bool tensor"),
    ("gated_conv", "dict(gate_keep=torch.ones(2, 5, 3, dtype=torch.bool))", "ValueError",
     "gate_keep must be"),
    ("gated_conv", "dict(residual_weight=torch.randn(4, 3, 2))", "ValueError",
     "residual_weight must have shape"),
    ("gated_conv", "dict(residual_weight=torch.randn(3, 3, 1))", "ValueError",
     "residual_weight must have shape"),
    ("gated_conv", "dict(residual_weight=RW.double())", "TypeError", "residual_weight has dtype"),
    ("gated_conv", "dict(residual_weight=None, residual_bias=None)", "ValueError",
     "needs residual_weight"),
    ("gated_conv", "dict(residual_weight=None)", "ValueError", "needs residual_weight"),
    ("gated_conv", "dict(residual=False)", "ValueError", "residual=False"),
    ("gated_conv", "dict(residual_bias=torch.randn(3))", "ValueError",
     "residual_bias must have shape"),
    ("gated_conv", "dict(residual_bias=RB.double())", "TypeError", "residual_bias has dtype"),
    ("gated_conv", "dict(dilation=0)", "ValueError", "dilation must be"),
    ("gated_conv", "dict(dilation=-2**62)", "ValueError", "dilation must be"),
    ("gated_conv", "dict(drop_gate=1.5)", "ValueError", "drop_gate must be"),
    ("gated_conv", "dict(drop_gate=-0.1)", "ValueError", "drop_gate must be"),
    ("gated_conv", "dict(drop_gate=float('nan'))", "ValueError", "drop_gate must be"),
    ("gated_conv_backward", "dict(grad_y=torch.randn(2, 5, 3))", "ValueError",
     "grad_y must have shape"),
    ("gated_conv_backward", "dict(grad_y=torch.randn(2, 4, 4))", "ValueError",
     "grad_y must have shape"),
    ("gated_conv_backward", "dict(grad_y=torch.randn(1, 5, 4))", "ValueError",
     "grad_y must have shape"),
    ("gated_conv_backward", "dict(grad_y=torch.randn(40))", "ValueError", "grad_y must have shape"),
    ("gated_conv_backward", "dict(grad_y=torch.randn(2, 5, 4, dtype=torch.float64))",
     "TypeError", "grad_y has dtype"),
    ("gated_conv_backward", "dict(z=torch.randn(2, 5, 6))", "ValueError", "z must have shape"),
    ("gated_conv_backward", "dict(z=torch.randn(2, 3, 8))", "ValueError", "z must have shape"),
    # z is gapped, [B, T + gap, 2 out]: here gap = dilation 2 (the reach of the k = 3 taps)
    ("gated_conv_backward", "dict(z=torch.randn(2, 5, 8))", "ValueError",
     r"z must have shape \(2, 7, 8\)"),
    ("gated_conv_backward", "dict(z=torch.randn(2, 7, 8, dtype=torch.float64))", "TypeError",
     "z has dtype"),
    ("gated_conv_backward", "dict(x=torch.randn(2, 5, 4))", "ValueError", "channel mismatch"),
    ("gated_conv_backward", "dict(weight=torch.randn(8, 3, 4))", "ValueError",
     "kernel_size must be odd"),
    ("gated_conv_backward", "dict(mask=torch.ones(5, 2))", "ValueError", "mask must be"),
    ("gated_conv_backward", "dict(gate_keep=torch.ones(2, 5, 8, dtype=torch.bool))",
     "ValueError", "gate_keep must be"),
    ("gated_conv_backward", "dict(residual_weight=torch.randn(4, 2, 1))", "ValueError",
     "residual_weight must have shape"),
    ("gated_conv_backward", "dict(residual_weight=None, residual_bias=None)", "ValueError",
     "needs residual_weight"),
    ("gated_conv_backward", "dict(residual=False)", "ValueError", "residual=False"),
    ("gated_conv_backward", "dict(residual_bias=torch.randn(5))", "ValueError",
     "residual_bias must have shape"),
    ("gated_conv_backward", "dict(dilation=0)", "ValueError", "dilation must be"),
    ("gated_conv_backward", "dict(drop_gate=2.0)", "ValueError", "drop_gate must be"),
]

_OP_SCRIPT = """
import re, sys, torch, kxops
torch.manual_seed(0)
X, W, B = torch.randn(2, 5, 3), torch.randn(8, 3, 3), torch.randn(8)
RW, RB = torch.randn(4, 3, 1), torch.randn(4)
common = dict(mask=torch.ones(2, 5), gate_keep=torch.rand(2, 5, 4) > 0.5, residual_weight=RW,
              residual_bias=RB)
forward = dict(x=X, weight=W, bias=B, **common, dilation=2, drop_gate=0.1, residual=True)
backward = dict(grad_y=torch.randn(2, 5, 4), x=X, z=torch.randn(2, 7, 8), weight=W, **common,
                grad_mask=[True] * 5, dilation=2, drop_gate=0.1, residual=True)
for i, (op, changes, error, match) in enumerate(CASES):
    args = dict(forward if op == "gated_conv" else backward, **eval(changes))
    print("case", i, op, changes, flush=True)  # the last line printed names a crashing case
    try:
        results = getattr(torch.ops.kxops, op)(*args.values())
        got = "ok" if all(r.isfinite().all() for r in results) else "not finite"
    except Exception as e:
        got = type(e).__name__ + ": " + str(e).splitlines()[0]
    want_ok = error is None
    if want_ok != (got == "ok") or not want_ok and not (
            got.startswith(error + ":") and re.search(match, got)):
        print("MISMATCH", i, op, changes, "wanted", error, match, "got", got)
print("done")
"""


def test_ops_check_every_argument_before_touching_memory():
    """torch.ops.kxops.gated_conv(_backward) called directly with one wrong argument at a time
    (shapes the wrapper would reject): a named error of the wrapper's type, never a crash or a
    garbage result. One subprocess for all cases, so that a crash fails the test, naming its
    case, instead of killing the session."""
    needs_kernel("gated_conv", "cpu")
    result = run_isolated(f"CASES = {_OP_CASES!r}\n" + _OP_SCRIPT)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("done"), (
        result.stdout[-3000:], result.stderr[-3000:])
    assert "MISMATCH" not in result.stdout, [
        line for line in result.stdout.splitlines() if line.startswith("MISMATCH")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_device_mismatch():
    needs_kernel("gated_conv", "cuda")
    x, weight, bias, _, _, _ = make_inputs(dtype=torch.float32, device="cuda")
    for name, t in (("weight", weight.cpu()), ("bias", bias.cpu())):
        args = dict(weight=weight, bias=bias, **{name: t})
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
            torch.ops.kxops.gated_conv(x, args["weight"], args["bias"], None, None, None, None,
                                       1, 0.0, True)


def test_any_dilation_costs_no_more_than_reaching_past_both_ends():
    """A dilation far past the sequence (2^62 to the op, 2^62 and NumPy ints to the wrapper)
    applies the centre tap only, in bounded memory; the other taps get zero gradient."""
    needs_kernel("gated_conv", "cpu")
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 3, 5, dtype=torch.float64, requires_grad=True)
    expected = kxops.reference.dilated_gated_conv1d(x, weight, residual=False, dilation=6)
    centre_only = kxops.reference.dilated_gated_conv1d(x, weight[..., 2:3], residual=False)
    assert_close(expected, centre_only)
    grad_expected = torch.autograd.grad(expected.sum(), (x, weight))
    for dilation in (6, 2**62, np.int64(2**62)):
        y, _ = torch.ops.kxops.gated_conv(x, weight, None, None, None, None, None,
                                          int(dilation), 0.0, False)
        assert_close(y, expected)
        y = kxops.dilated_gated_conv1d(x, weight, residual=False, dilation=dilation)
        assert_close(y, expected)
        grads = torch.autograd.grad(y.sum(), (x, weight))
        for got, want in zip(grads, grad_expected):
            assert_close(got, want)
        assert grads[1][..., [0, 1, 3, 4]].eq(0).all()
    with pytest.raises(ValueError, match="at most 2\\*\\*63 - 1"):
        kxops.dilated_gated_conv1d(x, weight, residual=False, dilation=2**64)


# --- NaN and inf ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("source", ["bias", "weight", "input"])
def test_nan_in_the_gate_is_nan_out(device, dtype, source):
    """NaN in the gate half of z reaches y in every channel (the CPU vector path used to turn
    it into a finite gate, giving y == x), as in the reference; ±inf gates give the limits."""
    needs_kernel("gated_conv", device)
    out = 20  # two 8-lane fp32 vectors and a scalar tail on CPU
    x = torch.randn(2, 4, out, dtype=dtype, device=device)
    weight = (torch.randn(2 * out, out, 3, device=device) / 10).to(dtype)
    bias = torch.zeros(2 * out, dtype=dtype, device=device)
    if source == "bias":
        bias[out:] = float("nan")
    elif source == "weight":
        weight[out:, 0, 1] = float("nan")
    else:  # NaN input through a gate-only channel: the value half ignores channel 0
        weight[:out, 0] = 0
        x[1, 2, 0] = float("nan")
    y = kxops.dilated_gated_conv1d(x, weight, bias)
    expected = kxops.reference.dilated_gated_conv1d(x, weight, bias)
    assert expected.isnan().any()
    assert torch.equal(y.isnan(), expected.isnan())
    for limit in (float("inf"), -float("inf")):
        bias[out:] = limit
        y = kxops.dilated_gated_conv1d(x, weight, bias)
        expected = kxops.reference.dilated_gated_conv1d(x, weight, bias)
        assert torch.equal(y.isnan(), expected.isnan())


# --- gradients the op does not compute, transforms, argument types --------------------------

def test_float_mask_that_requires_grad_gets_the_reference_gradient():
    x, weight, bias, mask, _, _ = make_inputs()
    soft = (mask.double() * torch.rand(2, 7, dtype=torch.float64)).requires_grad_()
    grads = []
    for fn in (kxops.dilated_gated_conv1d, kxops.reference.dilated_gated_conv1d):
        y = fn(x, weight, bias, soft, dilation=2)
        grads.append(torch.autograd.grad(y.square().sum(), soft)[0])
    assert_close(*grads)
    assert grads[0].abs().sum() > 0
    torch.autograd.gradcheck(lambda m: kxops.dilated_gated_conv1d(x, weight, bias, m), (soft,))


def test_op_refuses_a_mask_it_cannot_differentiate():
    needs_kernel("gated_conv", "cpu")
    x, weight, bias, mask, _, _ = make_inputs()
    soft = mask.double().requires_grad_()
    with pytest.raises(NotImplementedError, match="does not differentiate mask"):
        torch.ops.kxops.gated_conv(x, weight, bias, soft, None, None, None, 1, 0.0, True)


def test_double_backward_says_it_is_unsupported():
    needs_kernel("gated_conv", "cpu")
    x, weight, bias, mask, _, _ = make_inputs()
    x.requires_grad_(True)
    weight.requires_grad_(True)
    y = kxops.dilated_gated_conv1d(x, weight, bias, mask)
    grad_x, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="does not support double backward"):
        grad_x.sum().backward()


def test_torch_func_grad_and_vmap():
    x, weight, bias, mask, _, _ = make_inputs()

    def loss(w, fn):
        return fn(x, w, bias, mask, dilation=2).square().sum()

    got = torch.func.grad(loss)(weight, kxops.dilated_gated_conv1d)
    want = torch.func.grad(loss)(weight, kxops.reference.dilated_gated_conv1d)
    assert_close(got, want)
    batched = torch.func.vmap(lambda xi: kxops.dilated_gated_conv1d(xi[None], weight, bias)[0])
    assert_close(batched(x), kxops.reference.dilated_gated_conv1d(x, weight, bias))


def test_residual_weight_without_residual_is_refused():
    x, weight, bias, _, rw, rb = make_inputs(cout=4, projection=True)
    for fn in (kxops.dilated_gated_conv1d, kxops.reference.dilated_gated_conv1d):
        with pytest.raises(ValueError, match="residual=False"):
            fn(x, weight, bias, residual=False, residual_weight=rw, residual_bias=rb)


@pytest.mark.parametrize("value, error, message", [
    ("0.5", TypeError, "drop_gate must be a real number"),
    (None, TypeError, "drop_gate must be a real number"),
    (torch.tensor(0.5), TypeError, "drop_gate must be a real number"),
    (True, TypeError, "drop_gate must be a real number"),
    (float("nan"), ValueError, "drop_gate must be in"),
])
def test_drop_gate_must_be_a_real_number(value, error, message):
    x, weight, bias, _, _, _ = make_inputs()
    for fn in (kxops.dilated_gated_conv1d, kxops.reference.dilated_gated_conv1d):
        with pytest.raises(error, match=message):
            fn(x, weight, bias, drop_gate=value)
    with pytest.raises(error, match=message):
        kxops.nn.DilatedGatedConv1d(3, drop_gate=value)


def test_integer_types_are_accepted():
    x, weight, bias, mask, _, _ = make_inputs()
    expected = kxops.reference.dilated_gated_conv1d(x, weight, bias, mask, dilation=2)
    for dilation in (np.int64(2), np.int32(2), torch.tensor(2)):
        assert_close(kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=dilation),
                     expected)
    for value in (1.0, 2.5, "2", True):
        with pytest.raises(ValueError, match="dilation must be an int"):
            kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=value)
    block = kxops.nn.DilatedGatedConv1d(np.int64(3), np.int64(4), np.int64(3), np.int64(2),
                                        np.float32(0.25), dtype=torch.float64)
    assert type(block.dilation) is int and type(block.drop_gate) is float
    assert block(x).shape == (2, 7, 4)


def test_modules_on_the_meta_device():
    """Built like nn.Conv1d on the meta device (factory kwarg or device context), run there,
    then materialised."""
    block = kxops.nn.DilatedGatedConv1d(4, 6, device="meta")
    assert block.weight.is_meta and block.residual_weight.is_meta
    assert block(torch.empty(2, 5, 4, device="meta")).shape == (2, 5, 6)
    with torch.device("meta"):
        model = kxops.nn.DGCNN(4, dilations=(1, 2))
        assert model(torch.empty(2, 5, 4)).is_meta
    assert all(p.is_meta for p in model.parameters())
    block.to_empty(device="cpu")
    block.reset_parameters()
    assert block.weight.isfinite().all()
    assert block(torch.randn(2, 5, 4)).isfinite().all()


@pytest.mark.parametrize("mode", ["no_residual", "projection"])
def test_reference_without_input_channels(device, mode):
    """in_channels = 0: z is the bias alone (the reference used to crash); kernel and reference
    agree, with gradients."""
    x = torch.randn(2, 5, 0, dtype=torch.float64, device=device)
    weight = torch.randn(6, 0, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    rw, rb = (None, None) if mode == "no_residual" else (
        torch.randn(3, 0, 1, dtype=torch.float64, device=device),
        torch.randn(3, dtype=torch.float64, device=device, requires_grad=True))
    kwargs = dict(residual=mode != "no_residual", residual_weight=rw, residual_bias=rb)
    expected = kxops.reference.dilated_gated_conv1d(x, weight, bias, **kwargs)
    if device.type == "cpu":
        assert_close(expected, block_by_loops(x, weight.detach(), bias.detach(), None, None, 0.0,
                                              rw, None if rb is None else rb.detach(), 1,
                                              mode != "no_residual"))
    params = [t for t in (weight, bias, rb) if t is not None]
    grads = torch.autograd.grad(expected.sum(), params)
    if _ext.has_kernel("gated_conv", device):
        y = kxops.dilated_gated_conv1d(x, weight, bias, **kwargs)
        assert_close(y, expected)
        for got, want in zip(torch.autograd.grad(y.sum(), params), grads):
            assert_close(got, want)


def test_op_with_one_meta_tensor_is_refused():
    """A meta tensor among real ones sends the call to the fake kernel: it must refuse the mix
    (it used to return uninitialised CPU memory), and check the arguments as the kernel does."""
    x, w = torch.randn(2, 5, 4), torch.randn(8, 4, 3)
    with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
        torch.ops.kxops.gated_conv(x, w.to("meta"), None, None, None, None, None, 1, 0.0, True)
    with pytest.raises(RuntimeError, match="grad_y is on meta but x is on cpu"):
        torch.ops.kxops.gated_conv_backward(torch.randn(2, 5, 4, device="meta"), x,
                                            torch.randn(2, 5, 8), w, None, None, None, None,
                                            [True] * 5, 1, 0.0, True)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        torch.ops.kxops.gated_conv(x.to("meta"), torch.randn(8, 4, 2, device="meta"), None,
                                   None, None, None, None, 1, 0.0, True)


def test_autocast_leaves_float64_alone():
    x, w, b = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(8, 4, 3,
                                                                      dtype=torch.float64), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kxops.dilated_gated_conv1d(x, w, b)
    assert y.dtype == torch.float64
    assert_close(y, kxops.reference.dilated_gated_conv1d(x, w, b))


def test_from_conv1d_checks_the_residual_conv():
    conv = nn.Conv1d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"residual_conv must be nn.Conv1d\(4, 3, 1\)"):
        kxops.nn.DilatedGatedConv1d.from_conv1d(conv, residual_conv=nn.Conv1d(1, 3, 1))
    with pytest.raises(ValueError, match="bias exactly when the conv has one"):
        kxops.nn.DilatedGatedConv1d.from_conv1d(conv, residual_conv=nn.Conv1d(4, 3, 1,
                                                                              bias=False))
    with pytest.raises(ValueError, match="has no projection"):
        kxops.nn.DilatedGatedConv1d.from_conv1d(nn.Conv1d(4, 8, 3, padding=1),
                                                residual_conv=nn.Conv1d(4, 4, 1))


# Each: code that makes one argument of a good call wrong (x [2, 5, 3], weight [6, 3, 3]).
_ONE_WRONG_ARGUMENT = [
    "x = torch.randn(2, 5, 4)",
    "weight = torch.randn(6, 3, 2)",
    "kw['dilation'] = 0",
    "mask = torch.ones(2, 4)",
    "x = torch.randn(5, 3)",
    "weight = torch.randn(6, 3)",
    "weight = torch.randn(6, 3, 3, dtype=torch.float64)",
    "weight = torch.randn(5, 3, 3)",
    "weight = torch.randn(8, 3, 3)",
    "bias = torch.randn(5)",
    "bias = torch.randn(6, dtype=torch.float64)",
    "kw['drop_gate'] = 1.5",
    "kw['residual_bias'] = torch.randn(3)",
    "x = torch.ones(2, 5, 3, dtype=torch.long)",
    "x = torch.randn(2, 5, 3).to(torch.float8_e4m3fn)",
    "kw.update(residual=False, residual_weight=torch.randn(3, 3, 1))",
    "kw['residual_weight'] = torch.randn(3, 4, 1)",
    "kw.update(residual_weight=torch.randn(3, 3, 1), residual_bias=torch.randn(4))",
]


def test_op_and_wrapper_refuse_a_wrong_argument_in_the_same_words():
    """The compiled op called directly (C++, csrc/gated_conv_host.h), its fake kernel (all
    tensors on meta) and the wrapper (kxops/_checks.py) refuse each wrong argument with the
    same error type and words, prefixed by the op's name kxops.gated_conv."""
    needs_kernel("gated_conv", "cpu")
    code = f"""
        import torch, kxops
        for build in {_ONE_WRONG_ARGUMENT!r}:
            x, weight, bias, mask = torch.randn(2, 5, 3), torch.randn(6, 3, 3), None, None
            kw = dict(dilation=1, drop_gate=0.0, residual=True, residual_weight=None,
                      residual_bias=None)
            exec(build)

            def op(device):
                def to(t):
                    return None if t is None else t.to(device)
                return torch.ops.kxops.gated_conv(
                    to(x), to(weight), to(bias), to(mask), None, to(kw["residual_weight"]),
                    to(kw["residual_bias"]), kw["dilation"], kw["drop_gate"], kw["residual"])

            calls = (lambda: kxops.dilated_gated_conv1d(x, weight, bias, mask, **kw),
                     lambda: op("cpu"), lambda: op("meta"))
            said = []
            for call in calls:
                try:
                    call()
                    said.append("no error")
                except Exception as e:
                    said.append(type(e).__name__ + ": " + str(e).splitlines()[0])
            print(" | ".join([build, *said]))
    """
    result = run_isolated(code)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(_ONE_WRONG_ARGUMENT), result.stdout
    for line in lines:
        _, wrapper, op, fake = line.split(" | ")
        assert wrapper.partition(": ")[2].startswith("kxops.gated_conv: "), line
        assert op == wrapper and fake == wrapper, line


# Each: code that makes one argument of a good backward call wrong (x [2, 5, 3], weight
# [8, 3, 3], out 4 with a projection, dilation 2: z [2, 7, 8]).
_ONE_WRONG_BACKWARD_ARGUMENT = [
    "a['grad_y'] = None",
    "a['grad_y'] = torch.randn(2, 5, 3)",
    "a['grad_y'] = torch.randn(2, 5, 4, dtype=torch.float64)",
    "a['x'] = None",
    "a['x'] = torch.randn(2, 5, 3).int()",
    "a['x'] = torch.randn(5, 3)",
    "a['z'] = None",
    "a['z'] = torch.randn(2, 5, 8)",
    "a['z'] = torch.randn(2, 7, 8).half()",
    "a['weight'] = None",
    "a['weight'] = torch.randn(8, 3, 2)",
    "a['weight'] = torch.randn(8, 3, 3).double()",
    "a['mask'] = torch.ones(2, 5, dtype=torch.bool)",
    "a['mask'] = torch.ones(2, 4)",
    "a['gate_keep'] = torch.ones(2, 5, 4)",
    "a['gate_keep'] = torch.ones(2, 5, 3, dtype=torch.bool)",
    "a['residual_weight'] = torch.randn(4, 2, 1)",
    "a['residual_weight'] = torch.randn(4, 3, 1, dtype=torch.float64)",
    "a['residual_bias'] = torch.randn(5)",
    "a.update(residual_weight=None, residual_bias=None)",
    "a['dilation'] = 0",
    "a['drop_gate'] = -0.5",
    "a['residual'] = False",
]


def test_backward_op_and_its_fake_kernel_refuse_a_wrong_argument_in_the_same_words():
    """kxops::gated_conv_backward called directly with one wrong argument (None where a tensor
    belongs, a wrong dtype, shape or layout): the C++ op and its fake kernel (all tensors on
    meta) raise the same error type and words, prefixed kxops.gated_conv_backward; no crash."""
    needs_kernel("gated_conv", "cpu")
    code = f"""
        import torch, kxops
        for build in {_ONE_WRONG_BACKWARD_ARGUMENT!r}:
            torch.manual_seed(0)
            a = dict(grad_y=torch.randn(2, 5, 4), x=torch.randn(2, 5, 3), z=torch.randn(2, 7, 8),
                     weight=torch.randn(8, 3, 3), mask=torch.ones(2, 5),
                     gate_keep=torch.rand(2, 5, 4) > 0.5, residual_weight=torch.randn(4, 3, 1),
                     residual_bias=torch.randn(4), grad_mask=[True] * 5, dilation=2,
                     drop_gate=0.1, residual=True)
            exec(build)
            said = []
            for device in ("cpu", "meta"):
                args = [v.to(device) if isinstance(v, torch.Tensor) and not v.is_sparse else v
                        for v in a.values()]
                try:
                    torch.ops.kxops.gated_conv_backward(*args)
                    said.append("no error")
                except Exception as e:
                    said.append(type(e).__name__ + ": " + str(e).splitlines()[0])
            print(" | ".join([build, *said]), flush=True)
    """
    result = run_isolated(code)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert len(lines) == len(_ONE_WRONG_BACKWARD_ARGUMENT), result.stdout
    for line in lines:
        build, op, fake = line.split(" | ")
        assert op.partition(": ")[2].startswith("kxops.gated_conv_backward: "), line
        if build.endswith("= None"):
            # None for a tensor: csrc/checks.h says "a tensor, got None", the shared Python
            # check_tensor "a Tensor, got NoneType"; both a TypeError naming the argument.
            name = build.split("'")[1]
            prefix = f"TypeError: kxops.gated_conv_backward: {name} must be a "
            assert op.startswith(prefix) and fake.startswith(prefix), line
        else:
            assert fake == op, line


def _backward_args(projection=True, with_bias=True):
    cout = 4 if projection else 3
    x, weight, bias, mask, rw, rb = make_inputs(cout=cout, projection=projection,
                                                with_bias=with_bias, dtype=torch.float32)
    keep = torch.rand(2, 7, cout) >= 0.2
    forward = (x, weight, bias, mask.float(), keep, rw, rb, 2, 0.2, True)
    y, z = torch.ops.kxops.gated_conv(*forward)
    return (torch.randn_like(y), x, z, weight, mask.float(), keep, rw, rb), (2, 0.2, True)


@pytest.mark.parametrize("projection", [False, True])
def test_backward_computes_only_the_gradients_asked_for(projection):
    """grad_mask (x, weight, bias, residual_weight, residual_bias): every gradient asked for is
    bit for bit the one of the full call, every other one an empty tensor; so is the gradient
    of an input that was None."""
    needs_kernel("gated_conv", "cpu")
    tensors, config = _backward_args(projection)
    full = torch.ops.kxops.gated_conv_backward(*tensors, [True] * 5, *config)
    given = [True, True, True, projection, projection]
    for bits in range(32):
        grad_mask = [bool(bits >> i & 1) for i in range(5)]
        grads = torch.ops.kxops.gated_conv_backward(*tensors, grad_mask, *config)
        for wanted, present, got, want in zip(grad_mask, given, grads, full):
            if wanted and present:
                assert torch.equal(got, want), grad_mask
            else:
                assert got.shape == (0,), grad_mask


def test_autograd_asks_only_for_the_gradients_it_needs():
    """The block's backward passes the inputs' requires_grad as grad_mask: a frozen x (the first
    layer's embeddings) skips grad_x's GEMMs, a frozen weight its GEMMs (float64: every GEMM is
    torch's, counted by the profiler under either engine); the gradients computed are those of
    the block with every input requiring grad, bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    needs_kernel("gated_conv", "cpu")
    x, weight, bias, mask, rw, rb = make_inputs(cout=4, projection=True)
    gemms = ("aten::mm", "aten::addmm")

    def run(needs):
        inputs = [t.detach().requires_grad_(n) for t, n in zip((x, weight, bias, rw, rb), needs)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = kxops.dilated_gated_conv1d(inputs[0], inputs[1], inputs[2], mask, dilation=2,
                                           residual_weight=inputs[3], residual_bias=inputs[4])
            wanted = [t for t in inputs if t.requires_grad]
            grads = torch.autograd.grad(y.square().sum(), wanted)
        count = sum(e.count for e in prof.key_averages() if e.key in gemms)
        return count, dict(zip([i for i, n in enumerate(needs) if n], grads))

    run([True] * 5)  # the first product of a process may be the GEMM engine's trial
    all_count, all_grads = run([True] * 5)
    # forward: 3 taps + the projection; backward: the projection, 3 + 3 taps and its 2
    assert all_count == 13
    for needs, count in (([False, True, True, True, True], 9),
                         ([True, False, True, True, True], 10),
                         ([False, False, True, False, False], 5),
                         ([False, False, False, True, False], 6)):
        got_count, grads = run(needs)
        assert got_count == count, (needs, got_count)
        for i, grad in grads.items():
            assert torch.equal(grad, all_grads[i]), (needs, i)


def test_cpu_gemm_engine_from_the_environment():
    """KXOPS_CPU_GEMM picks the CPU GEMM engine of a fresh process (reported by `python -m
    kxops`); a bad value is a ValueError naming the variable at the first op that multiplies,
    and `python -m kxops` reports it rather than failing."""
    code = """
import torch, kxops
from kxops._info import format_info, info
x, w = torch.randn(2, 9, 4), torch.randn(8, 4, 3)
try:
    kxops.dilated_gated_conv1d(x, w)
    print("engine", torch.ops.kxops._cpu_gemm_engine())
except ValueError as e:
    print("ValueError", e)
print(format_info(info()))
"""
    for value, want in (("mkl", "engine mkl;KXOPS_CPU_GEMM=mkl"),
                        ("bogus", "ValueError kxops: KXOPS_CPU_GEMM must be")):
        done = run_isolated(code, env={"KXOPS_CPU_GEMM": value})
        assert done.returncode == 0, done.stderr
        assert want in done.stdout
        assert "CPU GEMM engine:" in done.stdout
    done = run_isolated(code, env={"KXOPS_CPU_GEMM": "auto"})
    engine = done.stdout.split("engine ", 1)[1].split(";")[0]
    assert engine in ("mkl", "onednn") and f"CPU GEMM engine: {engine} (auto" in done.stdout


def test_cpu_gemm_engine_routes_the_gemms(cpu_gemm):
    """Under oneDNN no GEMM of a fp32 step goes through torch's at::mm/addmm (each tap's product
    reaches oneDNN's matmul directly); under MKL they all do; fp64 (which oneDNN lacks) always
    does."""
    from torch.profiler import ProfilerActivity, profile

    gemms = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")

    def torch_gemm_calls(dtype):
        x, weight, bias, mask, rw, rb = make_inputs(batch=2, time=9, cin=16, cout=24, k=3,
                                                    projection=True, dtype=dtype)
        params = [t.requires_grad_(True) for t in (x, weight, bias, rw, rb)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=2,
                                           residual_weight=rw, residual_bias=rb)
            torch.autograd.grad(y.sum(), params)
        return sum(e.count for e in prof.key_averages() if e.key in gemms)

    # forward: 3 taps + the projection; backward: the projection recomputed, 3 + 3 taps and the
    # projection's 2
    assert torch_gemm_calls(torch.float32) == (0 if cpu_gemm == "onednn" else 13)
    assert torch_gemm_calls(torch.float64) == 13


@pytest.mark.parametrize("grad_mask", [[True] * 5, [True, True, False, True, True],
                                       [False, True, False, False, True], [False] * 5])
def test_opcheck_backward(grad_mask):
    """The backward op passes opcheck too: its gradients that were not asked for (or of a None
    input: no projection) are distinct empty tensors, never one tensor returned twice (outputs
    that alias one another break its schema, which says every output is new)."""
    needs_kernel("gated_conv", "cpu")
    for projection in (False, True):
        tensors, config = _backward_args(projection, with_bias=grad_mask[2])
        backward_args = (*tensors, grad_mask, *config)
        grads = torch.ops.kxops.gated_conv_backward(*backward_args)
        empties = [g for g in grads if g.numel() == 0]
        assert all(a is not b for i, a in enumerate(empties) for b in empties[i + 1:])
        torch.library.opcheck(torch.ops.kxops.gated_conv_backward, backward_args,
                              test_utils=("test_schema", "test_faketensor"))


def test_backward_inside_autocast_keeps_the_forward_dtypes(cpu_gemm):
    """A block run in fp32 (outside autocast, or under autocast(enabled=False)) whose backward
    runs inside an autocast region, and the op called directly under autocast with fp32
    inputs: the GEMMs stay fp32 under either engine (the functional at::mm/addmm would take
    autocast's bf16 casts under MKL, and the projection's bf16 result broke the epilogue)."""
    needs_kernel("gated_conv", "cpu")
    x, weight, bias, mask, rw, rb = make_inputs(cout=5, projection=True, dtype=torch.float32)
    params = [t.requires_grad_(True) for t in (x, weight, bias, rw, rb)]

    def block(fn):
        return fn(x, weight, bias, mask, dilation=2, residual_weight=rw, residual_bias=rb)

    want = block(kxops.reference.dilated_gated_conv1d)
    grad_y = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, params, grad_y)
    y = block(kxops.dilated_gated_conv1d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(y, params, grad_y)
        y_op, _ = torch.ops.kxops.gated_conv(x, weight, bias, mask.float(), None, rw, rb, 2, 0.0,
                                             True)
    assert y_op.dtype == torch.float32
    assert_close(y_op, want)
    for got, expected in zip(grads, want_grads):
        assert got.dtype == torch.float32
        assert_close(got, expected)


_EVERY_ARGUMENT_WRONG = """
import math, torch, kxops
WRONG = {"None": lambda t: None, "int": lambda t: t.int(), "float64": lambda t: t.double(),
         "bigger": lambda t: torch.zeros([s + 1 for s in t.shape], dtype=t.dtype),
         "extra dim": lambda t: t[..., None], "0-dim": lambda t: t.reshape(-1)[0].clone(),
         "meta": lambda t: t.to("meta"), "empty": lambda t: t[:0]}
SCALARS = {"dilation": [0, -1, 2**62], "drop_gate": [-0.1, 1.5, math.nan, math.inf],
           "grad_mask": [[True] * 4, [True] * 6, []]}
for op in ("gated_conv", "gated_conv_backward"):
    good = dict(grad_y=torch.randn(2, 5, 4), x=torch.randn(2, 5, 3), z=torch.randn(2, 7, 8),
                weight=torch.randn(8, 3, 3), bias=torch.randn(8), mask=torch.ones(2, 5),
                gate_keep=torch.rand(2, 5, 4) > 0.5, residual_weight=torch.randn(4, 3, 1),
                residual_bias=torch.randn(4), grad_mask=[True] * 5, dilation=2, drop_gate=0.1,
                residual=True)
    names = [a.name for a in getattr(torch.ops.kxops, op).default._schema.arguments]
    for name in names:
        wrongs = ([(k, f(good[name])) for k, f in WRONG.items()]
                  if isinstance(good[name], torch.Tensor) else
                  [(repr(v), v) for v in SCALARS.get(name, [])])
        for how, value in wrongs:
            args = [value if n == name else good[n] for n in names]
            print(op, name, how, end=" | ", flush=True)  # names a crashing case
            try:
                getattr(torch.ops.kxops, op)(*args)
                print("ok")
            except Exception as e:
                print(type(e).__name__ + ": " + str(e).splitlines()[0])
"""


def test_every_argument_wrong_in_turn_never_crashes():
    """Each argument of both ops wrong in turn (None, a wrong dtype, shape or rank, the meta
    device, empty; bad scalars and grad_mask lengths), in a subprocess: never a crash; a wrong
    tensor is refused by the op's own check (its prefix) or accepted, a bad scalar too; a
    grad_mask of another length by the op's check, a ValueError."""
    needs_kernel("gated_conv", "cpu")
    result = run_isolated(_EVERY_ARGUMENT_WRONG)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert len(lines) == (7 * 8 + 3 + 4) + (8 * 8 + 3 + 3 + 4), result.stdout  # every case ran
    for line in lines:
        case, said = line.split(" | ")
        op, name, _ = case.split(" ", 2)
        if name == "grad_mask":
            assert said.startswith(f"ValueError: kxops.{op}: grad_mask must hold 5 flags"), line
        elif said != "ok":
            assert said.partition(": ")[2].startswith(f"kxops.{op}: "), line


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_backward_refuses_a_grad_mask_of_the_wrong_length(device):
    """bool[5] grad_mask: the schema does not fix the list's length. The C++ op refuses 4 or 6
    flags in its words (it was the dispatcher's unboxing RuntimeError without them); with meta
    tensors the fake kernel does (it failed with a bare "not enough values to unpack")."""
    needs_kernel("gated_conv", "cpu")
    x, weight = torch.randn(2, 5, 3, device=device), torch.randn(8, 3, 3, device=device)
    residual_weight = torch.randn(4, 3, 1, device=device)
    y, z = torch.ops.kxops.gated_conv(x, weight, None, None, None, residual_weight, None, 2,
                                      0.0, True)
    for flags in (4, 6):
        with pytest.raises(ValueError, match=r"^kxops.gated_conv_backward: grad_mask must hold "
                                             r"5 flags \(x, weight, bias, residual_weight, "
                                             r"residual_bias\), got "):
            torch.ops.kxops.gated_conv_backward(y, x, z, weight, None, None, residual_weight,
                                                None, [True] * flags, 2, 0.0, True)
