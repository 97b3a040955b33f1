"""Extreme multi-label classification with kxops.nn.LinearZLPR on synthetic data of
Amazon-670K's shape (670,091 labels, about 5.45 labels per example), scaled by --scale.

Each label has a random prototype in feature space; an example draws its labels (a power law
over the labels, as in XMC data sets) and its features are the normalised sum of their
prototypes plus noise. A linear head is trained with the sparse ZLPR loss, never holding the
[batch, labels] logits, and evaluated with precision at 1, 3 and 5 (predict(k=5), block by
block). Prints the peak memory next to what one batch's logits and their gradient would take.

    python examples/xmc_linear_zlpr.py                 # 13.4K labels: a few minutes on 2 CPU cores
    python examples/xmc_linear_zlpr.py --scale 1       # the full 670K labels (a GPU's job)
    python examples/xmc_linear_zlpr.py --scale 0.002   # a quick check
    python examples/xmc_linear_zlpr.py --compare-filter --plot curves.png
        # trained exact and with grad_filter=2**-12 from the same start: P@k side by side,
        # and the two loss curves in one PNG
"""

import argparse
import time

import torch
from loss_curves import plot_loss_curves

import kxops

AMAZON_670K_LABELS = 670_091
LABELS_PER_EXAMPLE = 5.45


def synthetic(num_labels, examples, dim, generator, prototypes):
    """(features [examples, dim], positives [examples, P] padded with -1)."""
    per_row = int(2 * LABELS_PER_EXAMPLE)
    counts = torch.poisson(torch.full((examples,), LABELS_PER_EXAMPLE - 1), generator=generator)
    counts = counts.long().clamp(max=per_row - 1) + 1
    # Power-law label popularity: label ranks drawn as floor(num_labels * u^2).
    u = torch.rand(examples, per_row, generator=generator)
    labels = (num_labels * u.square()).long().clamp(max=num_labels - 1)
    labels = torch.where(torch.arange(per_row) < counts[:, None], labels, -1)
    weights = (labels >= 0).float()
    x = (prototypes[labels.clamp(min=0)] * weights[..., None]).sum(1)
    noise = torch.randn(examples, dim, generator=generator) * (0.3 / dim**0.5)
    x = x / x.norm(dim=1, keepdim=True) + noise
    return x, labels


def precision_at(indices, positives, k):
    hits = (indices[:, :k, None] == positives[:, None, :]).any(-1).float()
    return hits.sum(1).div(k).mean().item()


class PeakMemory:
    """Peak memory growth from start(): CUDA's allocator statistics, or on a CPU the process's
    resident-set high-water mark (Linux /proc, reset at start)."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.before = self._status("VmRSS")

    def growth(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return self._status("VmHWM") - self.before


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.02,
                        help="fraction of Amazon-670K's label count (default 0.02: 13.4K "
                             "labels, a few minutes on 2 CPU cores)")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension")
    parser.add_argument("--examples-per-label", type=float, default=2.0,
                        help="training examples per label")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-filter", type=float, default=0.0,
                        help="LinearZLPR's grad_filter (0: exact; 2**-12 recommended)")
    parser.add_argument("--compare-filter", action="store_true",
                        help="train exact and with grad_filter 2**-12 (or --grad-filter) from "
                             "the same start; print P@k side by side")
    parser.add_argument("--plot", help="with --compare-filter: a PNG of the two loss curves")
    parser.add_argument("--filter-from-epoch", type=int, default=1,
                        help="the epoch (from 0) from which the filter applies: at initialisation "
                             "every negative's gradient is about 1/labels, below 2**-12 for more "
                             "than 4096 labels, so the filter would drop all of them")
    args = parser.parse_args()
    if args.compare_filter:
        compare(args)
    else:
        train(args, args.grad_filter)


def compare(args):
    """The same run exact and filtered: P@1/3/5 side by side, the loss curves in one PNG."""
    grad_filter = args.grad_filter or 2.0**-12
    runs = {"exact": train(args, 0.0), f"grad_filter={grad_filter:g}": train(args, grad_filter)}
    print("\n" + " " * 24 + "  ".join(f"P@{k}" for k in (1, 3, 5)))
    for name, (_, precision) in runs.items():
        print(f"{name:24s}" + "  ".join(f"{p:.3f}" for p in precision))
    if args.plot:
        plot_loss_curves(runs, args.plot, "LinearZLPR on synthetic Amazon-670K-like data")


def train(args, grad_filter):
    """Trains a head from args.seed; returns (the batch losses, test P@1, P@3, P@5)."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    num_labels = max(10, round(AMAZON_670K_LABELS * args.scale))
    prototypes = torch.randn(num_labels, args.dim, generator=generator)
    train_x, train_y = synthetic(num_labels, int(num_labels * args.examples_per_label),
                                 args.dim, generator, prototypes)
    test_x, test_y = synthetic(num_labels, 4096, args.dim, generator, prototypes)
    print(f"{num_labels} labels, {train_x.shape[0]} training examples of {args.dim} features, "
          f"{(train_y >= 0).sum(1).float().mean():.2f} labels per example, on {device}")

    head = kxops.nn.LinearZLPR(args.dim, num_labels, grad_filter=grad_filter, device=device)
    optimizer = kxops.optim.AdaXW(head.parameters(), lr=args.lr)
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    losses = []
    for epoch in range(args.epochs):
        head.grad_filter = grad_filter if epoch >= args.filter_from_epoch else 0.0
        order = torch.randperm(train_x.shape[0], generator=generator)
        total = 0.0
        for batch in order.split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = head(train_x[batch].to(device), train_y[batch].to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            total += losses[-1] * batch.numel()
        print(f"grad_filter={grad_filter:g} epoch {epoch + 1}: loss "
              f"{total / train_x.shape[0]:.4f} "
              f"({time.perf_counter() - start:.0f} s)")

    grown = memory.growth()
    logits_bytes = 2 * args.batch_size * num_labels * 4
    print(f"peak memory growth while training: {grown / 2**20:.0f} MiB "
          f"({'allocated' if device.type == 'cuda' else 'resident'}); one batch's "
          f"materialised logits and their gradient alone: {logits_bytes / 2**20:.0f} MiB")
    _, top = head.predict(test_x.to(device), k=5)
    top, positives = top.cpu(), test_y
    precision = [precision_at(top, positives, k) for k in (1, 3, 5)]
    print("test " + ", ".join(f"P@{k} {p:.3f}" for k, p in zip((1, 3, 5), precision)))
    return losses, precision


if __name__ == "__main__":
    main()
