"""Content kNN over item-tower vectors: the harness's content recommender (cold items are scored from
their attributes alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atelier.models.item_tower import ItemTower, encode_items, load_checkpoint, mask_parts
from atelier.recommend.baselines import VectorKNNRecommender
from atelier.recommend.encoder import catalogue_inputs, tower_config
from atelier.recommender import TrainData
from atelier.vocab import Vocab


class ItemTowerRecommender(VectorKNNRecommender):
    """Content kNN over item-tower vectors (the tower's own checkpoint, or an untrained tower)."""

    name = "item-tower"

    def __init__(
        self, checkpoint: Path | None, vocab: Vocab | None = None, window_days: float | None = 3,
        name: str | None = None, use_std: bool = True, use_re: bool = True, use_text: bool = True, seed: int = 0,
        vectors_file: Path | None = None,
    ) -> None:
        super().__init__(window_days)
        self.checkpoint, self.vocab = checkpoint, vocab
        self.vectors_file = vectors_file  # `atelier encode` output of this checkpoint, read instead of re-encoding
        self.parts = {"std": use_std, "re": use_re, "text": use_text}
        self.seed = seed
        if name:
            self.name = name  # type: ignore[misc]

    def item_vectors(self, data: TrainData) -> np.ndarray:
        """Encode the catalogue with the checkpoint (or a seeded untrained tower when there is none)."""
        import torch

        if self.vectors_file is not None and self.vectors_file.is_file():
            blob = np.load(self.vectors_file)
            if [str(i) for i in blob["item_ids"]] == data.items["item_id"].astype(str).tolist():
                return np.asarray(blob["vectors"], dtype=np.float32)
        if self.checkpoint is not None:
            model, payload = load_checkpoint(self.checkpoint)
            vocab = Vocab.from_dict(payload["vocab"])
        else:
            assert self.vocab is not None, "an untrained tower needs a vocabulary"
            vocab = self.vocab
            torch.manual_seed(self.seed)
            model = ItemTower(tower_config(vocab)).eval()
        inputs = mask_parts(catalogue_inputs(data.items, data.dataset, vocab, data.cache_dir), **self.parts)
        vectors: np.ndarray = encode_items(model, inputs)
        return vectors
