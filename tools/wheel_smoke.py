"""Smoke test of an installed kxops (a wheel or an sdist build), run outside the checkout:
the binary loaded, every CPU kernel in use, each op and the fused optimizer step against the
reference. `python tools/wheel_smoke.py` from any directory; exits non-zero on a failure."""

import os
import sys

import torch

import kxops
from kxops import _ext


def main():
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = os.path.dirname(os.path.abspath(kxops.__file__))
    assert not installed.startswith(checkout + os.sep), f"kxops imported from {installed}"
    assert _ext.LOADED, _ext.LOAD_STATUS
    for family in _ext.OP_FAMILIES:
        assert _ext.family_has_kernels(family, "cpu"), f"no CPU kernel for {family}"

    torch.manual_seed(0)
    x = torch.randn(2, 9, 8, requires_grad=True)
    w, b = torch.randn(16, 8, 3) / 3, torch.randn(16)
    mask = torch.arange(9)[None] < torch.tensor([[9], [4]])
    ours = kxops.dilated_gated_conv1d(x, w, b, mask, dilation=2)
    theirs = kxops.reference.dilated_gated_conv1d(x, w, b, mask, dilation=2)
    torch.testing.assert_close(ours, theirs)
    grads = [torch.autograd.grad(y.sum(), x)[0] for y in (ours, theirs)]
    torch.testing.assert_close(*grads)

    logits = torch.randn(4, 50) * 3
    labels = torch.rand(4, 50) < 0.1
    positives = torch.tensor([[1, 2, -1], [3, -1, -1], [0, 49, 7], [-1, -1, -1]])
    torch.testing.assert_close(kxops.zlpr_loss(logits, labels),
                               kxops.reference.zlpr_loss(logits, labels))
    torch.testing.assert_close(kxops.sparse_zlpr_loss(logits, positives),
                               kxops.reference.sparse_zlpr_loss(logits, positives))

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 7), (13,)]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = kxops.optim.AdaXW(params, fused=True)
    loop = kxops.optim.AdaXW(copies, foreach=False)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q)
    print(f"kxops {kxops.__version__} from {installed}: smoke test passed")


if __name__ == "__main__":
    sys.exit(main())
