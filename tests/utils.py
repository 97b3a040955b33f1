"""Helpers shared by the test files (pytest's own fixtures stay in conftest.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kxops import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_kernel(op, device):
    """Skip unless kxops::<op> has a compiled kernel for `device`."""
    if not _ext.has_kernel(op, torch.device(device)):
        pytest.skip(f"no compiled kxops::{op} kernel for {device}")


def run_isolated(code, timeout=120, env=None):
    """Run `code` in a fresh Python process (so a crash or a hang shows as a failed run, not a
    dead test session); returns the CompletedProcess with its stdout and stderr as text."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=environ)


def direct_call_outcomes(calls, prelude=""):
    """Evaluates each expression of ``calls`` ({case: "torch.ops.kxops.<op>(...)"}) in one
    fresh process (after ``prelude``) and returns {case: "ErrorType first line of message"}, or
    "no error": a crash fails here, naming the case it stopped at."""
    result = run_isolated(f"""
        import torch, kxops
        {textwrap.indent(textwrap.dedent(prelude), " " * 8).strip()}
        for name, call in {calls!r}.items():
            print("CASE", name, flush=True)
            try:
                eval(call)
                print("RESULT no error", flush=True)
            except Exception as exc:
                print("RESULT", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    """)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("CASE", "RESULT"))]
    assert result.returncode == 0, (lines[-1:], result.stderr[-2000:])
    return dict(zip((line[5:] for line in lines[0::2]), (line[7:] for line in lines[1::2])))


def dispatched_ops(fn):
    """The names of the ATen and custom ops that one call of fn() dispatches, in order (as
    "_foreach_mul_", "zlpr_backward"): what a fused path claims to run, checked."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.ops


# Tolerances per dtype (atol, rtol) for comparing an op against kxops.reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
]


def cuda_with_memory(gib):
    """Marks a test as cuda and skips it unless the GPU has at least `gib` GiB of memory (the
    tests of offsets past 2^31 elements)."""
    enough = (torch.cuda.is_available()
              and torch.cuda.get_device_properties(0).total_memory >= gib * 2**30)
    skip = pytest.mark.skipif(not enough, reason=f"needs a CUDA GPU with {gib} GiB")
    return lambda test: pytest.mark.cuda(skip(test))


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def assert_error_rule(ours, theirs, exact, dtype):
    """fp16/bf16 rule (docs/design.md §6): our error against an fp64 result is at most twice
    the error of the reference run at that precision, plus the dtype's tolerance (for exact
    references)."""
    if not exact.numel():
        return
    atol, rtol = TOLERANCES[dtype]
    our_error = (ours.double() - exact).abs().max().item()
    their_error = (theirs.double() - exact).abs().max().item()
    floor = atol + rtol * exact.abs().max().item()
    assert our_error <= 2 * their_error + floor, (our_error, their_error, floor)


def switched(set_choice, choice):
    """A fixture's body: one of the extension's internal run-time choices (set_choice, e.g.
    torch.ops.kxops._set_cpu_gemm_engine) set to choice for the test, skipped where this build
    or CPU has no such choice (the setter's ValueError), "auto" restored after."""
    if not _ext.LOADED:
        pytest.skip("the extension is not loaded")
    try:
        set_choice(choice)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        yield choice
    finally:
        set_choice("auto")
