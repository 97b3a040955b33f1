"""Loading the compiled extension and knowing which kernels it registered.

``KXOPS_DISABLE_EXT=1`` skips the extension: every op then runs its reference. A failed load
warns once and leaves the references in charge; it never breaks ``import kxops``.
"""

import json
import os
import platform
import warnings

import torch

from kxops._checks import KERNEL_DTYPES

# Each op family's ops (what one wrapper calls); a family runs compiled on a device only if all
# of them have a kernel there. Kept by hand: which ops a wrapper needs together is a design
# choice that no schema records, the list must be known when the extension did not load
# (`python -m kxops` still reports every family), and torch has no public query for a
# namespace's ops.
OP_FAMILIES = {
    "gated_conv": ("gated_conv", "gated_conv_backward"),
    "zlpr": ("zlpr", "sparse_zlpr", "zlpr_backward"),
    "adax": ("adax_",),
    "linear_sparse_zlpr": ("linear_sparse_zlpr", "linear_sparse_zlpr_backward",
                           "linear_sparse_zlpr_partials", "linear_sparse_zlpr_partials_backward",
                           "linear_sparse_zlpr_block_rows", "sparse_zlpr"),
    "global_pointer_zlpr": ("global_pointer_zlpr", "sparse_zlpr"),
}
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _minor(version):
    return ".".join(version.split("+")[0].split(".")[:2])


def _build_mismatch():
    """Why the binary cannot run under this torch, from the record the build writes beside it
    (kxops/_C.json: the torch and CUDA it was compiled against), or None. torch's C++ ABI
    changes with every minor version: a binary built for another one fails on undefined
    symbols at best."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_C.json")) as f:
            built = json.load(f)
    except (OSError, ValueError):
        return None  # no record (an older build): the import itself decides
    if _minor(built["torch"]) != _minor(torch.__version__):
        return (f"it was built for torch {built['torch']}, but torch {torch.__version__} is "
                f"installed; install the kxops wheel built for torch {_minor(torch.__version__)} "
                "or rebuild from source")
    if built.get("cuda") and torch.version.cuda is None:
        return (f"it was built for a CUDA {built['cuda']} build of torch, but torch "
                f"{torch.__version__} is a CPU-only build; install the kxops CPU wheel")
    return None


def _load():
    if os.environ.get("KXOPS_DISABLE_EXT", "0") not in ("", "0"):
        return False, "disabled by KXOPS_DISABLE_EXT"
    mismatch = _build_mismatch()
    if mismatch:
        warnings.warn(f"kxops: not loading the compiled extension: {mismatch}. Using the "
                      "pure-PyTorch reference ops.", RuntimeWarning, stacklevel=3)
        return False, f"not loaded: {mismatch}"
    if platform.machine().lower() in ("x86_64", "amd64") and not torch.cpu._is_avx2_supported():
        # The x86-64 build's CPU kernels use AVX2/FMA (setup.py); running them here would crash.
        warnings.warn("kxops: this CPU lacks AVX2, which the compiled extension needs; using the "
                      "pure-PyTorch reference ops.", RuntimeWarning, stacklevel=3)
        return False, "not loaded: the CPU lacks AVX2"
    try:
        from kxops import _C  # noqa: F401  (importing it registers the ops)
    except Exception as exc:  # any failure must leave the reference path usable
        warnings.warn(
            f"kxops: the compiled extension failed to load ({exc}); using the pure-PyTorch "
            "reference ops. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, f"failed to load: {exc}"
    return True, "loaded"


LOADED, LOAD_STATUS = _load()


def _dispatcher_has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the dispatcher would run a kernel of kxops::<op> for the dispatch key, a
    device-generic (CompositeExplicitAutograd) one included: torch.library.get_kernel returns
    that kernel and raises when there is none. Older torch has no public query; there the
    dispatcher's private one answers the same question."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    if get_kernel is None:
        return torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"kxops::{op}",
                                                                      dispatch_key)
    try:
        get_kernel(f"kxops::{op}", dispatch_key)
    except RuntimeError:
        return False
    return True


def _registered_kernels():
    if not LOADED:
        return frozenset()
    return frozenset((op, device) for ops in OP_FAMILIES.values() for op in ops
                     for device, key in DEVICE_KEYS.items() if _dispatcher_has_kernel(op, key))


# Computed once at import so that wrappers test a constant set (no dispatcher query per call,
# nothing for torch.compile to trace).
KERNELS = _registered_kernels()


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether kxops::<op> has a compiled kernel for tensors on ``device``."""
    return (op, device.type) in KERNELS


def family_has_kernels(family: str, device_type: str) -> bool:
    return all((op, device_type) in KERNELS for op in OP_FAMILIES[family])


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) or a forward-mode AD dual level
    (torch.autograd.forward_ad) is active: the ops have a backward formula only (torch.library
    gives custom ops no forward-mode rule, and their tangents would be lost), so the wrappers
    run the references."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


def runs_compiled(family: str, tensor: torch.Tensor) -> bool:
    """Whether a wrapper runs the family's compiled ops on inputs like ``tensor``: every op of
    the family has a kernel for its device, the kernels take its dtype, and no transform is
    active (see transform_active)."""
    return (family_has_kernels(family, tensor.device.type) and tensor.dtype in KERNEL_DTYPES
            and not transform_active())


def needs_grad(*tensors) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _is_batched(t) -> bool:
    """Whether t is a vmap batched tensor (functorch's, or the legacy one of
    ``torch.autograd.grad(..., is_grads_batched=True)``): a plain ``torch.Tensor`` by type."""
    for name in ("is_functorch_wrapped_tensor", "is_legacy_batchedtensor"):
        query = getattr(torch._C._functorch, name, None)  # private: absent, assume not
        if query is not None and query(t):
            return True
    return False


def grad_is_one(grad_loss) -> bool:
    """Whether an upstream gradient is 1 everywhere (a plain ``loss.backward()``), asked only
    where the answer costs no synchronisation and values exist: a plain CPU tensor (not CUDA,
    not a tracer's fake, not under torch.compile). An op's gradient outputs are then the
    answer as they are, without a pass over them (autograd takes them as ``.grad`` where
    nothing else holds them, else copies them). Not a batched tensor either (autograd.grad's
    is_grads_batched, vmap): it has no value to read per call."""
    if (type(grad_loss) is not torch.Tensor or grad_loss.device.type != "cpu"
            or torch.compiler.is_compiling() or _is_batched(grad_loss)):
        return False
    return grad_loss.item() == 1 if grad_loss.dim() == 0 else bool(torch.all(grad_loss == 1))


def graph_kept() -> bool:
    """Whether the running backward keeps its graph (retain_graph=True, create_graph): its
    saved tensors then outlive it, so a saved tensor returned as a gradient would alias them
    (torch.autograd.grad hands it out as it is: changing it in place would change the graph's
    copy). True where torch cannot say (the query is private)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def autocast(anchor, *tensors):
    """``tensors``, their floating ones cast to the autocast dtype where autocast is on for the
    device of ``anchor`` (a floating tensor other than float64, which autocast leaves alone), as
    a matmul or convolution there would run; else as they are."""
    if not (isinstance(anchor, torch.Tensor) and anchor.is_floating_point()
            and anchor.dtype != torch.float64):
        return tensors
    device_type = anchor.device.type
    # is_autocast_enabled raises for device types without autocast (meta, ...).
    if not (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


def build_info() -> dict:
    """How the loaded binary was built, parsed from kxops::_build_info()."""
    if not LOADED:
        return {}
    text = torch.ops.kxops._build_info()
    return dict(item.split("=", 1) for item in text.split(";") if item)
