"""Build kxops._C: the CPU extension always, the CUDA sources too when torch and nvcc support it.

Environment: KXOPS_USE_CUDA=0|1 overrides the CUDA detection; TORCH_CUDA_ARCH_LIST picks the
archs (default 8.0;9.0 when no GPU is visible); MAX_JOBS caps parallel compiles; DEBUG=1 builds
with -O0 -g; KXOPS_LOCAL_VERSION sets a wheel's local version label (default: the torch and
device it is built for, e.g. +pt214cpu; empty: none, for a package index that refuses them).
A GPU is never needed to build.
"""

import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def set_default_cuda_home():
    """Point CUDA_HOME at a real toolkit before torch guesses it from `which nvcc`.

    torch takes the parent of nvcc's directory, which is wrong when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc): the link then fails to
    find libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime_api.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


set_default_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

MIN_PYTHON_HEX = "0x030A0000"  # the limited API of Python 3.10, our oldest supported Python
# Beside the binary: the torch it was compiled against, read by kxops._ext before loading it.
BUILD_RECORD = "_C.json"
# Metadata of a binary build (a wheel, `pip install .` or `-e .`, and the metadata pip prepares
# for them) pins this torch and labels the version; the sdist's stays loose and plain.
BUILDING_SDIST = "sdist" in sys.argv


def env_flag(name):
    """True/False when the variable is set, None when it is not."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def find_nvcc():
    if CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    requested = env_flag("KXOPS_USE_CUDA")
    possible = torch.version.cuda is not None and find_nvcc() is not None
    if requested and not possible:
        raise RuntimeError(
            "KXOPS_USE_CUDA=1 but the CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={find_nvcc()!r} (set CUDA_HOME)"
        )
    return possible if requested is None else requested


def relative_sources(pattern):
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def extensions(use_cuda):
    debug = bool(env_flag("DEBUG"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = ["-DKXOPS_DEBUG=1"] if debug else []
    cxx = [*opt, *defines, f"-DPy_LIMITED_API={MIN_PYTHON_HEX}", "-fdiagnostics-color=always",
           "-Wno-unknown-pragmas", "-Wno-psabi"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # at::vec is scalar code unless a capability is compiled in; kxops._ext refuses to load
        # the binary on an x86-64 CPU without AVX2 (the reference ops then run).
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if torch.backends.openmp.is_available() and platform.system() == "Linux":
        # at::parallel_for is inline: without _OPENMP it runs its whole range on one thread.
        # Compile only: the OpenMP runtime then resolves to the one libtorch_cpu loads, so
        # torch.set_num_threads governs these loops too and no second thread pool exists.
        cxx.append("-fopenmp")
    # A kernel's copies for other CPU capabilities (*_avx512.cpp: compiled for AVX-512 by a
    # pragma, picked at run time) are linked last: the linker keeps the first copy of an inline
    # function that several files compile, so code outside those kernels never runs theirs.
    capability_copies = relative_sources("csrc/cpu/*_avx512.cpp")
    sources = ["csrc/kxops.cpp",
               *(s for s in relative_sources("csrc/cpu/*.cpp") if s not in capability_copies)]
    kwargs = {}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch would otherwise build every arch it knows: slow and pointless.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cxx.append("-DKXOPS_WITH_CUDA=1")
        sources += relative_sources("csrc/cuda/*.cu")
        nvcc = [*opt, *defines, "-lineinfo", "--expt-relaxed-constexpr", "-DKXOPS_WITH_CUDA=1"]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        extension = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        extension = CppExtension
    sources += capability_copies
    print(f"kxops: building {'CPU+CUDA' if use_cuda else 'CPU-only'} extension"
          + (f" for archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if use_cuda else ""))
    return [
        extension(
            "kxops._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            py_limited_api=True,
            **kwargs,
        )
    ]


def torch_minor():
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def base_version():
    text = (ROOT / "kxops" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def version(use_cuda):
    """A wheel's version carries the torch and device it was built for as a local label
    (+pt214cpu, +pt214cu130), as torch's own +cpu/+cu130 wheels do: the abi3 file names of the
    variants are otherwise the same. The sdist keeps the plain version."""
    label = os.environ.get("KXOPS_LOCAL_VERSION")
    if label is None and not BUILDING_SDIST:
        device = "cu" + torch.version.cuda.replace(".", "") if use_cuda else "cpu"
        label = f"pt{torch_minor().replace('.', '')}{device}"
    return base_version() + (f"+{label}" if label else "")


def torch_requirement():
    """A binary build pins the torch minor version it was compiled against (torch's C++ ABI
    changes with every minor release); the sdist keeps the loose range."""
    return "torch>=2.4" if BUILDING_SDIST else f"torch=={torch_minor()}.*"


class BuildWithRecord(BuildExtension):
    """build_ext that also writes kxops/_C.json beside the binary: the torch (and CUDA) it was
    compiled against, so that an import under another torch warns and falls back to the
    references instead of failing on undefined symbols or worse."""

    def run(self):
        super().run()
        record = json.dumps({"torch": torch.__version__,
                             "cuda": torch.version.cuda if USE_CUDA else None})
        targets = {Path(self.get_ext_fullpath("kxops._C")).parent}
        if getattr(self, "editable_mode", False):  # pip install -e copies the binary back
            targets.add(ROOT / "kxops")
        for folder in targets:
            (folder / BUILD_RECORD).write_text(record + "\n")


USE_CUDA = want_cuda()
setup(
    version=version(USE_CUDA),
    install_requires=[torch_requirement(), "numpy"],
    ext_modules=extensions(USE_CUDA),
    cmdclass={"build_ext": BuildWithRecord.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
