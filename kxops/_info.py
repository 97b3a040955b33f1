"""kxops.info(): versions, how the extension was built, and which backend each op uses."""

import torch

from kxops import _ext
from kxops._version import __version__


def _backend(block, device_type):
    if _ext.block_has_kernels(block, device_type):
        return "kernel"
    if device_type == "cuda" and torch.version.cuda is None:
        return "unavailable"  # this torch cannot run anything on CUDA
    return "reference"


def info() -> dict:
    """Versions, build facts and the backend (kernel/reference/unavailable) of each op."""
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "kxops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "extension": _ext.LOAD_STATUS,
        "build": _ext.build_info(),
        "ops": {block: {dev: _backend(block, dev) for dev in _ext.DEVICE_KEYS}
                for block in _ext.BLOCK_OPS},
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
        "",
    ]
    rows = [("op", "cpu", "cuda")] + [(op, r["cpu"], r["cuda"]) for op, r in facts["ops"].items()]
    width = max(len(op) for op, _, _ in rows) + 2
    lines += [f"{op:<{width}}{cpu:<12}{cuda}" for op, cpu, cuda in rows]
    return "\n".join(lines)
