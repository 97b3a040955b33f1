"""AdaX and AdaX-W as ``torch.optim.Optimizer`` drop-ins (flags as in ``torch.optim.AdamW``)."""

import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype, _use_grad_for_differentiable

from kxops._checks import check_hyperparameters, check_state_options
from kxops.adax import adax, fused_devices, resolve_path
from kxops.reference import adax as ref

__all__ = ["AdaX", "AdaXW"]

_FLAG_DEFAULTS = dict(foreach=None, fused=None, capturable=False, maximize=False,
                      differentiable=False, state_dtype=None, stochastic_rounding=None)


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

    ``state_dtype`` (``None``, ``torch.float32``, ``torch.bfloat16`` or ``torch.uint8``) is the
    moments' storage for fp32/fp16/bf16 params (fp64 params keep fp64 state): ``None`` as
    above; ``torch.uint8`` is 8-bit state, one fp32 scale per 128 elements per moment (2.06
    bytes per param). The math is fp32 whatever is stored. ``stochastic_rounding``: ``None``
    rounds stochastically (unbiased, reproducible from a seed drawn from torch's default CPU
    generator at the first step that rounds and saved in ``state_dict``) exactly where a bf16
    or uint8 ``state_dtype`` was chosen, the moments and then fp16/bf16 params too; ``True``
    every value stored in fewer bits than fp32; ``False`` rounds to nearest, which freezes a
    bf16 ``v_hat`` once its weight on a new gradient falls below about 2^-9 (docs/design.md).
    """

    _decoupled = False

    def __init__(self, params, lr=1.5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-4, *,
                 foreach=None, fused=None, capturable=False, maximize=False,
                 differentiable=False, state_dtype=None, stochastic_rounding=None):
        check_hyperparameters(lr, betas, eps, weight_decay)
        check_state_options(state_dtype, stochastic_rounding)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                        differentiable=differentiable, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        """As ``Optimizer.add_param_group``, with a group's own ``state_dtype`` and
        ``stochastic_rounding`` checked as the constructor checks them."""
        check_state_options(param_group.get("state_dtype"),
                            param_group.get("stochastic_rounding"))
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict):
        """As ``Optimizer.load_state_dict``, but the moments keep this optimizer's format.

        Each group keeps its own ``state_dtype`` and ``stochastic_rounding`` and the moments
        are converted to its ``state_dtype`` (rounded to nearest) from whatever format they
        were saved in (the base class would cast them, 8-bit codes and scales included, to the
        param's dtype). Compact tensors that do not fit their param raise a ValueError before
        anything changes.
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            _check_saved_state(state_dict["state"].get(saved_id, {}), saved_id, param)
            _check_saved_seed(state_dict["state"].get(saved_id, {}), saved_id)
        options = [(g["state_dtype"], g["stochastic_rounding"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (chosen, stochastic) in zip(self.param_groups, options):
            group["state_dtype"], group["stochastic_rounding"] = chosen, stochastic
        groups = [g for g in self.param_groups for _ in g["params"]]
        for saved_id, param, group in zip(saved_ids, params, groups):
            saved = state_dict["state"].get(saved_id, {})
            state = self.state[param]
            if "exp_avg" in saved:
                for key in ref.SCALE_KEYS:
                    state.pop(key, None)
                state.update(_converted_moments(saved, param, group["state_dtype"]))
            if "rounding_seed" in saved:
                state["rounding_seed"] = saved["rounding_seed"]

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

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps,
                    compact):
        """The lists of the params with a grad; returns (fused, foreach) as resolved for
        them. ``compact`` gets the block scales and rounding seeds."""
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("AdaX does not support sparse gradients")
            params.append(p)
            grads.append(grad)
        fused, foreach = resolve_path(params, foreach=group["foreach"], fused=group["fused"],
                                      differentiable=group["differentiable"])
        step_on_param_device = fused or group["capturable"]
        m_scales, v_scales, seeds = (compact[key] for key in (*ref.SCALE_KEYS, "seeds"))
        formats = {}  # per param dtype: (the moments' dtype, whether its step rounds)
        for p in params:
            state = self.state[p]
            want, rounds = formats.get(p.dtype) or formats.setdefault(
                p.dtype, self._format(p.dtype, group))
            if len(state) == 0:
                if fused:
                    _check_fused_param(p)
                state["step"] = torch.zeros(
                    (), dtype=torch.float32 if step_on_param_device else _get_scalar_dtype(),
                    device=p.device if step_on_param_device else "cpu")
                state.update(_zero_moments(p, want))
            else:
                state["step"] = self._step_tensor(state["step"], p, step_on_param_device)
                if state["exp_avg"].dtype != want:  # the group's state_dtype was changed
                    moments = _converted_moments(state, p, group["state_dtype"])
                    for key in ref.SCALE_KEYS:
                        state.pop(key, None)
                    state.update(moments)
            if rounds and "rounding_seed" not in state:
                state["rounding_seed"] = int(torch.randint(0, 2**63 - 1, ()).item())
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            m_scales.append(state.get("exp_avg_scales"))
            v_scales.append(state.get("exp_avg_sq_scales"))
            seeds.append(state.get("rounding_seed"))
        return fused, foreach

    @staticmethod
    def _format(param_dtype, group):
        """(the moments' dtype, whether a step rounds stochastically) of a param dtype."""
        want = ref.state_dtype(param_dtype, group["state_dtype"])
        return want, ref.rounds_stochastically(param_dtype, want, group["stochastic_rounding"],
                                               group["state_dtype"])

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # a group's options changed since: before any step
            check_state_options(group["state_dtype"], group["stochastic_rounding"])
        for group in self.param_groups:
            lists = ([], [], [], [], [])
            compact = dict(exp_avg_scales=[], exp_avg_sq_scales=[], seeds=[])
            fused, foreach = self._init_group(group, *lists, compact)
            if len(lists[0]) == 0:
                continue
            beta1, beta2 = group["betas"]
            stochastic = group["stochastic_rounding"]
            if stochastic is None:
                stochastic = group["state_dtype"] in ref.COMPACT
            adax(*lists, foreach=foreach, fused=fused, capturable=group["capturable"],
                 stochastic_rounding=stochastic, **compact,
                 differentiable=group["differentiable"], lr=group["lr"], beta1=beta1,
                 beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                 decoupled=self._decoupled, maximize=group["maximize"],
                 grad_scale=getattr(self, "grad_scale", None),
                 found_inf=getattr(self, "found_inf", None))
        return loss


def _real(p):
    return torch.view_as_real(p) if p.is_complex() else p


def _zero_moments(p, dtype):
    """Fresh state of a param: both moments in ``dtype``, with block scales when 8-bit."""
    real = _real(p)
    like = p if dtype.is_complex else real  # complex state without state_dtype, as before
    state = {key: torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
             for key in ("exp_avg", "exp_avg_sq")}
    if dtype == torch.uint8:
        for key in ref.SCALE_KEYS:
            state[key] = torch.zeros(ref.blocks_of(real.numel()), dtype=torch.float32,
                                     device=p.device)
    return state


def _converted_moments(saved, p, chosen):
    """The moments of ``saved`` (any format) in the state_dtype ``chosen`` for param p,
    rounded to nearest, on p's device."""
    real = _real(p)
    want = ref.state_dtype(p.dtype, chosen)
    m, v = (saved[key].to(p.device) for key in ("exp_avg", "exp_avg_sq"))
    scales = None
    if m.dtype == torch.uint8:
        scales = tuple(saved[key].to(device=p.device, dtype=torch.float32)
                       for key in ref.SCALE_KEYS)
    m, v = (_real(x) for x in ref.load_moments(real, m, v, scales))
    state = _zero_moments(p, want)
    if want in ref.COMPACT:
        ref.store_moments_(real, state["exp_avg"], state["exp_avg_sq"],
                           tuple(state.get(key) for key in ref.SCALE_KEYS), m, v, None, False)
    else:
        _real(state["exp_avg"]).copy_(m)
        _real(state["exp_avg_sq"]).copy_(v)
    return state


def _check_saved_state(saved, saved_id, p):
    """A saved param state whose moments (codes, scales) do not fit param p: ValueError."""
    real = _real(p)
    where = f"AdaX.load_state_dict: state_dict['state'][{saved_id}]"
    if "exp_avg" not in saved:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        t = saved.get(key)
        if not isinstance(t, torch.Tensor) or _real(t).shape != real.shape:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{where}['{key}'] must be a tensor of shape {list(real.shape)} "
                             f"(its param's), got {shape}")
    if saved["exp_avg"].dtype != saved["exp_avg_sq"].dtype:
        raise ValueError(f"{where}: exp_avg and exp_avg_sq have dtypes "
                         f"{saved['exp_avg'].dtype} and {saved['exp_avg_sq'].dtype}")
    dtype = saved["exp_avg"].dtype
    if not (dtype.is_floating_point or dtype.is_complex or dtype == torch.uint8):
        raise ValueError(f"{where}['exp_avg'] and ['exp_avg_sq'] must be floating-point "
                         f"moments or uint8 codes, got {dtype}")
    if dtype != torch.uint8:
        return
    blocks = ref.blocks_of(real.numel())
    for key in ref.SCALE_KEYS:
        t = saved.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != blocks:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{where}['{key}'] must have shape [{blocks}] (one scale per "
                             f"{ref.BLOCK} of the param's {real.numel()} elements), got {shape}")
        if t.dtype != torch.float32:
            raise ValueError(f"{where}['{key}'] must be float32 (the blocks' scales), got "
                             f"{t.dtype}")
        codes = saved[key.removesuffix("_scales")]
        bad = ~ref.canonical_scales(t, codes)
        if bool(bad.any()):
            block = int(bad.nonzero()[0, 0])
            raise ValueError(f"{where}['{key}'][{block}] = {t[block].item()!r} is not a scale "
                             "the optimizer writes (a power of two in [2**-100, 2**127], or 0 "
                             "for a block whose codes are all 0)")


def _check_saved_seed(saved, saved_id):
    """A saved rounding seed that is not a Python int in [0, 2^63): ValueError."""
    if "rounding_seed" not in saved:
        return
    seed = saved["rounding_seed"]
    if type(seed) is not int or not 0 <= seed < 2**63:  # bool is no seed; a float is lossy
        raise ValueError(f"AdaX.load_state_dict: state_dict['state'][{saved_id}]"
                         f"['rounding_seed'] must be an int in [0, 2**63), got {seed!r}")


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
