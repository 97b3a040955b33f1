"""Nested NER with a DGCNN encoder + EfficientGlobalPointer, the span loss fused (no L x L grid),
trained with AdaX-W on synthetic nested spans with a known ground truth.

Each sequence (ragged lengths, padded) carries up to three entities of distinct types: an entity
of type c runs from an opening token open_c to a closing token close_c, and entities nest (an
inner one lies strictly inside an outer one) or sit side by side. Filler tokens are never markers.
The head scores every (start, end) span per type; ``EfficientGlobalPointer.loss`` computes the
sparse ZLPR loss over all spans of every (sequence, type) without building the grid, and
``.decode`` lists the spans scored above 0. Prints the span micro-F1 on held-out sequences and
the process's peak memory.

Usage: ``python examples/ner_global_pointer.py [--steps N] [--quick] [--length L]
[--grad-filter F]``; ``--compare-filter [--plot PNG]`` trains exact and with grad_filter 2**-12
from the same start and prints both span F1 (and draws both loss curves).
"""

import argparse
import resource
import sys
import time

import torch
from loss_curves import plot_loss_curves
from torch import nn

import kxops

VOCAB, TYPES, DIM, HEAD_SIZE = 96, 4, 64, 32


def make_markers(seed):
    """Opening and closing tokens of each type (distinct, never 0 = padding)."""
    tokens = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(seed))[:2 * TYPES]
    return (tokens + 1).view(2, TYPES)


def sample_batch(markers, batch, length, generator):
    """tokens [B, L], mask [B, L] (0/1 int, as bert4torch users pass it), gold spans [n, 4]
    (batch, type, start, end) sorted, positives [B, TYPES, 1] (start * L + end, -1: none)."""
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    tokens = torch.randint(1, VOCAB, (batch, length), generator=generator)
    tokens = torch.where(torch.isin(tokens, markers.flatten()), 0, tokens) * mask
    positives = torch.full((batch, TYPES, 1), -1)
    gold = []
    def draw(low, high):  # an int in [low, high)
        return low + int(torch.randint(0, high - low, (1,), generator=generator))

    for b in range(batch):
        n = int(lengths[b])
        types = torch.randperm(TYPES, generator=generator)[:3].tolist()
        # An outer entity, one nested strictly inside it, one beside it when there is room;
        # every entity spans at least two tokens.
        start = draw(0, n // 2 - 4)
        end = draw(start + 3, n // 2 + start)
        inner = draw(start + 1, end - 1)
        spans = [(types[0], start, end), (types[1], inner, draw(inner + 1, end))]
        if end + 2 < n:
            beside = draw(end + 1, n - 1)
            spans.append((types[2], beside, draw(beside + 1, min(n, beside + 6))))
        for c, i, j in spans:
            tokens[b, i], tokens[b, j] = markers[0, c], markers[1, c]
            positives[b, c, 0] = i * length + j
            gold.append((b, c, i, j))
    gold = torch.tensor(sorted(gold), dtype=torch.long).view(-1, 4)
    return tokens, mask, gold, positives


class Tagger(nn.Module):
    def __init__(self, grad_filter=0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder = kxops.nn.DGCNN(DIM, dilations=(1, 2, 5, 1), drop_gate=0.1)
        self.head = kxops.nn.EfficientGlobalPointer(DIM, TYPES, HEAD_SIZE,
                                                    grad_filter=grad_filter)

    def hidden(self, tokens, mask):
        return self.encoder(self.embed(tokens), mask.bool())

    def loss(self, tokens, mask, positives):
        return self.head.loss(self.hidden(tokens, mask), mask, positives)

    @torch.no_grad()
    def decode(self, tokens, mask):
        return self.head.decode(self.hidden(tokens, mask), mask)


def span_f1(predicted, gold):
    found = {tuple(row) for row in predicted.tolist()}
    wanted = {tuple(row) for row in gold.tolist()}
    return 2 * len(found & wanted) / max(len(found) + len(wanted), 1)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def train(steps, length, device, batch_size=16, seed=0, grad_filter=0.0, losses=None):
    """The span F1 on held-out sequences; losses (a list, if given) gets every step's loss."""
    torch.manual_seed(seed)
    markers = make_markers(seed)
    model = Tagger(grad_filter).to(device)
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=5e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    test = [t.to(device) for t in sample_batch(markers, 256, length,
                                               torch.Generator().manual_seed(seed + 2))]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        tokens, mask, _, positives = (t.to(device) for t in
                                      sample_batch(markers, batch_size, length, generator))
        loss = model.loss(tokens, mask, positives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if losses is not None:
            losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)")
    model.eval()
    tokens, mask, gold, _ = test
    return span_f1(model.decode(tokens, mask), gold)


def compare(args, steps, device):
    grad_filter = args.grad_filter or 2.0**-12
    runs = {}
    for name, value in (("exact", 0.0), (f"grad_filter={grad_filter:g}", grad_filter)):
        losses = []
        runs[name] = (losses, train(steps, args.length, device, grad_filter=value,
                                    losses=losses))
    for name, (_, f1) in runs.items():
        print(f"{name:24s} span micro-F1 {f1:.3f}")
    if args.plot:
        plot_loss_curves(runs, args.plot, "Nested NER, EfficientGlobalPointer")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=128, help="padded sequence length")
    parser.add_argument("--quick", action="store_true", help="a short run (a smoke test)")
    parser.add_argument("--min-f1", type=float, default=None,
                        help="exit non-zero if the span F1 ends below this")
    parser.add_argument("--grad-filter", type=float, default=0.0,
                        help="the head's grad_filter (0: exact; 2**-12 recommended)")
    parser.add_argument("--compare-filter", action="store_true",
                        help="train exact and with grad_filter 2**-12 (or --grad-filter)")
    parser.add_argument("--plot", help="with --compare-filter: a PNG of the two loss curves")
    args = parser.parse_args()
    steps = 40 if args.quick else args.steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.compare_filter:
        compare(args, steps, device)
        return
    f1 = train(steps, args.length, device, grad_filter=args.grad_filter)
    print(f"{steps} steps on {device.type}: span micro-F1 {f1:.3f}, peak memory of the process "
          f"{peak_memory_mib(device):.0f} MiB")
    if args.min_f1 is not None and f1 < args.min_f1:
        raise SystemExit(f"span micro-F1 {f1:.3f} is below {args.min_f1}")


if __name__ == "__main__":
    main()
