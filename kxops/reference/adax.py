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
import sys

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Low-precision parameters keep fp32 state; fp32/fp64 (and complex) parameters their own
    dtype."""
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def as_real(params, grads, exp_avgs, exp_avg_sqs):
    """The lists with every complex param, and its grad and state, as real views."""
    if not any(torch.is_complex(p) for p in params):
        return params, grads, exp_avgs, exp_avg_sqs
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    for i, p in enumerate(params):
        if torch.is_complex(p):
            for tensors in lists:
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


def check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps):
    """The lists are of one length (in the op's words, csrc/adax_host.h)."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if len({len(tensors) for tensors in lists}) > 1:
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps must have the "
                         f"same length, got {', '.join(str(len(t)) for t in lists)}")


def check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps):
    """The list checks of the paths without the compiled op, in the op's words (it also checks
    dtypes, devices and layouts, which torch's own ops check on these paths)."""
    check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse:
            raise RuntimeError("AdaX does not support sparse gradients")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {list(g.shape)} but params[{i}] has shape "
                             f"{list(p.shape)}")


def adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay,
         eps, decoupled, maximize, grad_scale=None, found_inf=None):
    """One step, in place on params, exp_avgs, exp_avg_sqs and state_steps.

    ``grad_scale`` divides the grads first (GradScaler); a non-zero ``found_inf`` skips the
    whole step, step counts included. ``lr`` may be a float or a one-element tensor.
    """
    check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if found_inf is not None and bool(found_inf.item()):
        return
    params, grads, exp_avgs, exp_avg_sqs = as_real(params, grads, exp_avgs, exp_avg_sqs)
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                      state_steps):
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
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(1 - beta2 * inv_bc).addcmul_(g, g, value=beta2 * inv_bc)
        # Out of place: sqrt's backward needs its output (differentiable=True).
        denom = exp_avg_sq.sqrt() + eps_term(eps, inv_bc, work.dtype)
        # (lr m) / denom: addcdiv's order, so that the foreach path's addcdiv_ is bit-identical.
        work.sub_(exp_avg * lr / denom)
        if work is not param:
            param.copy_(work)
