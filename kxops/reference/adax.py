"""AdaX / AdaX-W in pure PyTorch, one parameter at a time: the ground truth.

Per parameter, with t the step count after the increment::

    g = -g if maximize;     AdaX (L2): g = g + wd * p        AdaX-W: p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = (1 + beta2) * v + beta2 * g^2,   B_t = (1 + beta2)^t - 1
    p = p - lr * sqrt(B_t) * m / (sqrt(v) + eps)           (the authors' AdaX.py)

``v`` grows like (1 + beta2)^t and overflows fp32 after ~10^6 steps, so the state holds
``v_hat = v / B_t``, updated as ``v_hat = (1 - b_t) v_hat + b_t g^2`` with ``b_t = beta2 / B_t``,
and the step is ``p -= lr * m / (sqrt(v_hat) + eps / sqrt(B_t))``: the same update, no overflow.
Only ``1 / B_t`` is ever formed (B_t itself overflows float64 near t = 7e6 for beta2 = 1e-4).
``eps / sqrt(B_t)`` underflows in turn (float32: ~1.5M steps at beta2 = 1e-4), so it is kept at
least the smallest normal number of the math dtype: an element whose gradient has always been 0
keeps the authors' zero update (0/eps) instead of 0/0.

Complex parameters are stepped as their real views (``torch.view_as_real``), as torch's
optimizers do.
"""

import math

import torch

from kxops import _checks

LOW_PRECISION = (torch.float16, torch.bfloat16)


COMPACT = (torch.bfloat16, torch.uint8)  # state stored in fewer bits than its fp32 math
SCALE_KEYS = ("exp_avg_scales", "exp_avg_sq_scales")  # 8-bit state's block scales, per moment
BLOCK = 128  # elements per 8-bit block (one fp32 scale per block per moment)
MEAN_WIDTH, SQUARE_WIDTH = 7, 8  # magnitude bits of m's (plus a sign bit) and v_hat's codes
_U32 = 0xFFFFFFFF


def state_dtype(param_dtype: torch.dtype, chosen: torch.dtype = None) -> torch.dtype:
    """The moments' dtype: ``chosen`` (a ``state_dtype`` option) for fp32/fp16/bf16 params;
    without one (and always for fp64), low-precision parameters keep fp32 state and fp32/fp64
    (and complex) parameters their own dtype."""
    if chosen is not None and param_dtype not in (torch.float64, torch.complex128):
        return chosen
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def rounds_stochastically(param_dtype, moment_dtype, stochastic_rounding, state_dtype_option):
    """Whether a param's step rounds anything stochastically: ``stochastic_rounding=None`` is on
    where the user chose compact state (bf16/uint8), then for low-precision params too."""
    on = (state_dtype_option in COMPACT) if stochastic_rounding is None else stochastic_rounding
    return on and (moment_dtype in COMPACT or param_dtype in LOW_PRECISION)


def blocks_of(numel: int) -> int:
    return -(-numel // BLOCK)


# --- The counter-based generator of csrc/adax_math.h, in int64 tensors holding uint32 values.

def _mix32(x):
    """lowbias32 (adax_math.h mix32) on a Python int or an int64 tensor of uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7feb352d) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846ca68b) & _U32
    return x ^ (x >> 16)


def rounding_key(seed: int, step, stream: int, index_high=0):
    """adax_math.h rounding_key; ``step`` may be a tensor (read on its device, no sync)."""
    key = _mix32((seed & _U32) ^ _mix32(seed >> 32))
    if isinstance(step, torch.Tensor):
        step = step.to(torch.int64) & _U32
    else:
        step = int(step) & _U32
    key = _mix32(key ^ step)
    key = _mix32(key ^ stream)
    return _mix32(key ^ index_high)


def random_words(seed: int, step, stream: int, numel: int, device):
    """The random word of every element 0..numel-1 (adax_math.h random_bits)."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    high = index >> 32 if numel > 1 << 32 else 0
    key = rounding_key(seed, step, stream, high)
    return _mix32(key ^ ((index & _U32) * 0x9e3779b9 & _U32))


# --- Float bits and the rounding of adax_math.h.

def _bits(x):
    return x.view(torch.int32).to(torch.int64) & _U32


def _from_bits(bits):
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(
        torch.float32)


def _round_mantissa(bits, keep, random, stochastic):
    drop = 23 - keep
    one = torch.ones_like(bits) if isinstance(drop, torch.Tensor) else 1
    mask = (one << drop) - 1
    if stochastic:
        add = random >> (32 - drop)
    else:
        add = (mask >> 1) + ((bits >> drop) & 1)
    return (bits + add) & (_U32 ^ mask)


def stochastic_bfloat16(x, random):
    """x (fp32) rounded stochastically to bf16, as fp32 values (adax_math.h)."""
    rounded = _from_bits(_round_mantissa(_bits(x), 7, random, True))
    return torch.where(torch.isnan(x), x, rounded)


def stochastic_float16(x, random):
    """x (fp32) rounded stochastically to fp16, as fp32 values (adax_math.h)."""
    bits = _bits(x)
    exponent = ((bits >> 23) & 0xFF) - 127
    keep = torch.where(exponent >= -14, 10, 24 + exponent).clamp(min=0)
    normal = _from_bits(_round_mantissa(bits, keep, random, True))
    fraction = (random >> 8).to(torch.float32) * (1.0 / 16777216.0)
    tiny = torch.where(fraction < x.abs() * 16777216.0, 5.9604644775390625e-08, 0.0).copysign(x)
    out = torch.where(24 + exponent >= 0, normal, tiny.to(torch.float32))
    return torch.where(torch.isnan(x), x, out)


def mean_random(words):
    return (words << 16) & _U32


def square_random(words):
    return words & 0xFFFF0000


# --- The 8-bit code maps (adax_math.h): a float format relative to each block's power-of-two
# scale, 4 octaves per group, width - 3 mantissa bits in the top group and one fewer per group.

def scale_exponent(absmax, width):
    """The biased exponent of a block's scale (adax_math.h scale_exponent)."""
    bits = _bits(absmax)
    top_mantissa = ((1 << (width - 3)) - 1) << (23 - (width - 3))
    bump = ((bits & 0x7FFFFF) >= top_mantissa).to(torch.int64)
    return (((bits >> 23) & 0xFF) + 1 + bump).clamp(*SCALE_EXPONENTS)


# The biased exponents a block's scale takes (at least 2^-100: every decoded value is normal).
SCALE_EXPONENTS = (27, 254)


def canonical_scales(scales, codes):
    """Per block, whether its stored scale is one the kernels write: a positive power of two
    2^(e-127) with e in SCALE_EXPONENTS, or 0 for a block whose codes are all 0 (never
    written)."""
    bits = scales.view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    power = ((bits & ~0x7F800000) == 0) & (exponent >= SCALE_EXPONENTS[0]) & (
        exponent <= SCALE_EXPONENTS[1])
    flat = codes.reshape(-1)
    padded = torch.zeros(scales.numel() * BLOCK, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    unwritten = (bits == 0) & ~padded.view(-1, BLOCK).bool().any(1)
    return power | unwritten


def _octaves(width):
    return 4 * (width - 2)


def _encode_magnitude(a, scale_exp, width, random, stochastic, keep_nonzero):
    top_bits = width - 3
    bits = _bits(a)
    octave = scale_exp - 1 - (bits >> 23)
    ratio = a * _from_bits((254 - scale_exp + _octaves(width)) << 23)
    if stochastic:
        threshold = (random >> 8).to(torch.float32) * (1.0 / 16777216.0)
    else:
        threshold = torch.full_like(a, 0.5)
    up = (a != 0) & (torch.ones_like(a, dtype=torch.bool) if keep_nonzero else ratio > threshold)
    below = torch.where(up, 4, 0)
    largest = (1 << width) - 1
    keep = top_bits - (octave.clamp(0, _octaves(width) - 1) >> 2)
    rounded = _round_mantissa(bits, keep, random, stochastic)
    octave2 = scale_exp - 1 - (rounded >> 23)
    keep2 = top_bits - (octave2.clamp(0, _octaves(width) - 1) >> 2)
    code = ((7 - (octave2 & 3)) << keep2) | ((rounded & 0x7FFFFF) >> (23 - keep2))
    code = torch.where(octave2 < 0, largest, code)
    code = torch.where(octave < 0, largest, code)
    return torch.where(octave >= _octaves(width), below, code)


def _decode_magnitude(stored, scale_exp, width):
    top_bits = width - 3
    code = stored.clamp(min=4)
    keep = (_bits(code.to(torch.float32)) >> 23) - 129
    octave = 4 * (top_bits - keep) + 3 - ((code >> keep) & 3)
    mantissa = (code & ((torch.ones_like(code) << keep) - 1)) << (23 - keep)
    value = _from_bits(((scale_exp - 1 - octave) << 23) | mantissa)
    return torch.where(stored < 4, 0.0, value)


def _per_element(per_block, numel):
    """Each block's value for each of its elements."""
    return per_block[:, None].expand(-1, BLOCK).reshape(-1)[:numel]


# Inductor (torch 2.14) miscompiles the blocks' bit casts broadcast to their elements (the
# last block reads garbage), so the 8-bit codecs run eagerly inside a compiled step.
@torch.compiler.disable
def decode_moment(codes, scales, square):
    """8-bit codes (flat, in memory order) and their block scales -> fp32 values."""
    scale_exp = _per_element((_bits(scales) >> 23) & 0xFF, codes.numel())
    c = codes.to(torch.int64)
    if square:
        return _decode_magnitude(c, scale_exp, SQUARE_WIDTH)
    a = _decode_magnitude(c & 0x7F, scale_exp, MEAN_WIDTH)
    return torch.where((c & 0x80) != 0, -a, a)


@torch.compiler.disable
def encode_moment(x, random, stochastic, square):
    """fp32 values (flat, in memory order) -> (8-bit codes, block scales)."""
    n = x.numel()
    padded = torch.nn.functional.pad(x.abs(), (0, blocks_of(n) * BLOCK - n))
    width = SQUARE_WIDTH if square else MEAN_WIDTH
    scale_exp = scale_exponent(padded.view(-1, BLOCK).amax(1) if n else padded, width)
    scales = _from_bits(scale_exp << 23)
    e = _per_element(scale_exp, n)
    if random is None:
        random = torch.zeros(n, dtype=torch.int64, device=x.device)
    if square:
        return _encode_magnitude(x, e, SQUARE_WIDTH, square_random(random), stochastic,
                                 True).to(torch.uint8), scales
    code = _encode_magnitude(x.abs(), e, MEAN_WIDTH, mean_random(random), stochastic, False)
    sign = torch.where(code != 0, _bits(x) >> 31 << 7, 0)  # a zero code has no sign
    return (sign | code).to(torch.uint8), scales


# --- Tensors in the order the kernels number their elements: a dense param's memory order
# (row-major for one that is not dense); state is read and written in its param's order.

def _memory_order(param):
    order = sorted(range(param.dim()), key=lambda d: (-param.stride(d), -param.size(d)))
    return order if param.permute(order).is_contiguous() else list(range(param.dim()))


def flat(t, param):
    """t's elements (t has param's shape) in the order the kernels number param's elements."""
    return t.permute(_memory_order(param)).reshape(-1)


def unflat_(t, values, param):
    """Writes flat values (in param's element order) into t."""
    order = _memory_order(param)
    t.permute(order).copy_(values.view([param.size(d) for d in order]))


def load_moments(param, exp_avg, exp_avg_sq, scales):
    """Each moment as an fp32 tensor of param's shape (the state itself when it is not
    compact)."""
    if exp_avg.dtype == torch.bfloat16:
        return exp_avg.float(), exp_avg_sq.float()
    if exp_avg.dtype != torch.uint8:
        return exp_avg, exp_avg_sq
    out = []
    for codes, block_scales, square in ((exp_avg, scales[0], False),
                                        (exp_avg_sq, scales[1], True)):
        values = torch.empty_like(param, dtype=torch.float32)
        unflat_(values, decode_moment(flat(codes, param), block_scales, square), param)
        out.append(values)
    return tuple(out)


def store_moments_(param, exp_avg, exp_avg_sq, scales, m, v, random, stochastic):
    """Rounds the fp32 moments m, v into the compact state (in place)."""
    if exp_avg.dtype == torch.bfloat16:
        for state, values, part in ((exp_avg, m, mean_random), (exp_avg_sq, v, square_random)):
            if stochastic:
                values = _stochastic_bf16_in_order(values, random, part, param)
            state.copy_(values)
        return
    for state, values, block_scales, square in ((exp_avg, m, scales[0], False),
                                                (exp_avg_sq, v, scales[1], True)):
        codes, new_scales = encode_moment(flat(values, param), random, stochastic, square)
        unflat_(state, codes, param)
        block_scales.copy_(new_scales)


def _stochastic_bf16_in_order(values, random, part, param):
    out = torch.empty_like(values)
    unflat_(out, stochastic_bfloat16(flat(values, param), part(random)), param)
    return out


def store_param_(param, work, random):
    """The fp32 work copy into a low-precision param, stochastically when random is given."""
    if random is None:
        param.copy_(work)
        return
    rounding = stochastic_bfloat16 if param.dtype == torch.bfloat16 else stochastic_float16
    out = torch.empty_like(work)
    unflat_(out, rounding(flat(work, param), random), param)
    param.copy_(out)


def as_real(params, grads, exp_avgs, exp_avg_sqs):
    """The lists with every complex param, and its grad and state, as real views."""
    if not any(torch.is_complex(p) for p in params):
        return params, grads, exp_avgs, exp_avg_sqs
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    for i, p in enumerate(params):
        if torch.is_complex(p):
            for tensors in lists:
                if torch.is_complex(tensors[i]):  # compact state is kept as the real view
                    tensors[i] = torch.view_as_real(tensors[i])
    return tuple(lists)


def inverse_bias_correction(step: float, beta2: float) -> float:
    """1 / B_t = 1 / ((1 + beta2)^t - 1) in float64, accurate for tiny beta2 and any t.

    B_t itself overflows float64 once t * log1p(beta2) > 709 (t ~ 7e6 for beta2 = 1e-4); the
    update needs only 1/B_t, written as e^-x / (1 - e^-x), which goes smoothly to 0 instead.
    """
    neg_x = -step * math.log1p(beta2)
    return math.exp(neg_x) / -math.expm1(neg_x)


def eps_term(eps: float, inv_bc: float, dtype: torch.dtype) -> float:
    """eps / sqrt(B_t), at least the smallest normal number of ``dtype`` (the math dtype): it
    underflows to 0 for large t, and 0/0 would make NaN of elements whose gradient has always
    been 0. Next to any non-zero sqrt(v_hat) the floor is far below rounding."""
    term = eps * math.sqrt(inv_bc)
    return max(term, torch.finfo(dtype).tiny) if term == term else term  # NaN eps stays NaN


def adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay,
         eps, decoupled, maximize, grad_scale=None, found_inf=None, exp_avg_scales=None,
         exp_avg_sq_scales=None, seeds=None, stochastic_rounding=False):
    """One step, in place on params, exp_avgs, exp_avg_sqs and state_steps.

    ``grad_scale`` divides the grads first (GradScaler); a non-zero ``found_inf`` skips the
    whole step, step counts included. ``lr`` may be a float or a one-element tensor. bf16 or
    uint8 ``exp_avgs``/``exp_avg_sqs`` are compact state (uint8 with ``exp_avg_scales`` and
    ``exp_avg_sq_scales``, one fp32 scale per ``BLOCK`` elements); ``stochastic_rounding``
    rounds every value stored in fewer bits than fp32 stochastically with each param's seed in
    ``seeds``.
    """
    _checks.check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if found_inf is not None and bool(found_inf.item()):
        return
    params, grads, exp_avgs, exp_avg_sqs = as_real(params, grads, exp_avgs, exp_avg_sqs)
    for i, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(
            zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        scales = (exp_avg_scales[i], exp_avg_sq_scales[i]) if exp_avg.dtype == torch.uint8 \
            else None
        work = param if param.dtype not in LOW_PRECISION else param.float()
        g = grad.to(work.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=g.dtype)
        if maximize:
            g = -g
        step.add_(1)
        inv_bc = inverse_bias_correction(float(step.item()), beta2)
        if weight_decay != 0:
            if decoupled:
                work.mul_(1 - lr * weight_decay)
            else:
                g = g.add(work, alpha=weight_decay)
        m, v = load_moments(param, exp_avg, exp_avg_sq, scales)
        m.lerp_(g, 1 - beta1)
        v.mul_(1 - beta2 * inv_bc).addcmul_(g, g, value=beta2 * inv_bc)
        # Out of place: sqrt's backward needs its output (differentiable=True).
        denom = v.sqrt() + eps_term(eps, inv_bc, work.dtype)
        # (lr m) / denom: addcdiv's order, so that the foreach path's addcdiv_ is bit-identical.
        work.sub_(m * lr / denom)
        store_rounded_(param, work, exp_avg, exp_avg_sq, scales, m, v, step,
                       seeds[i] if stochastic_rounding else None)


def store_rounded_(param, work, exp_avg, exp_avg_sq, scales, m, v, step, seed):
    """Stores a step's fp32 results: compact moments and a low-precision param rounded to
    nearest, or stochastically with the words of ``seed`` (None: to nearest)."""
    if exp_avg.dtype in COMPACT and param.dtype != torch.float64:
        random = None if seed is None else random_words(seed, step, 0, param.numel(),
                                                        param.device)
        store_moments_(param, exp_avg, exp_avg_sq, scales, m, v, random, seed is not None)
    if work is not param:
        random = None if seed is None else random_words(seed, step, 1, param.numel(),
                                                        param.device)
        store_param_(param, work, random)
