"""Dilated gated convolution: the reference against first principles, modules, bad inputs, and
the compiled ops against the reference wherever a kernel is registered."""

import math

import pytest
import torch
from torch import nn

import kxops
from kxops import _ext
from kxops.reference import gated_conv as ref
from tests.conftest import assert_close, assert_error_rule, cuda_with_memory


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
    (dict(x=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, "floating-point"),
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


# --- the compiled ops, wherever a kernel is registered --------------------------------------

def needs_kernel(device):
    if not _ext.has_kernel("gated_conv", torch.device(device)):
        pytest.skip(f"no compiled kxops::gated_conv kernel for {device} yet")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dilation, k, mode", [(1, 3, "identity"), (2, 5, "projection"),
                                               (5, 3, "no_residual")])
def test_kernel_matches_reference(device, dtype, dilation, k, mode):
    needs_kernel(device)
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
    needs_kernel(device)
    x, weight, bias, mask, rw, rb = make_inputs(cout=4, projection=True, dtype=torch.float32,
                                                device=device)
    keep = torch.rand(2, 7, 4, device=device) >= 0.2
    for t in (x, weight, bias, rw, rb):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.kxops.gated_conv,
                          (x, weight, bias, mask.float(), keep, rw, rb, 2, 0.2, True))


@pytest.mark.parametrize("channels", [16, 128])
@pytest.mark.parametrize("mode", ["identity", "projection", "no_residual"])
def test_kernel_dropout_masks_and_wide_channels(device, channels, mode):
    """Training-mode gate dropout (same seed, same mask as the reference), ragged masks with
    garbage at padded steps, and channel counts that take the vectorised paths."""
    needs_kernel(device)
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


@pytest.mark.parametrize("batch, time, k, dilation", [
    (2, 3, 5, 1), (2, 3, 5, 5),  # a dilation whose taps reach past both ends of T = 3
    (3, 6, 1, 1),                # one tap: no padding, no gaps between sequences
    (0, 5, 3, 2), (2, 0, 3, 2),  # empty batch, empty sequences
])
def test_kernel_short_empty_and_strided(device, batch, time, k, dilation):
    """Edges of the kernels' gapped layout (each sequence followed by `pad` zero rows), on a
    strided input: forward and every gradient against the reference."""
    needs_kernel(device)
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
    needs_kernel("cuda")
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
