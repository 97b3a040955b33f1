"""ZLPR loss, dense and sparse labels, forward / backward / full: kxops vs the reference, its
torch.compile, the bert4keras-style formulation users run, and BCEWithLogitsLoss (the built-in a
user might pick instead: the speed yardstick)."""

import pytest
import torch

import kxops
from benchmarks.harness import run_modes, size_for


def bert4keras_zlpr(logits, labels):
    """multilabel_categorical_crossentropy as bert4keras/bert4torch write it."""
    logits = (1 - 2 * labels) * logits
    neg = logits - labels * 1e12
    pos = logits - (1 - labels) * 1e12
    zeros = torch.zeros_like(logits[..., :1])
    neg = torch.cat([neg, zeros], dim=-1)
    pos = torch.cat([pos, zeros], dim=-1)
    return (torch.logsumexp(neg, dim=-1) + torch.logsumexp(pos, dim=-1)).mean()


def bert4keras_sparse_zlpr(logits, positives):
    """sparse_multilabel_categorical_crossentropy (mask_zero=False) as bert4keras writes it."""
    zeros = torch.zeros_like(logits[..., :1])
    logits = torch.cat([logits, zeros], dim=-1)
    pos_logits = torch.gather(logits, -1, positives)
    pos_loss = torch.logsumexp(torch.cat([-pos_logits, zeros], dim=-1), dim=-1)
    all_loss = torch.logsumexp(logits, dim=-1)
    aux_loss = torch.logsumexp(pos_logits, dim=-1) - all_loss
    aux_loss = torch.clamp(1 - torch.exp(aux_loss), 1e-7, 1)
    neg_loss = all_loss + torch.log(aux_loss)
    return (pos_loss + neg_loss).mean()


def bce(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


DENSE = {
    "kxops": kxops.zlpr_loss,
    "reference": kxops.reference.zlpr_loss,
    "compiled_reference": torch.compile(kxops.reference.zlpr_loss),
    "bert4keras": bert4keras_zlpr,
    "bce_with_logits": bce,
}
SPARSE = {
    "kxops": kxops.sparse_zlpr_loss,
    "reference": kxops.reference.sparse_zlpr_loss,
    "bert4keras": bert4keras_sparse_zlpr,
}
# Classification [rows, classes] and GlobalPointer [batch * heads, L * L].
SHAPES = {
    "cpu": [(1024, 1000), (256, 16384), (16 * 4, 128 * 128)],
    "cuda": [(4096, 1000), (4096, 30000), (64 * 12, 128 * 128), (64 * 12, 256 * 256)],
}
POSITIVES_PER_ROW = 16
PEER = "bert4keras"


def with_peer(losses, provider, labels):
    """run_modes' loss_of and peer_loss_of for this provider."""
    def loss_of(name):
        return lambda logits: losses[name](logits, labels)
    return loss_of(provider), loss_of(PEER) if provider != PEER else None


@pytest.mark.parametrize("provider", list(DENSE))
@pytest.mark.parametrize("shape_index", [0, 1, 2, 3])
def test_zlpr(benchmark, device, mode, provider, shape_index):
    shape = size_for(SHAPES[device.type], shape_index)
    logits = torch.randn(shape, device=device)
    labels = (torch.rand(shape, device=device) < 0.05).float()
    loss_of, peer_loss_of = with_peer(DENSE, provider, labels)
    # Minimum traffic: read logits and labels (fp32), write the gradient.
    run_modes(benchmark, mode, loss_of, logits, device, peer_loss_of=peer_loss_of,
              provider=provider, op="zlpr", shape=str(list(shape)), dtype="float32",
              peer=PEER, nbytes=3 * logits.numel() * 4)


@pytest.mark.parametrize("provider", list(SPARSE))
@pytest.mark.parametrize("shape_index", [0, 1, 2, 3])
def test_sparse_zlpr(benchmark, device, mode, provider, shape_index):
    shape = size_for(SHAPES[device.type], shape_index)
    logits = torch.randn(shape, device=device)
    positives = torch.randint(0, shape[1], (shape[0], POSITIVES_PER_ROW), device=device)
    loss_of, peer_loss_of = with_peer(SPARSE, provider, positives)
    run_modes(benchmark, mode, loss_of, logits, device, peer_loss_of=peer_loss_of,
              provider=provider, op="sparse_zlpr", shape=str(list(shape)), dtype="float32",
              peer=PEER, nbytes=2 * logits.numel() * 4)
