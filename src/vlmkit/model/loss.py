"""The model's own loss: next-token cross-entropy over the supervised positions, for a forward
given `labels` (the training objectives in `train/losses.py` build on it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.core.types import IGNORE_INDEX


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over supervised positions of unpacked rows (`labels` are
    the token's own ids, the target of the position before it).

    The LM head runs on the supervised rows alone, in chunks: most positions of a VLM sample are
    image and prompt tokens, and a full (tokens x vocab) logit tensor is the largest activation.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    wanted = targets[keep]
    count = int(wanted.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk):
        logits = head(rows[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, wanted[start : start + chunk], reduction="sum")
    return total / count, count
