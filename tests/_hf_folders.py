"""What every tiny random Hugging Face folder builder (`tests/families/<family>/<family>_folder.py`)
does to its model before `save_pretrained`."""

from __future__ import annotations

import torch


def _sharpen(model) -> None:
    # Random init leaves the LM near-uniform; sharper logits make greedy comparisons meaningful,
    # and non-trivial norm weights show a mis-mapped norm.
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_q.weight" in name or "norm1.weight" in name or "norm2.weight" in name:
                p.uniform_(0.5, 1.5)
