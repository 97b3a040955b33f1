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


def assert_raises_isolated(code, error, match, timeout=120):
    """`code` run in a fresh process must raise `error` (an exception class name, e.g.
    "ValueError") whose message matches the regex `match`, never crash or hang."""
    import re

    result = run_isolated(code, timeout=timeout)
    assert result.returncode == 1, (
        f"expected {error}, got exit code {result.returncode}\n{result.stdout}\n{result.stderr}")
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert last.startswith(f"{error}:") or f".{error}:" in last.split(" ")[0], last
    assert re.search(match, last), (match, last)
