"""DGCNN encoder + ZLPR heads + AdaX-W on a synthetic task with a known ground truth.

Sequences of random tokens (ragged lengths, padded) carry planted "events": event c is the
token pair (a_c, b_c) with b_c exactly gap_c steps after a_c. Two heads read one DGCNN encoder:

* a multi-label head (masked max-pool + linear, dense ZLPR loss): which events occur;
* a GlobalPointer-style span head (sparse ZLPR loss over the L x L start/end grid, padding and
  end-before-start at -inf): where each event occurs, as (start, end) spans.

Seeing a pair `gap` steps apart needs the dilated convolutions' receptive field, so the task is
not solvable token by token. Usage: `python examples/train_multilabel_dgcnn.py [--steps N]`;
`make demo` also times the same steps with KXOPS_DISABLE_EXT=1 (reference ops).
"""

import argparse
import os
import time

import torch
from torch import nn
from tqdm import tqdm

import kxops

VOCAB, EVENTS, MAX_LEN, DIM = 64, 12, 48, 64


def make_task(seed):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randperm(VOCAB - 1, generator=generator)[:EVENTS] + 1
    second = torch.randperm(VOCAB - 1, generator=generator)[:EVENTS] + 1
    gaps = torch.randint(1, 6, (EVENTS,), generator=generator)
    return first, second, gaps


def sample_batch(task, batch, generator):
    """tokens [B, L], mask [B, L], labels [B, EVENTS] (bool), spans [B, EVENTS, 2] (-1: none)."""
    first, second, gaps = task
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (batch,), generator=generator)
    mask = torch.arange(MAX_LEN)[None] < lengths[:, None]
    # Filler tokens never form an event: pair tokens are drawn only where planted.
    tokens = torch.randint(1, VOCAB, (batch, MAX_LEN), generator=generator)
    filler = ~torch.isin(tokens, torch.cat([first, second]))
    tokens = torch.where(filler, tokens, 0)
    labels = torch.zeros(batch, EVENTS, dtype=torch.bool)
    spans = torch.full((batch, EVENTS, 2), -1)
    for b in range(batch):
        for c in torch.randperm(EVENTS, generator=generator)[:3].tolist():
            start = int(torch.randint(0, int(lengths[b] - gaps[c]), (1,), generator=generator))
            end = start + int(gaps[c])
            if labels[b].any() and (spans[b, :, :] >= 0).any():
                taken = spans[b][spans[b, :, 0] >= 0]
                if ((taken[:, 0] <= end) & (taken[:, 1] >= start)).any():
                    continue  # keep planted spans apart
            tokens[b, start], tokens[b, end] = first[c], second[c]
            labels[b, c] = True
            spans[b, c] = torch.tensor([start, end])
    return tokens * mask, mask, labels, spans


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder = kxops.nn.DGCNN(DIM, dilations=(1, 2, 5, 1), drop_gate=0.1)
        self.classify = nn.Linear(DIM, EVENTS)
        self.span_qk = nn.Linear(DIM, 2 * EVENTS * 16)

    def forward(self, tokens, mask):
        h = self.encoder(self.embed(tokens), mask)                          # [B, L, D]
        pooled = h.masked_fill(~mask[..., None], -torch.inf).amax(1)
        q, k = self.span_qk(h).view(*tokens.shape, 2, EVENTS, 16).unbind(2)
        spans = torch.einsum("bihd,bjhd->bhij", q, k) / 4                 # [B, E, L, L]
        valid = mask[:, None, :, None] & mask[:, None, None, :]
        upper = torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool, device=tokens.device).triu()
        return self.classify(pooled), spans.masked_fill(~(valid & upper), -torch.inf)


def span_positives(spans):
    """[B, E, 1] flat (start * L + end) index per event, -1 when the event is absent."""
    flat = spans[..., 0] * MAX_LEN + spans[..., 1]
    return torch.where(spans[..., 0] >= 0, flat, -1)[..., None]


def losses(model, batch):
    tokens, mask, labels, spans = batch
    class_logits, span_logits = model(tokens, mask)
    class_loss = kxops.zlpr_loss(class_logits, labels)
    span_loss = kxops.sparse_zlpr_loss(span_logits.flatten(-2), span_positives(spans))
    return class_loss, span_loss, class_logits, span_logits


def micro_f1(predicted, gold):
    tp = (predicted & gold).sum().item()
    return 2 * tp / max(predicted.sum().item() + gold.sum().item(), 1)


@torch.no_grad()
def evaluate(model, batch):
    model.eval()
    _, _, class_logits, span_logits = losses(model, batch)
    model.train()
    labels, spans = batch[2], batch[3]
    gold_spans = torch.zeros_like(span_logits, dtype=torch.bool).flatten(-2)
    gold_spans.scatter_(-1, span_positives(spans).clamp(min=0), spans[..., :1] >= 0)
    return micro_f1(class_logits > 0, labels), micro_f1(span_logits.flatten(-2) > 0, gold_spans)


def train(steps, batch_size=32, seed=0, quiet=False):
    torch.manual_seed(seed)
    task = make_task(seed)
    model = Model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=5e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    test = sample_batch(task, 512, torch.Generator().manual_seed(seed + 2))
    step_times = []
    progress = tqdm(range(steps), disable=quiet, desc="train")
    for _ in progress:
        batch = sample_batch(task, batch_size, generator)
        start = time.perf_counter()
        class_loss, span_loss, _, _ = losses(model, batch)
        optimizer.zero_grad()
        (class_loss + span_loss).backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        progress.set_postfix(class_loss=f"{class_loss.item():.3f}",
                             span_loss=f"{span_loss.item():.3f}")
    class_f1, span_f1 = evaluate(model, test)
    median_ms = 1e3 * sorted(step_times)[len(step_times) // 2]
    return class_f1, span_f1, median_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--min-f1", type=float, default=0.9,
                        help="exit non-zero if the event micro-F1 ends below this")
    args = parser.parse_args()
    backend = "reference ops" if os.environ.get("KXOPS_DISABLE_EXT") else "kxops kernels"
    class_f1, span_f1, median_ms = train(args.steps)
    print(f"[{backend}] {args.steps} steps: event micro-F1 {class_f1:.3f}, span micro-F1 "
          f"{span_f1:.3f}, median step {median_ms:.1f} ms")
    if class_f1 < args.min_f1:
        raise SystemExit(f"event micro-F1 {class_f1:.3f} is below the stated {args.min_f1}")


if __name__ == "__main__":
    main()
