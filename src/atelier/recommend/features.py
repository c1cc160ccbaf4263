"""The ranker's features of (shopper, candidate) rows, computed as of the end of a log.

``Snapshot`` is what a log tells up to its last day (a training label day, or today's log at serving):
item popularity over the last day, the popularity window and all of it, days since an item's first and
last sale, its price (the catalogue's own, else the log's median), each shopper's purchases, and the
catalogue's attribute codes and vectors. ``build_features`` turns a ``CandidateSet`` into a dense float32
matrix, every column named in ``names``: the sources' ranks and scores, popularity and its trend,
freshness, price relative to the shopper's own prices, bought before / same product group / attribute
overlap with the shopper's items and cart, cosine similarity to them in each vector space, and the
query's own size. Missing values stay NaN (LightGBM reads them as missing; the DeepFM fills them).
All of it is vectorised over rows: the served chain builds a request's rows the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from atelier.recommend.candidates import CandidateSet
from atelier.recommend.sources import log_rows
from atelier.recommender import Query, TrainData

MAX_SEEDS = 16  # the most recent items and cart a similarity looks at (older ones say little about today)


@dataclass
class Snapshot:
    """Item and shopper statistics of a log as of its last day, over one catalogue."""

    index: dict[str, int]
    pop_day: np.ndarray  # (n,) interactions on the log's last day
    pop_window: np.ndarray  # (n,) over the popularity window
    pop_all: np.ndarray  # (n,) over the whole log
    window_days: float
    first_days: np.ndarray  # (n,) days from an item's first sale to the end (NaN: never sold)
    last_days: np.ndarray  # (n,) days from its last sale to the end
    log_price: np.ndarray  # (n,) log price (the catalogue's, else the log's median), NaN unknown
    groups: np.ndarray  # (n,) int group code (colourways share one)
    codes: dict[str, np.ndarray]  # attribute -> (n,) int code (-1 unknown)
    vectors: dict[str, np.ndarray]  # space -> (n, d) unit vectors
    user_items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    # user -> (rows, counts, days since last bought), from the log

    @classmethod
    def build(cls, data: TrainData, window_days: float, codes: Mapping[str, np.ndarray],
              vectors: Mapping[str, np.ndarray]) -> Snapshot:
        """Statistics of ``data.interactions`` over ``data.items`` (codes and vectors in catalogue order)."""
        ids, index, log, rows = log_rows(data)
        n = len(ids)
        end = log["ts"].max() if len(log) else pd.Timestamp(0)
        days = ((end.normalize() - log["ts"].dt.normalize()).dt.days).to_numpy().astype(np.float32)
        pop_all = np.bincount(rows, minlength=n).astype(np.float32)
        pop_day = np.bincount(rows[days < 1], minlength=n).astype(np.float32)
        pop_window = np.bincount(rows[days < window_days], minlength=n).astype(np.float32)
        first = np.full(n, np.nan, np.float32)
        last = np.full(n, np.nan, np.float32)
        if len(rows):
            by = pd.Series(days).groupby(rows)
            first[by.max().index.to_numpy()] = by.max().to_numpy()
            last[by.min().index.to_numpy()] = by.min().to_numpy()
        own = "catalogue_price" if "catalogue_price" in data.items else "price"
        price = (pd.to_numeric(data.items[own], errors="coerce").to_numpy(np.float64) if own in data.items
                 else np.full(n, np.nan))
        if "price" in log.columns and len(log):
            median = pd.Series(log["price"].to_numpy(np.float64)).groupby(rows).median()
            sold = np.full(n, np.nan)
            sold[median.index.to_numpy()] = median.to_numpy()
            price = np.where(np.isnan(price), sold, price)
        log_price = np.log(np.where(price > 0, price, np.nan)).astype(np.float32)
        groups = pd.factorize(data.items["group_id"].astype(str) if "group_id" in data.items
                              else pd.Series(ids))[0].astype(np.int64)
        users: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if len(log):
            frame = pd.DataFrame({"user": log["user_id"].astype(str).to_numpy(), "row": rows, "day": days})
            agg = frame.groupby(["user", "row"], sort=True).agg(n=("day", "size"), last=("day", "min")).reset_index()
            bounds = np.flatnonzero(np.r_[True, agg["user"].to_numpy()[1:] != agg["user"].to_numpy()[:-1]])
            u, r, c, lst = (agg[k].to_numpy() for k in ("user", "row", "n", "last"))
            for a, b in zip(bounds, [*bounds[1:], len(agg)], strict=True):
                users[str(u[a])] = (r[a:b].astype(np.int64), c[a:b].astype(np.float32), lst[a:b].astype(np.float32))
        return cls(index, pop_day, pop_window, pop_all, window_days, first, last, log_price, groups,
                   {k: np.asarray(v, np.int64) for k, v in codes.items()},
                   {k: np.asarray(v, np.float32) for k, v in vectors.items()}, users)


def _lookup(keys: np.ndarray, table_keys: np.ndarray, table_values: np.ndarray, missing: float) -> np.ndarray:
    """``table_values`` at ``keys`` (``table_keys`` sorted), ``missing`` where a key is absent."""
    if not len(table_keys):
        return np.full(len(keys), missing, np.float32)
    at = np.clip(np.searchsorted(table_keys, keys), 0, len(table_keys) - 1)
    return np.where(table_keys[at] == keys, table_values[at], missing).astype(np.float32)


def _seed_rows(snap: Snapshot, q: Query) -> list[int]:
    return [snap.index[i] for i in q.seeds if i in snap.index]


def feature_names(sources: Sequence[str], snap: Snapshot) -> list[str]:
    """The dense columns of ``build_features``, in order."""
    names = [f"rank:{s}" for s in sources] + [f"score:{s}" for s in sources] + ["n_sources"]
    names += ["pop_day", "pop_window", "pop_all", "trend", "days_since_first", "days_since_last", "never_sold",
              "log_price", "price_vs_shopper", "bought_n", "bought_days", "same_group_n"]
    names += [f"share:{a}" for a in snap.codes]
    for space in snap.vectors:
        names += [f"sim_mean:{space}", f"sim_max:{space}"]
    names += ["history_len", "days_since_last_buy", "n_seeds", "has_cart"]
    return names


def build_features(snap: Snapshot, queries: Sequence[Query], cands: CandidateSet) -> np.ndarray:
    """(len(cands), len(feature_names(...))) float32 features, NaN where a value is unknown."""
    n_rows, n_items = len(cands), len(snap.pop_all)
    if not queries or not n_rows:
        return np.zeros((n_rows, len(feature_names([""] * cands.rank.shape[1], snap))), np.float32)
    q, r = cands.query, cands.item
    cols: list[np.ndarray] = [cands.rank.T.copy(), cands.score.T.copy(),
                              (~np.isnan(cands.rank)).sum(axis=1, dtype=np.float32)[None]]
    trend = (snap.pop_day[r] + 1.0) / (snap.pop_window[r] / max(snap.window_days, 1.0) + 1.0)
    cols.append(np.stack([np.log1p(snap.pop_day[r]), np.log1p(snap.pop_window[r]), np.log1p(snap.pop_all[r]),
                          trend, snap.first_days[r], snap.last_days[r],
                          np.isnan(snap.first_days[r]).astype(np.float32), snap.log_price[r]]))
    # The shopper's purchases (from the log when it knows them, else the query's own history) and seeds.
    hk, hn, hd, mean_price = [], [], [], np.full(len(queries), np.nan, np.float32)
    seed_lists, hist_len, last_buy = [], np.zeros(len(queries), np.float32), np.full(len(queries), np.nan, np.float32)
    for qi, query in enumerate(queries):
        known = snap.user_items.get(query.user_id) if query.history else None
        if known is None:
            rows = np.array([snap.index[i] for i in query.history if i in snap.index], np.int64)
            known = (rows, np.ones(len(rows), np.float32), np.full(len(rows), np.nan, np.float32))
        rows, counts, days = known
        hk.append(qi * n_items + rows)
        hn.append(counts)
        hd.append(days)
        hist_len[qi] = counts.sum()
        if len(days) and np.isfinite(days).any():
            last_buy[qi] = np.nanmin(days)
        prices = snap.log_price[rows]
        if np.isfinite(prices).any():
            mean_price[qi] = np.nanmean(prices)
        seed_lists.append(_seed_rows(snap, query)[-MAX_SEEDS:])
    keys = np.concatenate(hk) if hk else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts_all, days_all = keys[order], np.concatenate(hn)[order], np.concatenate(hd)[order]
    row_keys = q * n_items + r
    bought_n = _lookup(row_keys, keys, counts_all, 0.0)
    bought_days = _lookup(row_keys, keys, days_all, np.nan)
    # same product group as a purchase or a cart item
    n_groups = int(snap.groups.max()) + 1 if len(snap.groups) else 1
    seed_q = np.repeat(np.arange(len(queries)), [len(s) for s in seed_lists])
    seed_r = np.fromiter((x for s in seed_lists for x in s), np.int64, len(seed_q))
    gkeys, gcount = np.unique(seed_q * n_groups + snap.groups[seed_r], return_counts=True)
    same_group = _lookup(q * n_groups + snap.groups[r], gkeys, gcount.astype(np.float32), 0.0)
    cols.append(np.stack([snap.log_price[r] - mean_price[q], bought_n, bought_days, same_group]))
    # share of the seeds holding the candidate's value of each attribute
    n_seeds = np.bincount(seed_q, minlength=len(queries)).astype(np.float32)
    shares = []
    for code in snap.codes.values():
        width = int(code.max()) + 2
        ckeys, ccount = np.unique(seed_q * width + code[seed_r] + 1, return_counts=True)
        got = _lookup(q * width + code[r] + 1, ckeys, ccount.astype(np.float32), 0.0)
        shares.append(np.where(code[r] >= 0, got / np.maximum(n_seeds[q], 1.0), 0.0))
    if shares:
        cols.append(np.stack(shares))
    # cosine similarity to the seeds, mean and max, per vector space
    for vectors in snap.vectors.values():
        cols.append(_similarities(vectors, seed_lists, q, r))
    cols.append(np.stack([hist_len[q], last_buy[q], n_seeds[q],
                          np.array([bool(x.cart) for x in queries], np.float32)[q]]))
    x = np.concatenate([c.reshape(-1, n_rows) for c in cols]).T.astype(np.float32)
    return np.ascontiguousarray(x)


def _similarities(vectors: np.ndarray, seed_lists: list[list[int]], q: np.ndarray, r: np.ndarray,
                  chunk: int = 8192) -> np.ndarray:
    """(2, n_rows): mean and max cosine between each candidate and its query's seeds (0 without seeds)."""
    width = max((len(s) for s in seed_lists), default=0)
    out = np.zeros((2, len(q)), np.float32)
    if width == 0:
        return out
    pad = np.full((len(seed_lists), width), -1, np.int64)
    for qi, s in enumerate(seed_lists):
        pad[qi, : len(s)] = s
    for start in range(0, len(q), chunk):
        sl = slice(start, start + chunk)
        seeds = pad[q[sl]]  # (c, width)
        sims = np.einsum("cd,cwd->cw", vectors[r[sl]], vectors[np.clip(seeds, 0, None)])
        valid = seeds >= 0
        count = valid.sum(axis=1)
        out[0, sl] = np.where(count > 0, (sims * valid).sum(axis=1) / np.maximum(count, 1), 0.0)
        out[1, sl] = np.where(count > 0, np.where(valid, sims, -np.inf).max(axis=1), 0.0)
    return out
