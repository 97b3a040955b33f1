"""AdaX and AdaX-W as ``torch.optim.Optimizer`` drop-ins (flags as in ``torch.optim.AdamW``)."""

import torch
from torch.optim.optimizer import Optimizer, _use_grad_for_differentiable

from kxops.adax import adax, fused_available
from kxops.reference.adax import check_hyperparameters, state_dtype

__all__ = ["AdaX", "AdaXW"]

_FLAG_DEFAULTS = dict(foreach=None, fused=None, capturable=False, maximize=False,
                      differentiable=False)


def _all_params(params):
    """The tensors of an Optimizer's ``params`` argument: tensors, (name, tensor) pairs or
    param-group dicts of either."""
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            yield from _all_params([group] if isinstance(group, torch.Tensor) else group)
        elif isinstance(item, tuple):
            yield item[1]
        else:
            yield item


class AdaX(Optimizer):
    """AdaX (Li et al., 2020) with L2 weight decay: Adam with an exponentially growing,
    bias-corrected long-term memory of squared gradients.

    The second moment is kept normalised (``v / B_t``), so the state never overflows however
    long training runs; the update is exactly that of the authors' AdaX. Low-precision
    (fp16/bf16) params keep fp32 state. ``fused=None`` picks the compiled multi-tensor kernel
    when one exists for every param's device, else the foreach path. Handles GradScaler's
    ``grad_scale``/``found_inf`` itself on every path (``_step_supports_amp_scaling``).
    """

    _decoupled = False

    def __init__(self, params, lr=1.5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-4, *,
                 foreach=None, fused=None, capturable=False, maximize=False,
                 differentiable=False):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if fused and foreach:
            raise RuntimeError("AdaX: `fused` and `foreach` cannot both be True")
        if fused and differentiable:
            raise RuntimeError("AdaX: `fused` does not support `differentiable`")
        params = list(params)
        if fused is None and foreach is None and not differentiable:
            # Resolved once, so that state["step"] is created where the chosen path wants it.
            fused = fused_available(_all_params(params))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults)
        if fused:
            for group in self.param_groups:
                self._check_fused(group["params"])
        self._step_supports_amp_scaling = True

    @staticmethod
    def _check_fused(params):
        for p in params:
            if not p.is_floating_point():
                raise RuntimeError(f"AdaX fused=True needs floating-point params, got {p.dtype}")
        if not fused_available(params):
            devices = sorted({p.device.type for p in params})
            raise RuntimeError(f"AdaX fused=True: kxops has no compiled AdaX kernel for "
                               f"device(s) {devices}; use foreach=True or leave fused=None")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict):
        """As ``Optimizer.load_state_dict``, but low-precision params keep fp32 moments.

        The base class casts every floating state tensor to its param's dtype, which would
        round the fp32 moments of fp16/bf16 params.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[param][key] = saved[key].to(device=param.device,
                                                           dtype=state_dtype(param.dtype))

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step_on_param_device = bool(group["fused"] or group["capturable"])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaX does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if step_on_param_device else "cpu")
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p.dtype),
                                                  memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lists = ([], [], [], [], [])
            self._init_group(group, *lists)
            if len(lists[0]) == 0:
                continue
            beta1, beta2 = group["betas"]
            adax(*lists, foreach=group["foreach"], fused=group["fused"],
                 capturable=group["capturable"], differentiable=group["differentiable"],
                 lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                 eps=group["eps"], decoupled=self._decoupled, maximize=group["maximize"],
                 grad_scale=getattr(self, "grad_scale", None),
                 found_inf=getattr(self, "found_inf", None))
        return loss


class AdaXW(AdaX):
    """AdaX with decoupled weight decay (``p *= 1 - lr * weight_decay``), as AdamW to Adam."""

    _decoupled = True

    def __init__(self, params, lr=5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-2, *,
                 foreach=None, fused=None, capturable=False, maximize=False,
                 differentiable=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=foreach, fused=fused, capturable=capturable,
                         maximize=maximize, differentiable=differentiable)
