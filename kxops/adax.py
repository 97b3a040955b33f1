"""The AdaX step on lists of tensors: fused (kxops::adax_), foreach, and for-loop paths."""

import math

import torch
from torch.optim.optimizer import Optimizer

from kxops import _checks, _ext
from kxops.reference import adax as ref


def fused_available(tensors) -> bool:
    """Whether kxops::adax_ has a compiled kernel for every tensor's device."""
    return all(_ext.has_kernel("adax_", t.device) for t in tensors)


def fused_devices() -> list:
    """The device types kxops::adax_ has a compiled kernel for."""
    return [d for d in _ext.DEVICE_KEYS if _ext.has_kernel("adax_", torch.device(d))]


def resolve_path(params, *, foreach, fused, differentiable):
    """(fused, foreach) as the step runs them: ``fused=None`` and ``foreach=None`` take the
    fused kernel when one is compiled for every param's device, else foreach;
    ``differentiable=True`` takes the for-loop."""
    if fused is None and foreach is None and not differentiable:
        fused = fused_available(params)
        return fused, not fused
    return bool(fused), bool(foreach)


def _rounds(params, state_steps):
    """Index lists in which no param (nor its step) appears twice, each param's occurrences in
    order: the same param twice in a list is stepped twice, in turn, as the for-loop does."""
    if len(set(map(id, params))) == len(params) == len(set(map(id, state_steps))):
        return [range(len(params))]  # the usual case, without a Python loop over the tensors
    next_round, rounds = {}, []
    for i, (p, s) in enumerate(zip(params, state_steps)):
        r = max(next_round.get(id(p), 0), next_round.get(id(s), 0))
        next_round[id(p)] = next_round[id(s)] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds


def _dtensor_type():
    """torch's DTensor class, None where torch is built without distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _local_shards(tensors, dtensor):
    """DTensor (FSDP2) params, grads and state update through their local shards: the step is
    elementwise, so each rank updates what it holds."""
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, grad_scale,
                found_inf, compact=None, **hyper):
    dtensor = _dtensor_type()
    # A param that is no DTensor has plain grads and state: no per-tensor pass then.
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        params, grads, exp_avgs, exp_avg_sqs = (
            _local_shards(t, dtensor) for t in (params, grads, exp_avgs, exp_avg_sqs))
        if compact is not None:
            compact = {key: _local_shards(value, dtensor)
                       if key in ref.SCALE_KEYS and value is not None else value
                       for key, value in compact.items()}
    # The op checks the lists itself (shapes, dtypes, devices, sparse grads), but torch's
    # grouping below asserts equal lengths before the op could say so in its words.
    _checks.check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if compact is None:
        groups = _by_device_and_dtype(lists)
        extras = {key: {} for key in groups}
    else:
        groups, extras = _compact_groups_by_device(lists, compact)
    missing = sorted({device.type for device, _ in groups
                      if not _ext.has_kernel("adax_", device)})
    if missing:
        raise RuntimeError(
            f"AdaX fused=True: no compiled kxops kernel for device(s) {missing} "
            f"(kxops status: {_ext.LOAD_STATUS}); use foreach=True or leave fused=None")
    op = torch.ops.kxops.adax_
    op = op.tensor_lr if isinstance(lr, torch.Tensor) else op.default
    # One call per device (the op runs on one device) and dtype, as the foreach path groups
    # (compact state: one call per device, the op groups the dtypes itself).
    for key, group_lists in groups.items():
        device = key[0]
        op(*group_lists, lr=lr.to(device) if isinstance(lr, torch.Tensor) else lr,
           grad_scale=None if grad_scale is None else grad_scale.to(device),
           found_inf=None if found_inf is None else found_inf.to(device), **extras[key],
           **hyper)


def _compact_groups_by_device(lists, compact):
    """{(device, None): the lists' tensors on it} and the op's compact-state arguments of
    each group (an empty tensor stands for the scales of state that is not 8-bit)."""
    params = lists[0]
    devices = [p.device for p in params]
    empty = {device: torch.empty(0, device=device) for device in set(devices)}
    scale_lists = {name: compact[name] for name in ref.SCALE_KEYS}
    seeds = compact["seeds"]
    seeds = [0] * len(params) if seeds is None else [0 if s is None else s for s in seeds]

    def extras_of(indices):
        out = dict(seeds=[seeds[i] for i in indices],
                   stochastic_rounding=compact["stochastic_rounding"])
        for name, scales in scale_lists.items():
            # One empty tensor per device stands for every missing scale tensor.
            out[name] = [empty[devices[i]] if scales is None or scales[i] is None else scales[i]
                         for i in indices]
        return out

    if len(empty) == 1:  # the usual case: the lists as they are, without a per-tensor loop
        key = (devices[0], None)
        return {key: list(lists)}, {key: extras_of(range(len(params)))}
    indices = {}
    for i, device in enumerate(devices):
        indices.setdefault(device, []).append(i)
    groups = {(device, None): [[tensors[i] for i in group] for tensors in lists]
              for device, group in indices.items()}
    extras = {(device, None): extras_of(group) for device, group in indices.items()}
    return groups, extras


def _device_inverse_bias_corrections(steps, beta2):
    """1/B_t = e^-x / (1 - e^-x), x = t log1p(beta2), per tensor on the steps' device in
    float64 (no host sync: graph-safe); see reference.adax.inverse_bias_correction."""
    neg_x = torch._foreach_mul([s.double() for s in steps], -math.log1p(beta2))
    one_minus = torch._foreach_expm1(neg_x)
    torch._foreach_neg_(one_minus)
    return torch._foreach_div(torch._foreach_exp(neg_x), one_minus)


def _foreach_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, compact=None,
                  **kwargs):
    _checks.check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    found_inf = kwargs["found_inf"]
    if found_inf is not None and bool(found_inf.item()):
        return
    rounds = _rounds(params, state_steps)
    if len(rounds) == 1 and compact is None:
        _foreach_round(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        return
    for indices in rounds:
        plain = [i for i in indices if not _is_compact(i, params, exp_avgs, compact)]
        if plain:
            _foreach_round(*([tensors[i] for i in plain] for tensors in
                             (params, grads, exp_avgs, exp_avg_sqs, state_steps)), **kwargs)
        rounded = [i for i in indices if _is_compact(i, params, exp_avgs, compact)]
        if rounded:
            _compact_round(rounded, [params, grads, exp_avgs, exp_avg_sqs, state_steps],
                           compact, kwargs)


def _is_compact(i, params, exp_avgs, compact):
    """Whether params[i] steps through fp32 copies: compact state, or a low-precision param
    rounded stochastically."""
    if compact is None or params[i].dtype == torch.float64:
        return False
    return exp_avgs[i].dtype in ref.COMPACT or (
        compact["stochastic_rounding"] and params[i].dtype in ref.LOW_PRECISION)


def _compact_round(indices, lists, compact, kwargs):
    """The tensors with compact state (or stochastically rounded params) of one round: decoded
    to fp32, stepped as the foreach path steps fp32 state, rounded back as the reference
    rounds (reference.adax.store_rounded_)."""
    params, grads, exp_avgs, exp_avg_sqs, steps = ([t[i] for i in indices] for t in lists)
    scales = [(compact["exp_avg_scales"][i], compact["exp_avg_sq_scales"][i])
              if lists[2][i].dtype == torch.uint8 else None for i in indices]
    work = [p.float() if p.dtype in ref.LOW_PRECISION else p for p in params]
    grads = [g.float() if g.dtype in ref.LOW_PRECISION else g for g in grads]
    moments = [ref.load_moments(p, m, v, s)
               for p, m, v, s in zip(params, exp_avgs, exp_avg_sqs, scales)]
    m32, v32 = [m for m, _ in moments], [v for _, v in moments]
    _foreach_round(work, grads, m32, v32, steps, **kwargs)
    for k, i in enumerate(indices):
        seed = compact["seeds"][i] if compact["stochastic_rounding"] else None
        ref.store_rounded_(params[k], work[k], exp_avgs[k], exp_avg_sqs[k], scales[k], m32[k],
                           v32[k], steps[k], seed)


def _on_grads(op, g, grads, *args, **kwargs):
    """``torch.<op>(g, ...)``: into new tensors while g are the user's grads (never modified),
    in place once g is a copy."""
    if g is grads:
        return getattr(torch, op)(g, *args, **kwargs)
    getattr(torch, op + "_")(g, *args, **kwargs)
    return g


def _by_device_and_dtype(tensor_lists):
    """{(device, dtype): the lists' tensors on it}, by the params' device and dtype. torch's
    helper returns one (None, None) group while compiling, but the low-precision staging
    needs each group's dtype, so the grouping is then done here (traced, it costs nothing)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensor_lists)
    if (None, None) not in grouped:
        return {key: lists for key, (lists, _) in grouped.items()}
    groups = {}
    for i, param in enumerate(tensor_lists[0]):
        lists = groups.setdefault((param.device, param.dtype), [[] for _ in tensor_lists])
        for group_list, tensors in zip(lists, tensor_lists):
            group_list.append(tensors[i])
    return groups


def _second_moment_(v, g, steps, beta2, eps, math_dtype):
    """v = (1 - b_t) v + b_t g^2 with b_t = beta2 / B_t, in place; returns each tensor's
    eps / sqrt(B_t) (ref.eps_term), as host numbers."""
    inv_bcs = [ref.inverse_bias_correction(float(s.item()), beta2) for s in steps]
    torch._foreach_mul_(v, [1 - beta2 * b for b in inv_bcs])
    torch._foreach_addcmul_(v, g, g, [beta2 * b for b in inv_bcs])
    return [ref.eps_term(eps, b, math_dtype) for b in inv_bcs]


def _second_moment_on_device_(v, g, steps, beta2, eps, math_dtype):
    """As _second_moment_, with 1/B_t computed on the steps' device (graph-safe)."""
    # v (1 - w) + w g^2 as the other paths compute it: a lerp would give inf - inf (NaN) at
    # w = 1 (the first step) for a g^2 that overflows. addcmul_ takes its weights as host
    # numbers only: (w g) g is its own order of operations.
    inv_bcs = _device_inverse_bias_corrections(steps, beta2)
    weights = torch._foreach_mul(inv_bcs, beta2)
    decays = torch._foreach_add(torch._foreach_neg(weights), 1)
    torch._foreach_mul_(v, decays)
    torch._foreach_addcmul_(v, torch._foreach_mul(g, weights), g)
    eps_terms = torch._foreach_sqrt(inv_bcs)
    torch._foreach_mul_(eps_terms, eps)
    # See ref.eps_term: the floor keeps never-updated elements at 0/eps, not 0/0.
    torch._foreach_clamp_min_(eps_terms, torch.finfo(math_dtype).tiny)
    return eps_terms


def _foreach_round(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                   weight_decay, eps, decoupled, maximize, capturable, grad_scale, found_inf):
    """One multi-tensor step, operation for operation as the for-loop (same numbers), in as
    few passes over memory as torch's fused foreach forms allow: seven for fp32/fp64 params
    with a float lr, and one temporary (the denominator) when the grads are used as they are
    (no grad_scale, maximize or L2 term)."""
    groups = _by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    second_moment_ = _second_moment_on_device_ if capturable else _second_moment_
    for (device, dtype), (dev_params, dev_grads, dev_m, dev_v, dev_steps) in groups.items():
        low_precision = dtype in ref.LOW_PRECISION
        work = [p.float() for p in dev_params] if low_precision else dev_params
        g = [x.float() for x in dev_grads] if low_precision else dev_grads
        if grad_scale is not None:
            g = _on_grads("_foreach_div", g, dev_grads, grad_scale.to(device))
        if maximize:
            g = _on_grads("_foreach_neg", g, dev_grads)
        torch._foreach_add_(dev_steps, 1)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(work, 1 - lr * weight_decay)
            else:
                g = _on_grads("_foreach_add", g, dev_grads, work, alpha=weight_decay)
        torch._foreach_lerp_(dev_m, g, 1 - beta1)
        eps_terms = second_moment_(dev_v, g, dev_steps, beta2, eps, work[0].dtype)
        denom = torch._foreach_sqrt(dev_v)
        torch._foreach_add_(denom, eps_terms)
        if isinstance(lr, torch.Tensor):
            # addcdiv_ takes host numbers only; (m lr) / denom as it rounds.
            update = torch._foreach_mul(dev_m, lr)
            torch._foreach_div_(update, denom)
            torch._foreach_sub_(work, update)
        else:
            torch._foreach_addcdiv_(work, dev_m, denom, -lr)
        if low_precision:
            torch._foreach_copy_(dev_params, work)


def adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, foreach=None, fused=None,
         capturable=False, differentiable=False, lr, beta1, beta2, weight_decay, eps,
         decoupled, maximize, grad_scale=None, found_inf=None, exp_avg_scales=None,
         exp_avg_sq_scales=None, seeds=None, stochastic_rounding=False):
    """Functional AdaX / AdaX-W step, in place; picks the fused, foreach or for-loop path
    (see ``resolve_path``). Complex params (with their grads and state) are stepped as their
    real views.

    bf16 or uint8 ``exp_avgs``/``exp_avg_sqs`` are compact state (uint8: with the block
    scales ``exp_avg_scales``/``exp_avg_sq_scales``, ``reference.adax.BLOCK`` elements per
    scale); ``stochastic_rounding`` rounds every value stored in fewer bits than fp32
    stochastically, with each param's seed in ``seeds`` (docs/design.md).
    """
    compact = None
    if stochastic_rounding or any(m.dtype in ref.COMPACT for m in exp_avgs):
        compact = dict(exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                       seeds=seeds, stochastic_rounding=bool(stochastic_rounding))
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                 decoupled=decoupled, maximize=maximize, grad_scale=grad_scale,
                 found_inf=found_inf)
    if differentiable and (fused or foreach):
        raise RuntimeError("AdaX: differentiable=True is supported by the for-loop path only; "
                           "pass fused=False, foreach=False")
    fused, foreach = resolve_path(params, foreach=foreach, fused=fused,
                                  differentiable=differentiable)
    _checks.check_lr_for_capture(params, lr)
    _checks.check_adax_hyper(lr, beta1, beta2, weight_decay, eps)
    if fused or foreach:
        params, grads, exp_avgs, exp_avg_sqs = ref.as_real(params, grads, exp_avgs, exp_avg_sqs)
    if fused:
        _fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, compact=compact,
                    **hyper)
    elif foreach:
        _foreach_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable,
                      compact=compact, **hyper)
    else:
        ref.adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper,
                 exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                 seeds=seeds, stochastic_rounding=bool(stochastic_rounding))


if _ext.LOADED:

    @torch.library.register_fake("kxops::adax_")
    @torch.library.register_fake("kxops::adax_.tensor_lr")
    def _adax_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                   weight_decay, eps, decoupled, maximize, grad_scale=None, found_inf=None,
                   exp_avg_scales=None, exp_avg_sq_scales=None, seeds=(),
                   stochastic_rounding=False):
        _checks.check_adax_inputs(params, grads, exp_avgs, exp_avg_sqs, state_steps)
        if params:
            _checks.check_devices("adax_", "params[0]", params[0], params=params, grads=grads,
                                  exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                                  state_steps=state_steps, lr=lr, grad_scale=grad_scale,
                                  found_inf=found_inf, exp_avg_scales=exp_avg_scales or [],
                                  exp_avg_sq_scales=exp_avg_sq_scales or [])
        return None
