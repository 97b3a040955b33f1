"""Fused linear + sparse ZLPR fuzz: linear_sparse_zlpr_loss against the materialised path
sparse_zlpr_loss(F.linear(...)) over random sizes, block sizes, reductions, bias or not,
padding and duplicates, and NaN/inf at a random place (loss and gradients; inputs never
mutated). The hypothesis profile (quick in make test, long in make fuzz) is set in conftest."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kxops
from tests.utils import assert_close, needs_kernel

pytestmark = pytest.mark.fuzz


@st.composite
def cases(draw):
    rows = draw(st.integers(0, 9))
    features = draw(st.integers(0, 6))
    classes = draw(st.integers(0, 40))
    per_row = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    special = draw(st.sampled_from([None, "input", "weight", "bias"]))
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 30.0, -30.0]))
    return dict(rows=rows, features=features, classes=classes, per_row=per_row, seed=seed,
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                bias=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                block_rows=draw(st.sampled_from([None, 1, 2, 3, 7])),
                special=special, value=value)


@given(cases())
def test_matches_the_materialised_path(case):
    needs_kernel("linear_sparse_zlpr", "cpu")
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, rows, classes = case["dtype"], case["rows"], case["classes"]
    x = torch.randn(rows, case["features"], generator=generator, dtype=dtype)
    w = torch.randn(classes, case["features"], generator=generator, dtype=dtype)
    b = torch.randn(classes, generator=generator, dtype=dtype) if case["bias"] else None
    # Ids in range, padding (-1) and duplicates by construction: drawn from classes + 1 values.
    positives = torch.randint(-1, max(classes, 0), (rows, case["per_row"]), generator=generator)
    target = {"input": x, "weight": w, "bias": b}.get(case["special"])
    if target is not None and target.numel():
        target.view(-1)[torch.randint(target.numel(), (), generator=generator)] = case["value"]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    before = [t.clone() for t in (x, w, positives)]

    def run(fn):
        inputs = [t.detach().requires_grad_() if t is not None else None for t in leaves]
        loss = fn(inputs[0], inputs[1], inputs[2])
        grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype).view(loss.shape)
        present = [t for t in inputs if t is not None]
        return loss, torch.autograd.grad(loss, present, grad_out)

    ours = run(lambda x, w, b: kxops.linear_sparse_zlpr_loss(
        x, w, positives, b, reduction=case["reduction"], block_rows=case["block_rows"]))
    theirs = run(lambda x, w, b: kxops.sparse_zlpr_loss(F.linear(x, w, b), positives,
                                                        reduction=case["reduction"]))
    assert_close(ours[0], theirs[0])
    for got, want in zip(ours[1], theirs[1]):
        assert_close(got, want)
    for t, saved in zip((x, w, positives), before):
        torch.testing.assert_close(t, saved, rtol=0, atol=0, equal_nan=True)
