"""The package: build facts, kxops.info(), python -m kxops, the fallback switch."""

import os
import subprocess
import sys

import pytest
import torch

import kxops
from kxops import _ext


def test_extension_loaded_with_build_info():
    assert _ext.LOADED, _ext.LOAD_STATUS
    build = _ext.build_info()
    assert build["debug"] in ("0", "1")
    assert build["compiler"]


def test_cpu_kernels_built_with_torchs_parallel_backend():
    """at::parallel_for is inline: an extension built without OpenMP runs every CPU kernel on
    one thread while torch's own ops use all of them."""
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert _ext.build_info()["openmp"] != "0"


def test_cuda_sources_compiled_when_expected():
    """CI sets KXOPS_EXPECT_CUDA_BUILD=1 where nvcc and a CUDA torch exist."""
    build = _ext.build_info()
    if os.environ.get("KXOPS_EXPECT_CUDA_BUILD") == "1":
        assert "cuda_runtime" in build, f"CUDA sources were not built: {build}"
        archs = build["cuda_archs"].split(",")
        assert archs and all(a.isdigit() for a in archs), build
    if "cuda_runtime" in build:
        assert torch.version.cuda is not None


def test_info_lists_every_block_on_every_device():
    facts = kxops.info()
    assert facts["kxops"] == kxops.__version__
    assert facts["torch"] == torch.__version__
    assert set(facts["ops"]) == {"gated_conv", "zlpr", "adax", "linear_sparse_zlpr",
                                  "global_pointer_zlpr"}
    for row in facts["ops"].values():
        assert set(row) == {"cpu", "cuda"}
        assert row["cpu"] in ("kernel", "reference")
        assert row["cuda"] in ("kernel", "reference", "unavailable")


def _run_module(env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "kxops"], capture_output=True, text=True,
                          env=env, check=True).stdout


def test_python_m_kxops_prints_the_table():
    out = _run_module({})
    assert f"kxops {kxops.__version__}" in out
    for block in ("gated_conv", "zlpr", "adax"):
        assert block in out


def test_disable_ext_forces_the_reference_everywhere():
    out = _run_module({"KXOPS_DISABLE_EXT": "1"})
    assert "disabled by KXOPS_DISABLE_EXT" in out
    assert "kernel" not in out.split("op ")[-1]


def test_disabled_extension_still_runs_every_op():
    code = (
        "import torch, kxops\n"
        "x = torch.randn(2, 5, 4)\n"
        "assert kxops.nn.DGCNN(4)(x).shape == x.shape\n"
        "assert kxops.zlpr_loss(torch.randn(3, 6), torch.rand(3, 6) > 0.5).dim() == 0\n"
        "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.ones(3)\n"
        "kxops.optim.AdaXW([p]).step()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "KXOPS_DISABLE_EXT": "1"})


def test_binary_built_for_another_torch_warns_and_falls_back(tmp_path):
    """A wheel's binary under another torch minor version: one clear warning naming both
    versions, then the references run (never an undefined-symbol error or a crash)."""
    import shutil

    package = tmp_path / "kxops"
    shutil.copytree(os.path.dirname(kxops.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_C.json").write_text('{"torch": "1.99.0", "cuda": null}\n')
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import kxops\n"
        "from kxops import _ext\n"
        "messages = [str(w.message) for w in caught if 'kxops' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert '1.99.0' in messages[0] and torch.__version__ in messages[0], messages\n"
        "assert not _ext.LOADED and 'torch 1.99.0' in _ext.LOAD_STATUS\n"
        "assert kxops.zlpr_loss(torch.randn(3, 6), torch.rand(3, 6) > 0.5).dim() == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})


def test_build_records_the_torch_it_was_compiled_against():
    if not _ext.LOADED:
        pytest.skip(f"extension not loaded: {_ext.LOAD_STATUS}")
    import json

    with open(os.path.join(os.path.dirname(kxops.__file__), "_C.json")) as f:
        record = json.load(f)
    assert record["torch"] == torch.__version__
