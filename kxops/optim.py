"""AdaX and AdaX-W as ``torch.optim.Optimizer`` drop-ins (flags as in ``torch.optim.AdamW``)."""

import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype, _use_grad_for_differentiable

from kxops.adax import adax, fused_devices, resolve_path
from kxops.reference.adax import check_hyperparameters, state_dtype

__all__ = ["AdaX", "AdaXW"]

_FLAG_DEFAULTS = dict(foreach=None, fused=None, capturable=False, maximize=False,
                      differentiable=False)


class AdaX(Optimizer):
    """AdaX (Li et al., 2020) with L2 weight decay: Adam with an exponentially growing,
    bias-corrected long-term memory of squared gradients.

    The second moment is kept normalised (``v / B_t``), so the state never overflows however
    long training runs; the update is exactly that of the authors' AdaX. Low-precision
    (fp16/bf16) params keep fp32 state; complex params are stepped as their real views.
    ``fused=None`` (saved as such in ``state_dict``) picks, at each step, the compiled
    multi-tensor kernel when one exists for every param's device, else the foreach path.
    Handles GradScaler's ``grad_scale``/``found_inf`` itself on every path
    (``_step_supports_amp_scaling``). With ``capturable=True``, a tensor ``lr`` on the params'
    device lets ``torch.optim.lr_scheduler`` change the lr of a step captured in a CUDA graph.
    """

    _decoupled = False

    def __init__(self, params, lr=1.5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-4, *,
                 foreach=None, fused=None, capturable=False, maximize=False,
                 differentiable=False):
        check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._step_supports_amp_scaling = True

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

    @staticmethod
    def _step_tensor(step, param, on_param_device):
        """state["step"] as the chosen path reads it: a float32 scalar on the param's device
        for the fused kernel and capturable steps, else a CPU scalar of the default dtype (as
        torch.optim.Adam). A plain number (an older or hand-edited checkpoint) or a step saved
        by another path is converted; one already right is returned as it is."""
        if on_param_device:
            dtype, device = torch.float32, param.device
        else:
            dtype = _get_scalar_dtype()
            device = step.device if isinstance(step, torch.Tensor) else torch.device("cpu")
        if not isinstance(step, torch.Tensor):
            return torch.tensor(float(step), dtype=dtype, device=device)
        if on_param_device and (step.dtype != dtype or step.device != device):
            return step.to(dtype=dtype, device=device)
        return step

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps):
        """The lists of the params with a grad; returns (fused, foreach) as resolved for
        them."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaX does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        fused, foreach = resolve_path(params, foreach=group["foreach"], fused=group["fused"],
                                      differentiable=group["differentiable"])
        step_on_param_device = fused or group["capturable"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                if fused:
                    _check_fused_param(p)
                state["step"] = torch.zeros(
                    (), dtype=torch.float32 if step_on_param_device else _get_scalar_dtype(),
                    device=p.device if step_on_param_device else "cpu")
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p.dtype),
                                                  memory_format=torch.preserve_format)
            else:
                state["step"] = self._step_tensor(state["step"], p, step_on_param_device)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return fused, foreach

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lists = ([], [], [], [], [])
            fused, foreach = self._init_group(group, *lists)
            if len(lists[0]) == 0:
                continue
            beta1, beta2 = group["betas"]
            adax(*lists, foreach=foreach, fused=fused, capturable=group["capturable"],
                 differentiable=group["differentiable"], lr=group["lr"], beta1=beta1,
                 beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                 decoupled=self._decoupled, maximize=group["maximize"],
                 grad_scale=getattr(self, "grad_scale", None),
                 found_inf=getattr(self, "found_inf", None))
        return loss


def _check_fused_param(p):
    """torch.optim's check, in its words, at the first step as torch does it (so that an
    optimizer over meta params can still be built)."""
    devices = fused_devices()
    if not (p.device.type in devices and (p.is_floating_point() or p.is_complex())):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {p.dtype} and {p.device.type}")


class AdaXW(AdaX):
    """AdaX with decoupled weight decay (``p *= 1 - lr * weight_decay``), as AdamW to Adam."""

    _decoupled = True

    def __init__(self, params, lr=5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-2,
                 **flags):
        """As AdaX, with AdaX-W's defaults; ``flags`` are AdaX's keyword-only flags."""
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)
