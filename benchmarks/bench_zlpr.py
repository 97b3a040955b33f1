"""ZLPR loss, forward+backward: kxops vs the reference, its torch.compile, the bert4keras-style
formulation users run, and BCEWithLogitsLoss (the speed yardstick)."""

import pytest
import torch

import kxops
from benchmarks.conftest import run_timed, size_for


def bert4keras_zlpr(logits, labels):
    """multilabel_categorical_crossentropy as bert4keras/bert4torch write it."""
    logits = (1 - 2 * labels) * logits
    neg = logits - labels * 1e12
    pos = logits - (1 - labels) * 1e12
    zeros = torch.zeros_like(logits[..., :1])
    neg = torch.cat([neg, zeros], dim=-1)
    pos = torch.cat([pos, zeros], dim=-1)
    return (torch.logsumexp(neg, dim=-1) + torch.logsumexp(pos, dim=-1)).mean()


PROVIDERS = {
    "kxops": kxops.zlpr_loss,
    "reference": kxops.reference.zlpr_loss,
    "compiled_reference": torch.compile(kxops.reference.zlpr_loss),
    "bert4keras": bert4keras_zlpr,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}
SHAPES = {"cpu": [(1024, 1000), (256, 128 * 128)], "cuda": [(4096, 1000), (4096, 30000),
                                                            (64 * 12, 256 * 256)]}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape_index", [0, 1, 2])
def test_zlpr_full(benchmark, device, provider, shape_index):
    shape = size_for(SHAPES[device.type], shape_index)
    logits = torch.randn(shape, device=device, requires_grad=True)
    labels = (torch.rand(shape, device=device) < 0.05).float()
    loss_fn = PROVIDERS[provider]

    def full():
        logits.grad = None
        loss_fn(logits, labels).backward()

    # Minimum traffic: read logits and labels (fp32), write the gradient.
    run_timed(benchmark, full, device, group=f"zlpr|full|{list(shape)}|float32",
              provider=provider, nbytes=3 * logits.numel() * 4, op="zlpr", mode="full",
              shape=str(list(shape)), dtype="float32", peer="bert4keras")
