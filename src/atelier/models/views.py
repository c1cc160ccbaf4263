"""Two views of each item for SimCSE: complementary masking plus random feature dropout.

View A is STD-heavy (keeps each STD token with ``p_std``, RE with ``p_re``); view B gets every
token A dropped (the views are complementary: together they cover the item) plus a ``share``
of A's tokens. With ``share=0`` the views are disjoint; measured on H&M, where an item has only
about seven STD tokens and one text token, disjoint views left nothing to match on (the loss
stayed at chance, ln 512), so by default the views overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atelier.models.item_tower import ItemInputs
from atelier.vocab import ItemTokens


@dataclass
class ViewConfig:
    """Masking probabilities (view A keeps; view B keeps the complement)."""

    p_std: float = 0.8  # A is STD-heavy ...
    p_re: float = 0.2  # ... and B is RE-heavy
    p_text: float = 0.5  # text tokens split evenly
    share: float = 0.5  # share of A's tokens that B sees too (0 = disjoint views)
    feature_dropout: float = 0.1  # then each view loses a few more tokens at random


def complementary_masks(
    real: torch.Tensor, keep_prob: float, share: float = 0.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks A and B over the real tokens: A keeps each with ``keep_prob``; B keeps what A dropped
    plus a ``share`` of what A kept. Every real token is in at least one view."""
    draw = torch.rand(real.shape, generator=generator, device=real.device) < keep_prob
    shared = torch.rand(real.shape, generator=generator, device=real.device) < share
    return real & draw, real & (~draw | shared)


def _dropout(mask: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if p <= 0:
        return mask
    return mask & (torch.rand(mask.shape, generator=generator, device=mask.device) >= p)


def _with_masks(x: ItemInputs, std: torch.Tensor, re_m: torch.Tensor, text: torch.Tensor) -> ItemInputs:
    t = x.tokens
    return ItemInputs(ItemTokens(t.std_ids, t.std_field_ids, std, t.re_ids, t.re_parent_ids, t.re_field_ids, re_m),
                      x.text, text)


def make_views(
    x: ItemInputs, cfg: ViewConfig, generator: torch.Generator | None = None
) -> tuple[ItemInputs, ItemInputs]:
    """The STD-heavy and the RE-heavy view of a batch."""
    std_a, std_b = complementary_masks(x.tokens.std_mask, cfg.p_std, cfg.share, generator)
    re_a, re_b = complementary_masks(x.tokens.re_mask, cfg.p_re, cfg.share, generator)
    text_a, text_b = complementary_masks(x.text_mask, cfg.p_text, cfg.share, generator)
    p = cfg.feature_dropout
    view_a = _with_masks(x, _dropout(std_a, p, generator), _dropout(re_a, p, generator), _dropout(text_a, p, generator))
    view_b = _with_masks(x, _dropout(std_b, p, generator), _dropout(re_b, p, generator), _dropout(text_b, p, generator))
    return view_a, view_b
