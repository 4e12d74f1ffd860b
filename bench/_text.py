"""Text-classification training for the text adaptation benchmarks (MiniLM, SmolLM2): tokenised tasks, length-grouped batches, and one
training loop that every method shares (only which parameters train, and at which rates, differs).

Why a loop here rather than ``adapt_``: ``adapt_`` takes ``(x, y)`` tensors, with no attention mask yet.
This loop trains CRISP mixers, LoRA, head-only and full fine-tuning with the same optimiser (AdamW,
linear warm-up then linear decay), batches, dropout and head, so the methods differ only in what trains.

Length-grouped batches (DESIGN.md section 7): each epoch shuffles the examples (seeded), cuts them into
chunks of ``GROUP_BATCHES`` batches, sorts each chunk by token length and cuts it into batches padded to
their own longest example, then shuffles the batch order. Padding tokens are masked, so grouping changes
only the cost (about half of padding to the task's maximum length), not what is computed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

#: Batches per length-sorted chunk: large enough to group lengths, small enough to keep batches random.
GROUP_BATCHES = 50


@dataclass
class TokenizedSplit:
    """One split: token ids per example (truncated, unpadded) and integer labels."""

    ids: list[list[int]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def fresh_head(model: nn.Module, num_classes: int, seed: int, name: str = "classifier") -> None:
    """A new seeded head at ``name`` (nn.Linear's own init; a bias when the model's head has one: BERT's
    ``classifier`` does, a LLaMA classifier's ``score`` does not), identical for every method at a seed."""
    old = model.get_submodule(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
                            .to(old.weight.device))


def tokenize_split(tokenizer, pairs: list[tuple[str, int]], max_length: int) -> TokenizedSplit:
    enc = tokenizer([t for t, _ in pairs], max_length=max_length, truncation=True, padding=False)
    return TokenizedSplit(list(enc["input_ids"]), torch.tensor([y for _, y in pairs], dtype=torch.long))


def collate(split: TokenizedSplit, idx: list[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for rows ``idx``, padded to their longest row, with the attention mask and ``labels``."""
    width = max(len(split.ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        seq = split.ids[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": split.labels[idx]}


def grouped_batches(split: TokenizedSplit, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Length-grouped batches (module docstring); in length order, unshuffled, when ``generator`` is None."""
    n = len(split)
    if generator is None:
        order = sorted(range(n), key=lambda i: len(split.ids[i]))
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    chunk = batch_size * GROUP_BATCHES
    batches = []
    for c in range(0, n, chunk):
        part = sorted(perm[c:c + chunk], key=lambda i: len(split.ids[i]))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _to(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: nn.Module, split: TokenizedSplit, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for idx in grouped_batches(split, batch_size, None):
        batch = _to(collate(split, idx), model)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / max(len(split), 1)


@dataclass
class RunResult:
    val: float
    test: float
    seconds_per_epoch: float
    final_loss: float


def train(model: nn.Module, groups: list[dict], train_split: TokenizedSplit, *, epochs: int, batch_size: int,
          seed: int, warmup_fraction: float = 0.06) -> tuple[float, float]:
    """AdamW over ``groups`` (dicts with "params" and "lr"), linear warm-up then linear decay to 0, dropout on.
    Every parameter not in a group is frozen. Returns (seconds per epoch, mean loss of the last epoch)."""
    trainable = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(train_split) / batch_size)
    warm = max(1, int(warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    torch.manual_seed(seed)  # dropout
    start, loss_sum, n = time.perf_counter(), 0.0, 0
    for _ in range(epochs):
        model.train()
        loss_sum, n = 0.0, 0
        for idx in grouped_batches(train_split, batch_size, gen):
            batch = _to(collate(train_split, idx), model)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, n = loss_sum + float(loss.detach()) * len(idx), n + len(idx)
    model.eval()
    return (time.perf_counter() - start) / epochs, loss_sum / max(n, 1)
