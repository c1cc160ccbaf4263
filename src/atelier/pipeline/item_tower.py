"""The item-tower stages of ``atelier run``: train on a catalogue, encode every item, index, inspect.

``train_item_stage`` trains and saves a dataset's item tower (SimCSE, ``atelier.train.item``),
``tune_item_stage`` fine-tunes it on the training window's behaviour pairs (the served tower),
``encode_stage`` writes every item's vector with the checkpoint id, ``index_stage`` loads them into
pgvector and records what the store serves, and ``neighbour_report`` writes a page of neighbours by
item-tower and by MiniLM vector for a person to judge.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atelier.atomic import atomic_write, write_text
from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import load_current, time_split, train_data
from atelier.ingest import load_tables
from atelier.models.item_tower import encode_items, load_checkpoint, mask_parts, save_checkpoint
from atelier.recommend.encoder import CountFn, catalogue_inputs, file_id, tower_config
from atelier.store import index_vectors
from atelier.store.pointers import write_pointer
from atelier.text import encode_texts, item_texts
from atelier.train.item import (
    BehaviourConfig,
    ProgressFn,
    TrainItemConfig,
    behaviour_finetune,
    behaviour_pairs,
    train_item_tower,
    view_alignment,
)
from atelier.vocab import Vocab


def train_item_stage(
    settings: Settings, dataset: str, cfg: TrainItemConfig, *, text_progress: CountFn | None = None,
    progress: ProgressFn | None = None, **model_overrides: Any,
) -> tuple[Path, dict[str, Any]]:
    """Train the item tower of an ingested dataset on its whole catalogue and save the checkpoint."""
    vocab = Vocab.load(settings.paths.vocab)
    items = load_tables(settings.paths.dataset(dataset))[0]
    inputs = catalogue_inputs(items, dataset, vocab, settings.paths.features, text_progress,
                              enriched=settings.paths.items(dataset, "enriched"))
    model_cfg = tower_config(vocab, **model_overrides)
    model, history = train_item_tower(inputs, model_cfg, cfg, progress)
    history["view_alignment@2048"] = view_alignment(model, mask_parts(inputs, cfg.use_std, cfg.use_re, cfg.use_text),
                                                    cfg.views)
    path = settings.paths.item_tower_simcse(dataset)
    if int(os.environ.get("RANK", "0")) == 0:
        save_checkpoint(model.cpu(), path, vocab.to_dict(), {"dataset": dataset, "history": history})
        # served as it is until a behaviour stage tunes it (a catalogue without a log keeps this one)
        shutil.copyfile(path, settings.paths.item_tower(dataset))
    return path, history


def tune_item_stage(settings: Settings, dataset: str, cfg: BehaviourConfig, *, cut: str | None = None,
                    progress: ProgressFn | None = None, out: Path | None = None,
                    source: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the SimCSE tower (or the checkpoint at ``source``) on behaviour pairs of the evaluation
    split's training window (its default cut, or ``cut``: nothing after it) and save it as the dataset's
    served tower (or at ``out``)."""
    source = source or settings.paths.item_tower_simcse(dataset)
    if not source.is_file():
        raise FileNotFoundError(f"no SimCSE tower for {dataset} at {source}; run `atelier train item -d {dataset}`")
    model, payload = load_checkpoint(source)
    vocab = Vocab.from_dict(payload["vocab"])
    items, interactions, users = load_tables(settings.paths.dataset(dataset))
    data = train_data(time_split(dataset, interactions, cut), items, users, settings.paths.features)
    pairs, kinds = behaviour_pairs(data, seed=cfg.seed)
    inputs = catalogue_inputs(items, dataset, vocab, settings.paths.features,
                              enriched=settings.paths.items(dataset, "enriched"))
    model, history = behaviour_finetune(model, inputs, pairs, cfg, progress)
    history.update(pair_kinds=kinds, train_end=str(data.interactions["ts"].max()), simcse=payload.get("history"))
    path = out or settings.paths.item_tower(dataset)
    save_checkpoint(model.cpu(), path, vocab.to_dict(), {"dataset": dataset, "history": history,
                                                         "stages": ["simcse", "behaviour"]})
    return path, history


def encode_stage(settings: Settings, dataset: str, checkpoint: Path | None = None) -> Path:
    """Write every item's vector with its id and the checkpoint id (``runs/vectors/<dataset>/<id>.npz``)."""
    checkpoint = checkpoint or settings.paths.item_tower(dataset)
    model, payload = load_checkpoint(checkpoint)
    vocab = Vocab.from_dict(payload["vocab"])
    items = load_tables(settings.paths.dataset(dataset))[0]
    vectors = encode_items(model, catalogue_inputs(items, dataset, vocab, settings.paths.features,
                                                   enriched=settings.paths.items(dataset, "enriched")))
    ckpt_id = file_id(checkpoint)
    out = settings.paths.vectors(dataset, ckpt_id)
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
    items = load_tables(settings.paths.dataset(dataset))[0]
    jsons = dataset_items(items, dataset, enriched=settings.paths.items(dataset, "enriched"))
    text = encode_texts(item_texts(items["title"].fillna("").astype(str).tolist(),
                                   items["description"].fillna("").astype(str).tolist()), settings.paths.features)
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
    out = settings.paths.reports / f"{dataset}_neighbours.html"
    write_text(out, page)
    return out


def latest_vectors(settings: Settings, dataset: str) -> Path:
    """The newest ``encode`` output of a dataset (StageError-free: FileNotFoundError with a hint)."""
    files = sorted(settings.paths.vectors_dir(dataset).glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no item vectors for {dataset}; run `atelier encode -d {dataset}` first")
    return files[-1]


def index_stage(
    settings: Settings, dataset: str, vectors_file: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Load a dataset's item vectors and item JSON into pgvector, build HNSW, verify; remember the model id."""


    vectors_file = vectors_file or latest_vectors(settings, dataset)
    blob = np.load(vectors_file)
    model_id = f"item_tower:{dataset}:{blob['checkpoint_id']}"
    # the store's rows show today's prices: the catalogue as of the whole log
    current = load_current(dataset, settings.paths.dataset(dataset), settings.paths.features)
    items = dataset_items(current.items, dataset, enriched=settings.paths.items(dataset, "enriched"))
    by_id = {item.item_id: item for item in items}
    ids = [str(i) for i in blob["item_ids"]]
    # keep_live: products added through the web service since `atelier encode` keep their vectors
    report = index_vectors(settings, model_id, ids, blob["vectors"], [by_id[i] for i in ids if i in by_id],
                           progress=progress, keep_live=True)
    report["model_id"] = model_id
    write_pointer(settings.paths.index_pointer(dataset), report)
    return report




