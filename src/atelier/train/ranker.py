"""Training the DeepFM reranker: rows from the end of a training window, the loop, the harness recommender.

``RerankRecommender`` wraps any retriever behind the harness interface. ``fit`` never looks past the
training window it is given: the window's last ``label_days`` become labels and the days before them
history, a copy of the retriever is fitted on that history alone, its top-100 candidates for every user
active in the label days (plus a few random catalogue items) are labelled by what the user then bought,
and the DeepFM (``atelier.models.ranker``) is trained on those rows. Serving refits the retriever on the
whole window and recomputes popularity as of its end, so training and serving features mean the same.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from atelier.datasets import build_queries, rules_for, time_split, train_data
from atelier.models.item_tower import ItemInputs, load_checkpoint
from atelier.models.losses import listwise_loss
from atelier.models.ranker import DENSE, RankerConfig, build_ranker, load_ranker, save_ranker, transfer_embeddings
from atelier.recommend.ranker import Featuriser, ItemFeatures, LogStats, ProfileScale, ProgressFn, Scorer, rank_scores
from atelier.recommender import Query, Recommender, TrainData
from atelier.vocab import PAD_ID, UNK_ID, ItemTokens, Vocab


@dataclass
class RerankTrainConfig:
    """How the reranker's rows are built and how long it trains."""

    label_days: float | None = None  # None: the dataset's rules (datasets.rules_for)
    max_users: int = 20000  # label-window users sampled (H&M has ~13k, RTR ~11k: all of them)
    positive_users_only: bool = True  # a user none of whose candidates was bought carries no ranking signal
    candidates: int = 100  # retriever depth, as served
    hard_negatives: int = 40  # retrieved non-purchases kept per user: more users for the same rows
    random_negatives: int = 5  # easy negatives per user so scores stay calibrated off the retriever's list
    epochs: int = 3
    batch_size: int = 512  # rows per step (listwise: whole users adding up to about this many rows)
    lr: float = 2e-3
    seed: int = 0
    loss: str = "pointwise"  # pointwise: log loss per row; listwise: softmax over each user's candidates


# --------------------------------------------------------------------------- features




@torch.inference_mode()
def encoded_tables(tower: Any, vocab: Vocab, re_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The tower's output vector for a one-attribute item per STD id (and per RE id in ``re_ids``), laid out
    like its ``emb_std``/``emb_re`` tables (zeros elsewhere) so ``transfer_embeddings`` can copy them."""

    def encode(std: list[tuple[int, int]], re_t: list[tuple[int, int, int]]) -> torch.Tensor:
        n = max(len(std), len(re_t))
        s = torch.tensor(std or [(PAD_ID, PAD_ID)] * n).reshape(n, 1, 2)  # (n, 1, [id, field])
        r = torch.tensor(re_t or [(PAD_ID, PAD_ID, PAD_ID)] * n).reshape(n, 1, 3)  # (n, 1, [id, parent, field])
        tokens = ItemTokens(s[..., 0], s[..., 1], s[..., 0] != PAD_ID, r[..., 0], r[..., 1], r[..., 2],
                            r[..., 0] != PAD_ID)
        text = torch.zeros(n, tower.config.n_text, tower.config.text_dim)
        return tower.eval()(ItemInputs(tokens, text, torch.zeros(n, tower.config.n_text, dtype=torch.bool)))

    out_dim = tower.config.out_dim
    std_table = torch.zeros(vocab.std_size, out_dim)
    ids = list(range(4, vocab.std_size))  # after [PAD] [MASK] [UNK] [CLS]
    std_table[ids] = encode([(i, vocab.field_id(vocab.std_token(i)[0])) for i in ids], [])
    re_table = torch.zeros(vocab.re_size, out_dim)
    re_list = [int(i) for i in re_ids if i > 1]
    if re_list:  # an RE value's field is unknown from its hash: parent and field stay [UNK]

        re_table[re_list] = encode([], [(i, UNK_ID, UNK_ID) for i in re_list])
    # Unit vectors of one tower share a large common direction; centring keeps only what tells them apart.
    mean = std_table[ids].mean(0)
    std_table[ids] -= mean
    if re_list:
        re_table[re_list] -= mean
    return {"emb_std.weight": std_table, "emb_re.weight": re_table}




# --------------------------------------------------------------------------- training rows


@dataclass
class Rows:
    """Training rows grouped per user: inputs, labels and the user index of each row."""

    x: np.ndarray  # (N, width) float32
    y: np.ndarray  # (N,) float32
    group: np.ndarray  # (N,) int: which label-window user
    items: np.ndarray  # (N,) object: the candidate item id of each row
    info: dict[str, Any]


def label_cut(log: pd.DataFrame, label_days: float) -> pd.Timestamp:
    """First day of the label period: the last ``label_days`` whole days of the log."""
    return log["ts"].max().normalize() - pd.Timedelta(days=math.ceil(label_days) - 1)


def training_rows(
    data: TrainData, retriever: Recommender, feat: Featuriser, tcfg: RerankTrainConfig, window_days: float,
) -> Rows:
    """Rows from the training window only: history before the label days, labels from them.

    ``retriever`` is fitted here on the history part (so its candidates never saw the labels).
    """
    days = tcfg.label_days or rules_for(data.dataset).label_days
    cut = label_cut(data.interactions, days)
    split = time_split(data.dataset, data.interactions, str(cut.date()))
    queries, actual = build_queries(split, data.users)
    rng = np.random.default_rng(tcfg.seed)
    if len(queries) > tcfg.max_users:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), tcfg.max_users, replace=False))]
    history = train_data(split, data.items, data.users, data.cache_dir)  # everything as of the label cut
    retriever.fit(history)
    candidates = retriever.recommend(queries, tcfg.candidates)
    stats = LogStats.build(split.train, feat.cat, window_days)
    xs, ys, groups, row_items = [], [], [], []
    n_items, hits = len(feat.cat.item_ids), 0
    for g, (q, cands) in enumerate(zip(queries, candidates, strict=True)):
        cands = [c for c in cands if c in feat.cat.index]
        ranks = np.arange(len(cands))
        bought = np.array([c in actual[q.user_id] for c in cands], bool)
        hits += int(bought.any())
        if tcfg.positive_users_only and not bought.any():
            continue
        if (~bought).sum() > tcfg.hard_negatives:  # subsample the retrieved negatives, keep every positive
            keep = np.sort(np.concatenate([ranks[bought], rng.choice(ranks[~bought], tcfg.hard_negatives,
                                                                     replace=False)]))
        else:
            keep = ranks
        taken = set(cands)
        extra = [str(feat.cat.item_ids[j]) for j in rng.choice(n_items, tcfg.random_negatives, replace=False)]
        extra = [e for e in extra if e not in taken]
        items = [cands[i] for i in keep] + extra
        scores = np.concatenate([rank_scores(len(cands))[keep], np.zeros(len(extra), np.float32)])
        y = np.array([i in actual[q.user_id] for i in items], np.float32)
        xs.append(feat.rows(q, items, scores, stats))
        ys.append(y)
        groups.append(np.full(len(items), g))
        row_items += items
    assert xs, "no label-window user bought any of their candidates: nothing to learn from"
    y_all = np.concatenate(ys)
    info = {"label_cut": str(cut.date()), "history_days": [str(split.train["ts"].min().date()), str(cut.date())],
            "users": len(queries), "users_in_rows": len(xs), "rows": len(y_all), "positives": int(y_all.sum()),
            "users_with_a_positive_candidate": hits}
    return Rows(np.concatenate(xs), y_all, np.concatenate(groups), np.array(row_items, dtype=object), info)


# --------------------------------------------------------------------------- training


def _batches(rows: Rows, tcfg: RerankTrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Row indices per step: shuffled rows (pointwise), or shuffled whole users (listwise)."""
    if tcfg.loss == "pointwise":
        order = torch.randperm(len(rows.y), generator=gen)
        return list(order.split(tcfg.batch_size))
    if tcfg.loss != "listwise":
        raise ValueError(f"unknown ranker loss {tcfg.loss!r}; choose pointwise or listwise")
    starts = np.flatnonzero(np.r_[True, rows.group[1:] != rows.group[:-1]]).tolist()  # a user's rows are contiguous
    users = [torch.arange(a, b) for a, b in zip(starts, [*starts[1:], len(rows.y)], strict=True)]
    per_step = max(1, tcfg.batch_size // max(1, len(rows.y) // len(users)))
    shuffled: list[int] = torch.randperm(len(users), generator=gen).tolist()
    return [torch.cat([users[u] for u in shuffled[i : i + per_step]]) for i in range(0, len(shuffled), per_step)]




def train_ranker(model: Any, rows: Rows, tcfg: RerankTrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Setup, loop, evaluate: Adam on pointwise log loss or the listwise loss (+ DeepCTR's L2 terms)."""
    torch.manual_seed(tcfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    x, y, group = torch.from_numpy(rows.x), torch.from_numpy(rows.y), torch.from_numpy(rows.group)
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: dict[str, Any] = {"loss": [], "initial_loss": _log_loss(model, x, y)}
    for epoch in range(tcfg.epochs):
        model.train()
        total, seen = 0.0, 0
        for b in _batches(rows, tcfg, gen):
            if tcfg.loss == "listwise":
                # DeepCTR's output layer applies the sigmoid only for task "binary": switched off here to get
                # the logits a softmax needs; scores stay sigmoid(logit), so the ranking is the same.
                model.out.task = "regression"
                try:
                    loss = listwise_loss(model(x[b]).squeeze(-1), y[b], group[b])
                finally:
                    model.out.task = "binary"
            else:
                loss = F.binary_cross_entropy(model(x[b]).squeeze(-1), y[b])  # DeepFM ends in a sigmoid
            opt.zero_grad()
            (loss + model.get_regularization_loss()).backward()
            opt.step()
            total, seen = total + loss.item() * len(b), seen + len(b)
        history["loss"].append(round(total / max(seen, 1), 5))
        if progress is not None:
            progress(f"epoch {epoch + 1}/{tcfg.epochs}: loss {history['loss'][-1]:.4f}")
    model.eval()
    return history


@torch.inference_mode()
def _log_loss(model: Any, x: torch.Tensor, y: torch.Tensor, limit: int = 20000) -> float:
    model.eval()
    p = model(x[:limit]).squeeze(-1).clamp(1e-7, 1 - 1e-7)
    return round(float(F.binary_cross_entropy(p, y[:limit])), 5)




# --------------------------------------------------------------------------- the recommender




class RerankRecommender(Recommender):
    """retrieve(``candidates``) -> DeepFM -> top-k, behind the harness interface.

    ``item_checkpoint`` gives the vocabulary (ids of the ``std``/``re`` tables) and, with
    ``cfg.transfer``, the embeddings the ranker starts from.
    """

    name = "rerank"

    def __init__(
        self, retriever: Recommender, item_checkpoint: Path, *, cfg: RankerConfig | None = None,
        train: RerankTrainConfig | None = None, window_days: float | None = None, enriched: Path | None = None,
        name: str | None = None, progress: ProgressFn | None = None, saved: Path | None = None,
    ) -> None:
        self.retriever = retriever
        self.item_checkpoint = item_checkpoint
        self.cfg_overrides = cfg
        self.tcfg = train or RerankTrainConfig()
        self.window_days, self.enriched, self.progress = window_days, enriched, progress
        self.saved = saved  # a checkpoint to reuse when it was trained on the same window (see fit)
        self.model: Any = None
        self.cfg: RankerConfig | None = None
        self.feat: Featuriser | None = None
        self.stats: LogStats | None = None
        self.vocab: Vocab | None = None
        self.history: dict[str, Any] = {}
        self.name = name or f"rerank({retriever.name})"  # type: ignore[misc]

    def _setup(self, data: TrainData) -> dict[str, torch.Tensor]:
        """Vocabulary, config, model and featuriser; returns the tables to transfer from."""

        tower, payload = load_checkpoint(self.item_checkpoint)
        self.vocab = Vocab.from_dict(payload["vocab"])
        base = RankerConfig(std_size=self.vocab.std_size, re_size=self.vocab.re_size)
        self.cfg = replace(self.cfg_overrides, std_size=base.std_size, re_size=base.re_size) \
            if self.cfg_overrides is not None else base
        self.model = build_ranker(self.cfg)
        cat = ItemFeatures.build(data.items, data.dataset, self.vocab, self.cfg, self.enriched)
        self.feat = Featuriser(self.cfg, cat, ProfileScale.build(data.users), self.model.feature_index)
        if self.cfg.transfer_source == "encoded":
            return encoded_tables(tower, self.vocab, np.unique(cat.re))
        assert self.cfg.transfer_source == "table", f"unknown transfer source {self.cfg.transfer_source!r}"
        return {k: v.detach() for k, v in tower.state_dict().items()}

    def fit(self, data: TrainData) -> Self:
        """Build rows from the window's last days, train the DeepFM, then fit the retriever on all of it."""
        torch.manual_seed(self.tcfg.seed)
        t0 = time.perf_counter()
        tower_state = self._setup(data)
        assert self.cfg is not None and self.feat is not None
        window = self.window_days or rules_for(data.dataset).popularity_days
        if self.saved is not None and self._reuse_saved(data):
            self.retriever.fit(data)
            self.stats = LogStats.build(data.interactions, self.feat.cat, window)
            return self
        transfer = transfer_embeddings(self.model, tower_state, self.cfg) if self.cfg.transfer else {}
        rows = training_rows(data, copy.deepcopy(self.retriever), self.feat, self.tcfg, window)
        t1 = time.perf_counter()
        if self.progress is not None:
            self.progress(f"{rows.info['rows']} rows, {rows.info['positives']} positives ({t1 - t0:.0f} s)")
        hist = train_ranker(self.model, rows, self.tcfg, self.progress)
        self.history = {"rows": rows.info, "transfer": transfer, "rows_seconds": round(t1 - t0, 1),
                        "train_end": str(data.interactions["ts"].max()),
                        "train_seconds": round(time.perf_counter() - t1, 1), **hist}
        self.retriever.fit(data)
        self.stats = LogStats.build(data.interactions, self.feat.cat, window)
        return self

    def _reuse_saved(self, data: TrainData) -> bool:
        """Load the saved weights when they were trained on this very window (same last interaction, same
        configs): refitting would only repeat that work. Any other window trains afresh, so a saved model
        never scores days it has seen."""
        assert self.saved is not None
        model, cfg, payload = load_ranker(self.saved)
        same = (payload.get("history", {}).get("train_end") == str(data.interactions["ts"].max())
                and cfg == self.cfg and payload.get("train") == asdict(self.tcfg))
        if same:
            self.model, self.history = model, {**payload["history"], "reused": str(self.saved)}
        return same

    @property
    def scorer(self) -> Scorer:
        """The fitted model with its featuriser and log statistics."""
        assert self.feat is not None and self.stats is not None and self.vocab is not None, "call fit() first"
        return Scorer(self.model, self.feat, self.stats, self.vocab)

    def score(self, query: Query, candidates: Sequence[str]) -> np.ndarray:
        """Ranker probabilities of one query's retrieved candidates (in retrieval order)."""
        return self.scorer.score(query, candidates)

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Retrieve ``candidates`` per query, reorder them by the ranker, cut to k."""
        scorer = self.scorer
        ranked = self.retriever.recommend(queries, max(k, self.tcfg.candidates))
        return [[item for item, _ in scorer.reorder(q, cands)][:k] for q, cands in zip(queries, ranked, strict=True)]

    def explain(self, query: Query, items: Sequence[str], top: int = 3) -> list[dict[str, Any]]:
        """See ``Scorer.explain``."""
        return self.scorer.explain(query, items, top)

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint the ranker with the training history (the featuriser is rebuilt from the catalogue)."""
        assert self.cfg is not None
        save_ranker(self.model, self.cfg, path, {"history": self.history, "train": asdict(self.tcfg),
                                                 "dense": list(DENSE), **(extra or {})})

    def load_weights(self, path: Path) -> None:
        """Replace the fitted model by a saved one (same config)."""
        self.model, self.cfg, _ = load_ranker(path)


# --------------------------------------------------------------------------- stage (CLI)






