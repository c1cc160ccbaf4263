"""Stage 1 end to end: catalogue -> tower inputs -> SimCSE training -> item vectors -> content kNN.

``train_item_stage`` trains and saves the item tower of a dataset, ``encode_stage`` writes every
item's vector (with ids and the checkpoint id) for the store, and ``ItemTowerRecommender`` ranks
the catalogue by similarity to a shopper's history with those vectors (the harness's content
recommender; cold items are scored from their attributes alone).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atelier.atomic import atomic_write, write_json, write_text
from atelier.baselines import VectorKNNRecommender
from atelier.catalogue import column_items
from atelier.config import Settings
from atelier.datasets import load_current
from atelier.ingest import load_tables
from atelier.models.item_tower import (
    ItemInputs,
    ItemTower,
    ItemTowerConfig,
    encode_items,
    item_inputs,
    load_checkpoint,
    mask_parts,
    save_checkpoint,
)
from atelier.recommender import TrainData
from atelier.text import encode_texts, item_texts
from atelier.train import ProgressFn, TrainItemConfig, train_item_tower, view_alignment
from atelier.vocab import Vocab

CountFn = Callable[[int, int], None]


def vocab_path(settings: Settings) -> Path:
    """Where ``atelier vocab`` saves the shared vocabulary."""
    return settings.run_dir / "vocab" / "vocab.json"


def checkpoint_path(settings: Settings, dataset: str) -> Path:
    """Where the item tower of a dataset is saved."""
    return settings.run_dir / "models" / f"item_tower-{dataset}.pt"


def file_id(path: Path) -> str:
    """Short content hash of a file: the checkpoint id stored beside every vector."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def catalogue_inputs(
    items: pd.DataFrame, dataset: str, vocab: Vocab, cache_dir: Path, progress: CountFn | None = None
) -> ItemInputs:
    """Tower inputs of a catalogue: STD values from its columns plus cached MiniLM text vectors."""
    jsons = column_items(items, dataset)
    texts = item_texts(items["title"].fillna("").astype(str).tolist(),
                       items["description"].fillna("").astype(str).tolist())
    return item_inputs(jsons, vocab, encode_texts(texts, cache_dir, progress=progress))


def tower_config(vocab: Vocab, **overrides: Any) -> ItemTowerConfig:
    """The default tower for a vocabulary (table sizes and text field ids filled in)."""
    cfg = ItemTowerConfig(vocab.std_size, vocab.re_size, vocab.field_size, n_text=1,
                          title_field_id=vocab.field_id("title"), description_field_id=vocab.field_id("description"))
    return replace(cfg, **overrides)


def train_item_stage(
    settings: Settings, dataset: str, cfg: TrainItemConfig, *, text_progress: CountFn | None = None,
    progress: ProgressFn | None = None, **model_overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Train the item tower of an ingested dataset on its whole catalogue and save the checkpoint."""
    vocab = Vocab.load(vocab_path(settings))
    items = load_tables(settings.dataset_dir(dataset))[0]
    inputs = catalogue_inputs(items, dataset, vocab, settings.run_dir / "features", text_progress)
    model_cfg = tower_config(vocab, **model_overrides)
    model, history = train_item_tower(inputs, model_cfg, cfg, progress)
    history["view_alignment@2048"] = view_alignment(model, mask_parts(inputs, cfg.use_std, cfg.use_re, cfg.use_text),
                                                    cfg.views)
    path = checkpoint_path(settings, dataset)
    if int(os.environ.get("RANK", "0")) == 0:
        save_checkpoint(model.cpu(), path, vocab.to_dict(), {"dataset": dataset, "history": history})
    return path, history


def encode_stage(settings: Settings, dataset: str, checkpoint: Path | None = None) -> Path:
    """Write every item's vector with its id and the checkpoint id (``runs/vectors/<dataset>/<id>.npz``)."""
    checkpoint = checkpoint or checkpoint_path(settings, dataset)
    model, payload = load_checkpoint(checkpoint)
    vocab = Vocab.from_dict(payload["vocab"])
    items = load_tables(settings.dataset_dir(dataset))[0]
    vectors = encode_items(model, catalogue_inputs(items, dataset, vocab, settings.run_dir / "features"))
    ckpt_id = file_id(checkpoint)
    out = settings.run_dir / "vectors" / dataset / f"{ckpt_id}.npz"
    with atomic_write(out) as fh:
        np.savez(fh, item_ids=np.asarray(items["item_id"].astype(str).tolist(), dtype=str), vectors=vectors,
                 checkpoint_id=np.array(ckpt_id))
    return out


def neighbour_report(
    settings: Settings, dataset: str, vectors_file: Path | None = None, n: int = 12, k: int = 5, seed: int = 0,
) -> Path:
    """An HTML page of sampled items with their nearest neighbours by item-tower vector and by
    MiniLM text vector, side by side with their STD attributes, for a person to judge."""
    import html

    vectors_file = vectors_file or latest_vectors(settings, dataset)
    blob = np.load(vectors_file)
    items = load_tables(settings.dataset_dir(dataset))[0]
    jsons = column_items(items, dataset)
    text = encode_texts(item_texts(items["title"].fillna("").astype(str).tolist(),
                                   items["description"].fillna("").astype(str).tolist()), settings.run_dir / "features")
    tower = blob["vectors"]
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(jsons), size=min(n, len(jsons)), replace=False)

    def cell(i: int, score: float | None = None) -> str:
        item = jsons[i]
        attrs = ", ".join(f"{f}={'/'.join(v)}" for f, v in item.clothes.items()
                          if f in ("category", "color", "print", "gender", "fiber_composition"))
        head = f"<b>{html.escape(item.service.title)}</b> <small>{item.item_id}</small>"
        tail = f"<br><small>{html.escape(attrs)}</small>" + (f"<br><i>{score:.3f}</i>" if score is not None else "")
        return f"<td>{head}{tail}</td>"

    rows = []
    for i in sample:
        for label, vecs in (("item tower", tower), ("MiniLM text", text)):
            scores = vecs @ vecs[i]
            scores[i] = -np.inf
            top = np.argsort(-scores)[:k]
            first = cell(int(i)) if label == "item tower" else "<td></td>"
            rows.append(f"<tr>{first}<td>{label}</td>" + "".join(cell(int(j), float(scores[j])) for j in top) + "</tr>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{dataset} neighbours</title>"
            "<style>body{font-family:sans-serif;font-size:13px}td{border:1px solid #ccc;padding:4px;"
            "vertical-align:top;max-width:180px}</style>"
            f"<h1>{dataset}: nearest neighbours ({vectors_file.name})</h1><table>"
            f"<tr><th>item</th><th>by</th>{''.join(f'<th>#{r + 1}</th>' for r in range(k))}</tr>"
            + "".join(rows) + "</table>")
    out = settings.run_dir / "reports" / f"{dataset}_neighbours.html"
    write_text(out, page)
    return out


def latest_vectors(settings: Settings, dataset: str) -> Path:
    """The newest ``encode`` output of a dataset (StageError-free: FileNotFoundError with a hint)."""
    files = sorted((settings.run_dir / "vectors" / dataset).glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no item vectors for {dataset}; run `atelier encode -d {dataset}` first")
    return files[-1]


def index_stage(
    settings: Settings, dataset: str, vectors_file: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Load a dataset's item vectors and item JSON into pgvector, build HNSW, verify; remember the model id."""

    from atelier.store import index_vectors

    vectors_file = vectors_file or latest_vectors(settings, dataset)
    blob = np.load(vectors_file)
    model_id = f"item_tower:{dataset}:{blob['checkpoint_id']}"
    # the store's rows show today's prices: the catalogue as of the whole log
    items = column_items(load_current(dataset, settings.dataset_dir(dataset), settings.run_dir / "features").items,
                         dataset)
    by_id = {item.item_id: item for item in items}
    ids = [str(i) for i in blob["item_ids"]]
    # keep_live: products added through the web service since `atelier encode` keep their vectors
    report = index_vectors(settings, model_id, ids, blob["vectors"], [by_id[i] for i in ids if i in by_id],
                           progress=progress, keep_live=True)
    report["model_id"] = model_id
    write_pointer(settings.run_dir / "index" / f"{dataset}.json", report)
    return report


def write_pointer(path: Path, report: dict[str, Any]) -> None:
    """Write an index report (the live model id with its figures) atomically: temp file, then rename."""
    write_json(path, report, indent=2, default=str)


def current_model_id(settings: Settings, dataset: str) -> str:
    """The model id ``atelier index`` last loaded for a dataset."""
    import json

    pointer = settings.run_dir / "index" / f"{dataset}.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"nothing indexed for {dataset}; run `atelier index -d {dataset}` first")
    return str(json.loads(pointer.read_text())["model_id"])


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
