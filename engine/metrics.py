"""Top-k accuracy as counts, so sums over batches and processes stay exact."""
from typing import Sequence, Tuple

import torch


def topk_correct(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Tuple[torch.Tensor, ...]:
    """How many of the batch have their target among the top k outputs, for each k (capped at the class count)."""
    maxk = min(max(topk), output.shape[1])
    _, predicted = output.topk(maxk, dim=1, largest=True, sorted=True)
    hits = predicted.eq(target.view(-1, 1))
    return tuple(hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk)
