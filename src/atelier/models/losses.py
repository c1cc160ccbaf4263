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


def listwise_loss(logits: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each user's candidates, the target spread evenly over what they bought
    (ListNet with one-hot relevance); users without a positive carry no signal and are left out."""
    _, local = torch.unique_consecutive(group, return_inverse=True)
    n_users = int(local.max()) + 1
    lse = torch.full((n_users,), float("-inf")).scatter_reduce(0, local, logits, "amax")  # stable logsumexp
    lse = lse + torch.zeros(n_users).index_add(0, local, (logits - lse[local]).exp()).log()
    pos = torch.zeros(n_users).index_add(0, local, y)
    nll = torch.zeros(n_users).index_add(0, local, y * (lse[local] - logits)) / pos.clamp(min=1)
    return nll[pos > 0].mean()


def sampled_softmax(
    users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
    log_q: torch.Tensor | None, temperature: float,
) -> torch.Tensor:
    """Softmax over in-batch targets + sampled negatives; row i's label is its own target.

    ``users`` (B, D) are queries and ``items`` (N, D) retrieval keys (see ``retrieval_keys``); ``targets``
    (B,) and ``negatives`` (S,) are item rows; ``log_q`` (N,) is each item's log sampling probability,
    subtracted from its logit (logQ correction) unless None. A candidate equal to the row's target
    elsewhere (an accidental hit) is masked out.
    """
    cand = torch.cat([targets, negatives])  # (B + S,)
    logits = users @ items[cand].T / temperature  # (B, B + S)
    if log_q is not None:
        logits = logits - log_q[cand][None]
    labels = torch.arange(len(targets), device=users.device)
    hit = cand[None, :] == targets[:, None]  # (B, B + S)
    hit[labels, labels] = False
    return F.cross_entropy(logits.masked_fill(hit, float("-inf")), labels)
