"""Contrastive loss for SimCSE-style training (Gao, Yao and Chen, EMNLP 2021; van den Oord et al. 2018)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives: row i of ``a`` should match row i of ``b``.

    ``a`` and ``b`` are (batch, dim) and L2-normalised, so ``a @ b.T`` is cosine similarity.
    """
    assert a.shape == b.shape and a.dim() == 2, f"expected two (batch, dim) tensors, got {a.shape} and {b.shape}"
    logits = a @ b.T / temperature  # (batch, batch)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
