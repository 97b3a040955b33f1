"""The AdaX step on lists of tensors: fused (kxops::adax_), foreach, and for-loop paths."""

import math

import torch
from torch.optim.optimizer import Optimizer

from kxops import _ext
from kxops.reference import adax as ref


def fused_available(tensors) -> bool:
    """Whether kxops::adax_ has a compiled kernel for every tensor's device."""
    return all(_ext.has_kernel("adax_", t.device) for t in tensors)


def _local_shards(tensors):
    """DTensor (FSDP2) params, grads and state update through their local shards: the step is
    elementwise, so each rank updates what it holds."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return tensors
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, grad_scale,
                found_inf, **hyper):
    params, grads, exp_avgs, exp_avg_sqs = (
        _local_shards(t) for t in (params, grads, exp_avgs, exp_avg_sqs))
    # The op checks the lists itself (shapes, dtypes, devices, sparse grads).
    devices = {p.device for p in params}
    missing = sorted({d.type for d in devices if not _ext.has_kernel("adax_", d)})
    if missing:
        raise RuntimeError(
            f"AdaX fused=True: no compiled kxops kernel for device(s) {missing} "
            f"(kxops status: {_ext.LOAD_STATUS}); use foreach=True or leave fused=None")
    op = torch.ops.kxops.adax_
    op = op.tensor_lr if isinstance(lr, torch.Tensor) else op.default
    # One call per device (the op runs on one device); it groups dtypes itself.
    if len(devices) == 1:
        by_device = {next(iter(devices)): [params, grads, exp_avgs, exp_avg_sqs, state_steps]}
    else:
        by_device = {}
        for tensors in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
            lists = by_device.setdefault(tensors[0].device, [[], [], [], [], []])
            for acc, tensor in zip(lists, tensors):
                acc.append(tensor)
    for device, lists in by_device.items():
        op(*lists, lr=lr.to(device) if isinstance(lr, torch.Tensor) else lr,
           grad_scale=None if grad_scale is None else grad_scale.to(device),
           found_inf=None if found_inf is None else found_inf.to(device), **hyper)


def _device_inverse_bias_corrections(steps, beta2):
    """1/B_t = e^-x / (1 - e^-x), x = t log1p(beta2), per tensor on the steps' device in
    float64 (no host sync: graph-safe); see reference.adax.inverse_bias_correction."""
    neg_x = torch._foreach_mul([s.double() for s in steps], -math.log1p(beta2))
    one_minus = torch._foreach_expm1(neg_x)
    torch._foreach_neg_(one_minus)
    return torch._foreach_div(torch._foreach_exp(neg_x), one_minus)


def _foreach_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                  weight_decay, eps, decoupled, maximize, capturable, grad_scale, found_inf):
    ref.check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if found_inf is not None and bool(found_inf.item()):
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device, dtype), ((dev_params, dev_grads, dev_m, dev_v, dev_steps), _) in \
            grouped.items():
        low_precision = dtype in ref.LOW_PRECISION
        work = [p.float() for p in dev_params] if low_precision else dev_params
        # Copies: the user's .grad is never modified.
        g = [x.to(work[0].dtype) for x in dev_grads] if low_precision else list(dev_grads)
        if grad_scale is not None:
            g = torch._foreach_div(g, grad_scale.to(device))
        if maximize:
            g = torch._foreach_neg(g)
        torch._foreach_add_(dev_steps, 1)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(work, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, work, alpha=weight_decay)
        torch._foreach_lerp_(dev_m, g, 1 - beta1)
        g_sq = torch._foreach_mul(g, g)
        if capturable:
            inv_bc = _device_inverse_bias_corrections(dev_steps, beta2)
            weights = [(w * beta2).to(v.dtype) for w, v in zip(inv_bc, dev_v)]
            torch._foreach_lerp_(dev_v, g_sq, weights)
            eps_terms = torch._foreach_sqrt(inv_bc)
            torch._foreach_mul_(eps_terms, eps)
        else:
            inv_bc = [ref.inverse_bias_correction(float(s.item()), beta2) for s in dev_steps]
            torch._foreach_mul_(dev_v, [1 - beta2 * b for b in inv_bc])
            torch._foreach_add_(dev_v, torch._foreach_mul(g_sq, [beta2 * b for b in inv_bc]))
            eps_terms = [eps * math.sqrt(b) for b in inv_bc]
        denom = torch._foreach_sqrt(dev_v)
        torch._foreach_add_(denom, eps_terms)
        update = torch._foreach_div(dev_m, denom)
        torch._foreach_mul_(update, lr)
        torch._foreach_sub_(work, update)
        if low_precision:
            torch._foreach_copy_(dev_params, work)


def adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, foreach=None, fused=None,
         capturable=False, differentiable=False, lr, beta1, beta2, weight_decay, eps,
         decoupled, maximize, grad_scale=None, found_inf=None):
    """Functional AdaX / AdaX-W step, in place; picks the fused, foreach or for-loop path.

    ``fused=None`` takes the fused kernel when one is compiled for every param's device,
    else ``foreach``; ``differentiable=True`` needs the for-loop path.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                 decoupled=decoupled, maximize=maximize, grad_scale=grad_scale,
                 found_inf=found_inf)
    if differentiable and (fused or foreach):
        raise RuntimeError("AdaX: differentiable=True is supported by the for-loop path only; "
                           "pass fused=False, foreach=False")
    if fused is None and foreach is None and not differentiable:
        fused = fused_available(params)
        foreach = not fused
    if fused:
        _fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)
    elif foreach:
        _foreach_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable,
                      **hyper)
    else:
        ref.adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)


if _ext.LOADED:

    @torch.library.register_fake("kxops::adax_")
    @torch.library.register_fake("kxops::adax_.tensor_lr")
    def _adax_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                   weight_decay, eps, decoupled, maximize, grad_scale=None, found_inf=None):
        return None
