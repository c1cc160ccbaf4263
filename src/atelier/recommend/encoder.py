"""Item tower inputs and vectors at inference: a catalogue's inputs, and ``ItemEncoder`` for new products.

The checkpoint id stored beside every vector is ``file_id`` of the checkpoint file, so a product posted
to the service is encoded by the very checkpoint whose vectors are indexed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atelier.catalogue import dataset_items
from atelier.models.item_tower import ItemInputs, ItemTowerConfig, encode_items, item_inputs, load_checkpoint
from atelier.recommender import TrainData
from atelier.schema import ItemJSON
from atelier.schema.item import Service
from atelier.text import encode_texts, item_texts
from atelier.vocab import Vocab

CountFn = Callable[[int, int], None]


def file_id(path: Path) -> str:
    """Short content hash of a file: the checkpoint id stored beside every vector."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def catalogue_inputs(
    items: pd.DataFrame, dataset: str, vocab: Vocab, cache_dir: Path, progress: CountFn | None = None,
    enriched: Path | None = None,
) -> ItemInputs:
    """Tower inputs of a catalogue: its item JSON (``catalogue.dataset_items``) plus cached MiniLM text vectors."""
    jsons = dataset_items(items, dataset, enriched=enriched)
    texts = item_texts(items["title"].fillna("").astype(str).tolist(),
                       items["description"].fillna("").astype(str).tolist())
    return item_inputs(jsons, vocab, encode_texts(texts, cache_dir, progress=progress))


def catalogue_vectors(checkpoint: Path, data: TrainData, vectors_file: Path | None = None) -> np.ndarray:
    """Every catalogue item's vector under a checkpoint, in ``data.items`` order: read from ``vectors_file``
    (``atelier encode``'s output of that checkpoint) when it holds every item of this catalogue, else encoded now
    (without the enriched item JSON: pass a vectors file for an enriched catalogue)."""
    if vectors_file is not None and vectors_file.is_file():
        blob = np.load(vectors_file)
        rows = pd.Index([str(i) for i in blob["item_ids"]]).get_indexer(data.items["item_id"].astype(str))
        if (rows >= 0).all():  # the same catalogue, or a part of it (a label period's items as of its cut)
            return np.asarray(blob["vectors"], dtype=np.float32)[rows]
    model, payload = load_checkpoint(checkpoint)
    vectors: np.ndarray = encode_items(model, catalogue_inputs(data.items, data.dataset,
                                                              Vocab.from_dict(payload["vocab"]), data.cache_dir))
    return vectors


def tower_config(vocab: Vocab, **overrides: Any) -> ItemTowerConfig:
    """The default tower for a vocabulary (table sizes and text field ids filled in)."""
    cfg = ItemTowerConfig(vocab.std_size, vocab.re_size, vocab.field_size, n_text=1,
                          title_field_id=vocab.field_id("title"), description_field_id=vocab.field_id("description"))
    return replace(cfg, **overrides)


class ItemEncoder:
    """The item tower of a checkpoint plus the MiniLM text encoder: item JSON -> unit vectors."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.model, payload = load_checkpoint(checkpoint)
        self.vocab = Vocab.from_dict(payload["vocab"])
        self.dim = int(self.model.config.out_dim)
        # One request at a time through the models: both are CPU-bound and torch already uses
        # every core, so concurrent calls would only contend (and MiniLM is not documented as
        # thread-safe).
        self._lock = threading.Lock()

    def encode(self, items: Sequence[ItemJSON]) -> np.ndarray:
        """(len(items), dim) float32 unit vectors, as ``atelier encode`` computes them."""
        texts = item_texts([i.service.title for i in items], [i.service.description for i in items])
        with self._lock:
            text = encode_texts(texts)  # (n, 384); no disk cache: one-off texts
            vectors: np.ndarray = encode_items(self.model, item_inputs(items, self.vocab, text))
        assert vectors.shape == (len(items), self.dim), f"encoder returned {vectors.shape}"
        return vectors

    def warm_up(self) -> None:
        """Load MiniLM and run the tower once, so the first request does not pay for it."""
        self.encode([ItemJSON(item_id="warm-up", service=Service(title="warm up"))])
