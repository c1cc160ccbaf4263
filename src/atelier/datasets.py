"""Per-dataset rules and every view of a dataset *as of a cut*: splits, training data, queries.

Nothing a model sees may come from after the cut (DESIGN.md section 8). The ingested tables hold the
whole log, so every model input is derived here from the training window only:

- ``catalogue_as_of``: the catalogue with prices from the training window's transactions where the
  catalogue has no price of its own (H&M articles carry none; a price from later sales would mark the
  articles first sold in the test days);
- ``users_as_of``: user profiles and counts from the training window (RentTheRunway renters state their
  body profile on each rental; the latest value before the cut is what a model may know);
- ``train_data``: the ``TrainData`` a recommender is fitted on (catalogue, window, users as of the cut);
- ``build_queries`` / ``cart_queries``: the test users' queries and the items they then bought.

A leakage test (``tests/test_leakage.py``) alters the test window and checks that no model input or
prediction changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from atelier.ingest import PROFILE_COLUMNS, load_tables, read_interactions_file
from atelier.recommender import Query, TrainData

PROFILE_FIELDS = ("height_cm", "weight_kg", "age", "body_type")
TEST_SHARE = 0.2  # a catalogue with no default cut tests on the last fifth of its days


@dataclass(frozen=True)
class DatasetRules:
    """What differs between catalogues, in one place; the defaults suit any catalogue with a log."""

    cut: str | None = None  # first test day of the default split; None: the last TEST_SHARE of the log's days
    popularity_days: float = 7.0  # window of the popularity lists (and of popularity features)
    label_days: float = 7.0  # the ranker's label period at the end of a training window
    rebuy: bool = False  # shoppers buy the same items again: own purchases lead the rule set
    occasion_rule: bool = False  # the rule set is popularity within the stated occasion (rentals)
    raw_re_columns: tuple[str, ...] = ()  # catalogue columns the STD schema lacks, hashed into the ranker's RE field
    ranker_retriever: str = "content"  # the candidates `atelier run` trains the ranker on
    own_item_tower: bool = True  # `atelier run` trains one on this catalogue (else it borrows another dataset's)
    # The catalogue is known only through the log (RentTheRunway: no product table, only rented items). As of a
    # cut it holds the items rented before it: an item first rented later did not exist for a model, and
    # "in the catalogue but never rented" would otherwise mark exactly the items rented in the test window.
    catalogue_from_log: bool = False
    train_in_run: bool = True  # `atelier run` trains and evaluates its models when it has interactions


RULES: dict[str, DatasetRules] = {
    # H&M: train 09-16..18, test 09-19..20; the design's 3-day popularity; one label day leaves two of
    # history; shoppers re-buy; the columns the schema does not cover still tell the ranker something.
    "hm": DatasetRules(cut="2020-09-19", popularity_days=3.0, label_days=1.0, rebuy=True,
                       raw_re_columns=("product_type_name", "department_name", "section_name", "garment_group_name",
                                       "graphical_appearance_name", "perceived_colour_value_name"),
                       ranker_retriever="content"),
    # RentTheRunway: rentals are sparse (90-day windows); renters rarely rent an item twice but say the occasion.
    # Its items are known only by the category renters gave, so it borrows H&M's item tower (shared vocabulary).
    "rtr": DatasetRules(cut="2017-08-01", popularity_days=90.0, label_days=90.0, occasion_rule=True,
                        ranker_retriever="occasion", own_item_tower=False, catalogue_from_log=True),
    # Labelled titles for the extraction benchmark; no interactions, nothing to recommend.
    "myntra": DatasetRules(own_item_tower=False, train_in_run=False),
}


def rules_for(dataset: str) -> DatasetRules:
    """The rules of a dataset (the defaults for a catalogue without its own)."""
    return RULES.get(dataset, DatasetRules())


def default_cut(dataset: str, interactions: pd.DataFrame) -> pd.Timestamp:
    """The first test day: the dataset's own, else the day that leaves the last ``TEST_SHARE`` of the log's
    distinct days for testing (at least one day on each side)."""
    own = rules_for(dataset).cut
    if own is not None:
        return pd.Timestamp(own)
    days = np.sort(interactions["ts"].dt.normalize().unique())
    if len(days) < 2:
        raise EvaluationError(f"{dataset!r} has interactions on {len(days)} day(s): no split is possible")
    n_test = min(len(days) - 1, max(1, round(TEST_SHARE * len(days))))
    return pd.Timestamp(days[len(days) - n_test])


class EvaluationError(ValueError):
    """The split or the data cannot be evaluated (empty test window, unknown dataset)."""


@dataclass
class Split:
    """A train/test split of one dataset's interactions."""

    dataset: str
    train: pd.DataFrame
    test: pd.DataFrame
    cut: pd.Timestamp
    source: str  # "default cut", "cut <day>" or "test file <path>"

    def describe(self) -> dict[str, object]:
        """Sizes and dates for the report."""
        return {
            "dataset": self.dataset, "source": self.source, "cut": str(self.cut.date()),
            "train_interactions": len(self.train), "test_interactions": len(self.test),
            "train_days": [str(self.train["ts"].min().date()), str(self.train["ts"].max().date())]
            if len(self.train) else [],
            "test_days": [str(self.test["ts"].min().date()), str(self.test["ts"].max().date())],
            "test_users": int(self.test["user_id"].nunique()),
        }


def time_split(dataset: str, interactions: pd.DataFrame, cut: str | None = None) -> Split:
    """Train before ``cut`` (a YYYY-MM-DD day; the dataset's default cut when None), test from it on."""
    if interactions.empty:
        raise EvaluationError(f"{dataset!r} has no interactions to split")
    day = pd.Timestamp(cut) if cut is not None else default_cut(dataset, interactions)
    train = interactions[interactions["ts"] < day]
    test = interactions[interactions["ts"] >= day]
    if test.empty or train.empty:
        raise EvaluationError(
            f"cut {day.date()} leaves {len(train)} training and {len(test)} test interactions "
            f"(data spans {interactions['ts'].min().date()}..{interactions['ts'].max().date()})"
        )
    return Split(dataset, train, test, day, "default cut" if cut is None else f"cut {day.date()}")


def file_split(dataset: str, interactions: pd.DataFrame, items: pd.DataFrame, test_file: Path) -> Split:
    """Test on a file in the dataset's own format; train on everything before its first day."""
    test, rejects = read_interactions_file(dataset, test_file, items)
    if test.empty:
        raise EvaluationError(f"{test_file}: no usable test interactions ({len(rejects)} rejected)")
    day = test["ts"].min().normalize()
    train = interactions[interactions["ts"] < day]
    if train.empty:
        raise EvaluationError(f"{test_file}: no ingested interaction precedes its first day {day.date()}")
    return Split(dataset, train, test, day, f"test file {test_file} ({len(rejects)} rows rejected)")


# --------------------------------------------------------------------------- tables as of a cut


def catalogue_as_of(items: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """The catalogue as ``log`` describes it: each missing price filled by the median price of ``log``'s
    transactions, and item attributes that the log's rows carry (RentTheRunway's ``category``, which
    renters give) taken from the log's rows where the item has any.

    A catalogue's own prices are kept; a shop whose catalogue has none (H&M) gets the prices its
    window's sales were made at, so an article never sold in the window stays without one.
    """
    items = _attributes_as_of(items, log)
    # ``catalogue_price`` keeps the catalogue's own price, so the view can be taken again for a shorter log
    # (the reranker's label days) without keeping prices from the longer one.
    own = items["catalogue_price"] if "catalogue_price" in items else (
        pd.to_numeric(items["price"], errors="coerce") if "price" in items else pd.Series(np.nan, items.index))
    price = own
    if "price" in log.columns and not log.empty:
        median = log.groupby(log["item_id"].astype(str))["price"].median()
        price = own.fillna(items["item_id"].astype(str).map(median))
    return items.assign(catalogue_price=own.astype("float64"), price=price.astype("float64"))


def _attributes_as_of(items: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """RentTheRunway has no catalogue: an item's category (also its title) is the one its renters gave most
    often. Recount it over ``log`` for the items rented there; others keep the ingested value."""
    if "category" not in log.columns or "category" not in items.columns or log.empty:
        return items
    given = log.dropna(subset=["category"])
    counts = given.groupby([given["item_id"].astype(str), given["category"].astype(str)]).size()
    counts = counts.rename("n").reset_index().sort_values(["item_id", "n", "category"], ascending=[True, False, True])
    mode = counts.drop_duplicates("item_id").set_index("item_id")["category"]
    ids = items["item_id"].astype(str)
    category = ids.map(mode).fillna(items["category"].astype(str))
    out = items.assign(category=category.astype(items["category"].dtype))
    if "title" in items.columns and (items["title"].astype(str) == items["category"].astype(str)).all():
        out["title"] = out["category"].astype(items["title"].dtype)
    return out


def users_as_of(users: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """The users of ``log`` with what ``log`` says of them: interaction counts and, when the rows carry a
    profile (RentTheRunway renters state it on each rental), each field's latest known value."""
    present = [c for c in PROFILE_COLUMNS if c in log.columns]
    counts = log["user_id"].value_counts()
    if present:
        ordered = log.sort_values("ts", kind="stable")
        out = ordered.groupby("user_id", sort=True)[present].last().reset_index()
    else:
        keep = [c for c in users.columns if c != "n_interactions"]
        out = users[keep][users["user_id"].isin(counts.index)].sort_values("user_id").reset_index(drop=True)
        missing = counts.index.difference(out["user_id"])
        if len(missing):
            out = pd.concat([out, pd.DataFrame({"user_id": missing})], ignore_index=True)
    out["n_interactions"] = out["user_id"].map(counts).astype("int64")
    return out.reset_index(drop=True)


def train_data(split: Split, items: pd.DataFrame, users: pd.DataFrame, cache_dir: Path) -> TrainData:
    """What a recommender may learn from: catalogue, window and users as of the split's cut (a catalogue known
    only through its log holds the items of the window)."""
    train = split.train.reset_index(drop=True)
    if rules_for(split.dataset).catalogue_from_log:
        items = items[items["item_id"].astype(str).isin(set(train["item_id"].astype(str)))].reset_index(drop=True)
    return TrainData(split.dataset, catalogue_as_of(items, train), train, users_as_of(users, train), cache_dir)


def current_data(dataset: str, items: pd.DataFrame, interactions: pd.DataFrame, users: pd.DataFrame,
                 cache_dir: Path) -> TrainData:
    """The whole log as a server knows it today (prices from every sale so far)."""
    return TrainData(dataset, catalogue_as_of(items, interactions), interactions, users, cache_dir)


def load_current(dataset: str, dataset_dir: Path, cache_dir: Path) -> TrainData:
    """``current_data`` of an ingested dataset (IngestError when it was never ingested)."""
    return current_data(dataset, *load_tables(dataset_dir), cache_dir)


# --------------------------------------------------------------------------- queries


def _profile(row: dict[str, object]) -> dict[str, float | str | None]:
    return {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else v)  # type: ignore[misc]
            for k, v in row.items()}


def build_queries(split: Split, users: pd.DataFrame) -> tuple[list[Query], dict[str, set[str]]]:
    """One query per test user (history, profile, context) and each user's actual test items.

    The profile is the one the shopper states at their first test interaction when the rows carry one
    (RentTheRunway), else the users table's; the context is the occasion of that interaction."""
    history = (split.train.sort_values("ts", kind="stable")
               .drop_duplicates(["user_id", "item_id"], keep="last")
               .groupby("user_id")["item_id"].agg(tuple))
    test = split.test.sort_values("ts", kind="stable")
    first = test.drop_duplicates("user_id")
    row_cols = [c for c in PROFILE_FIELDS if c in test.columns]
    if row_cols:
        profiles = first.set_index("user_id")[row_cols].to_dict("index")
    else:
        cols = [c for c in PROFILE_FIELDS if c in users.columns]
        profiles = users.set_index("user_id")[cols].to_dict("index") if cols else {}
    contexts = first.set_index("user_id")["occasion"] if "occasion" in test else pd.Series(dtype=str)
    actual = {str(u): set(map(str, items)) for u, items in test.groupby("user_id")["item_id"]}
    queries = []
    for user in actual:
        ctx = contexts.get(user)
        queries.append(Query(user_id=user, history=tuple(map(str, history.get(user, ()))),
                             profile=_profile(profiles.get(user, {})),
                             context=None if ctx is None or pd.isna(ctx) else str(ctx)))
    return queries, actual


def cart_queries(split: Split) -> tuple[list[Query], dict[str, set[str]]]:
    """The cart cohort: test users with no training history who bought at least two distinct items on
    their first test day. Their cart is the first of those items in the test file's order, the truth is
    every other item of their test interactions, and the query holds the cart and nothing else."""
    trained = set(split.train["user_id"].astype(str))
    test = split.test.assign(user_id=split.test["user_id"].astype(str), item_id=split.test["item_id"].astype(str))
    test = test[~test["user_id"].isin(trained)]
    test = test.sort_values("ts", kind="stable")  # stable: the file's order within a day
    day = test["ts"].dt.normalize()
    first_day = day.groupby(test["user_id"]).transform("min")
    on_first = test[day == first_day]
    distinct = on_first.groupby("user_id")["item_id"].nunique()
    eligible = distinct.index[distinct >= 2]
    cart = on_first[on_first["user_id"].isin(eligible)].drop_duplicates("user_id").set_index("user_id")["item_id"]
    bought = test[test["user_id"].isin(eligible)].groupby("user_id")["item_id"].agg(set)
    queries, actual = [], {}
    for user, item in cart.items():
        truth = bought[user] - {item}
        if truth:
            queries.append(Query(user_id=str(user), cart=(str(item),)))
            actual[str(user)] = truth
    return queries, actual
