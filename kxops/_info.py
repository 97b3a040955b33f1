"""kxops.info(): versions, how the extension was built, the CPU and its GEMM engine, and which
backend each op uses."""

import platform

import torch

from kxops import _ext
from kxops._version import __version__


def _backend(family, device_type):
    if _ext.family_has_kernels(family, device_type):
        return "kernel"
    if device_type == "cuda" and torch.version.cuda is None:
        return "unavailable"  # this torch cannot run anything on CUDA
    return "reference"


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor", "AMD EPYC 9R14 96-Core Processor"),
    from /proc/cpuinfo on Linux, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_gemm_engine() -> dict:
    """The engine of the fused ops' CPU GEMMs (csrc/gemm.h: "mkl" or "onednn", chosen from the
    CPU's vendor, KXOPS_CPU_GEMM overrides) and why; engine None with the error where the
    choice fails (a bad KXOPS_CPU_GEMM) or the extension is not loaded."""
    if not _ext.LOADED:
        return {"engine": None, "reason": "extension not loaded"}
    try:
        engine, reason = torch.ops.kxops._cpu_gemm_engine().split(";", 1)
    except (ValueError, RuntimeError) as e:
        return {"engine": None, "reason": str(e)}
    return {"engine": engine, "reason": reason}


def info() -> dict:
    """Versions, build facts and the backend (kernel/reference/unavailable) of each op."""
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "kxops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "cpu": cpu_model(),
        "cpu_gemm": cpu_gemm_engine(),
        # The copy of the AdaX CPU kernel that runs (csrc/adax_cpu.h; ATEN_CPU_CAPABILITY lowers
        # it).
        "adax_cpu_kernel": torch.ops.kxops._adax_cpu_kernel() if _ext.LOADED else None,
        "extension": _ext.LOAD_STATUS,
        "build": _ext.build_info(),
        "ops": {family: {dev: _backend(family, dev) for dev in _ext.DEVICE_KEYS}
                for family in _ext.OP_FAMILIES},
    }


def format_info(facts: dict) -> str:
    build = facts["build"]
    archs = build.get("cuda_archs")
    lines = [
        f"kxops {facts['kxops']}  torch {facts['torch']}  "
        f"CUDA (torch) {facts['torch_cuda'] or 'none'}",
        f"extension: {facts['extension']}",
        (f"built: CUDA {'yes' if 'cuda_runtime' in build else 'no'}"
         + (f", runtime {build['cuda_runtime']}, archs {archs}" if archs else "")
         + f", debug={build['debug']}, OpenMP {build.get('openmp', '?')}, {build['compiler']}")
        if build
        else "built: (extension not loaded)",
        f"GPUs visible: {', '.join(facts['gpus']) or 'none'}",
        f"CPU: {facts['cpu']}",
        f"CPU GEMM engine: {facts['cpu_gemm']['engine'] or 'none'} "
        f"({facts['cpu_gemm']['reason']})",
        f"AdaX CPU kernel: {facts['adax_cpu_kernel'] or 'none'}",
        "",
    ]
    rows = [("op", "cpu", "cuda")] + [(op, r["cpu"], r["cuda"]) for op, r in facts["ops"].items()]
    width = max(len(op) for op, _, _ in rows) + 2
    lines += [f"{op:<{width}}{cpu:<12}{cuda}" for op, cpu, cuda in rows]
    return "\n".join(lines)
