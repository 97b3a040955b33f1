"""pytest fixtures of the benchmark suite (the harness itself is benchmarks/harness.py)."""

import os

import pytest
import torch

import kxops  # noqa: F401
from benchmarks.harness import DEVICES, MODES


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


# A progress bar over the whole suite when run by `make bench` (benchmarks/run.py).
_progress = None


def pytest_collection_finish(session):
    global _progress
    if os.environ.get("KXOPS_BENCH_PROGRESS"):
        try:
            from tqdm import tqdm
        except ImportError:  # a machine without tqdm just has no bar
            return
        _progress = tqdm(total=len(session.items), desc="make bench", unit="case")


def pytest_runtest_logfinish(nodeid, location):
    if _progress is not None:
        _progress.update(1)
