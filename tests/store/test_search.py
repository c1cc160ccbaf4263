"""Ranked search (``atelier.store.items.rank_items``) on a real H&M slice in an embedded PostgreSQL.

The slice is every article of every 40th product code (2,709 articles: whole products with all their
colourways, among them 24 women's bikini tops, kids' bikini sets, 7 coats and black wool garments that are
not coats) with the transactions of those articles, ingested and mapped as the pipeline does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import current_data
from atelier.ingest import ingest, load_tables
from atelier.store import MIGRATIONS, SearchFilters, VectorStore, open_store
from atelier.store.items import Lexicon, catalogue_facts, edit_distance, rank_items, text_hits, text_query

PRODUCT_EVERY = 40  # every 40th product code: ~2.7k articles, whole products


@pytest.fixture(scope="module")
def hm_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    """An ingested run folder of the slice."""
    run = tmp_path_factory.mktemp("search-run")
    source = run / "source" / "hm"
    source.mkdir(parents=True)
    articles = pd.read_csv(data_dir / "hm" / "articles.csv.gz", dtype=str)
    articles = articles[articles["product_code"].astype(int) % PRODUCT_EVERY == 0]
    articles.to_csv(source / "articles.csv.gz", index=False, compression="gzip")
    tx = pd.read_csv(data_dir / "hm" / "transactions.csv.gz", dtype=str)
    tx[tx["article_id"].isin(set(articles["article_id"]))].to_csv(source / "transactions.csv.gz", index=False,
                                                                  compression="gzip")
    ingest("hm", source, run / "data")
    return Settings.model_validate({"run_dir": run, "data_dir": run / "source", "DATABASE_URL": ""})


@pytest.fixture(scope="module")
def store(hm_settings: Settings) -> Iterator[VectorStore]:
    """The slice's items (prices from its transactions) in a fresh embedded store."""
    data = current_data("hm", *load_tables(hm_settings.paths.dataset("hm")), hm_settings.paths.features)
    store = open_store(hm_settings)
    store.upsert_items(dataset_items(data.items, "hm"))
    yield store
    store.close()
    if store.server is not None:
        store.server.cleanup()


def top(store: VectorStore, query: str, n: int = 10, **kwargs: Any) -> list[dict[str, Any]]:
    """The first ``n`` item JSON of a ranked search."""
    filters = kwargs.pop("filters", SearchFilters())
    return [doc for _, doc in rank_items(store, query, filters, limit=n, **kwargs).rows]


def kind(doc: dict[str, Any]) -> tuple[str, str, str]:
    clothes = doc["clothes"]
    return clothes["category"][0], clothes["gender"][0], clothes["color"][0]


# --- relevance --------------------------------------------------------------------------------


def test_bikini_top_puts_womens_bikini_tops_first(store: VectorStore) -> None:
    first = top(store, "bikini top")
    assert [kind(d)[:2] for d in first] == [("07swim_01bikinitop", "female")] * 10, [kind(d) for d in first]
    # the kids' bikinis (titles "... Bikini", "Top with ..." in the description) match too, further down
    everything = top(store, "bikini top", 200)
    kids = [n for n, d in enumerate(everything) if kind(d)[1] == "kids"]
    assert kids and min(kids) >= 10, kids
    # H&M gives its bikini tops names ("Shake it in Balconette"): the category's words find every one
    with store.connection() as conn:
        row = conn.execute("SELECT count(*) FROM items WHERE category = '07swim_01bikinitop'").fetchone()
    assert row is not None and sum(kind(d)[0] == "07swim_01bikinitop" for d in everything) == row[0] >= 24


def test_black_wool_coat_puts_black_coats_first(store: VectorStore) -> None:
    first = top(store, "black wool coat", 3)
    assert len(first) == 3
    for doc in first:
        category, _, color = kind(doc)
        assert color == "black" and ("coat" in category or "coat" in doc["service"]["title"].lower()), kind(doc)


def test_a_typo_still_finds_bikini_tops(store: VectorStore) -> None:
    page = rank_items(store, "bikni top", SearchFilters(), limit=10)
    assert page.corrections == {"bikni": "bikini"}
    assert [i for i, _ in page.rows] == [i for i, _ in rank_items(store, "bikini top", SearchFilters(), limit=10).rows]
    shirts = rank_items(store, "t-shrt", SearchFilters(), limit=5)  # a hyphenated word
    assert shirts.corrections == {"t-shrt": "t-shirt"} and len(shirts.rows) == 5
    assert all("shirt" in d["service"]["description"].lower() + d["service"]["title"].lower() for _, d in shirts.rows)


def test_filters_are_kept(store: VectorStore) -> None:
    black = top(store, "bikini top", 20, colors=["black"])
    assert black and all(kind(d)[2] == "black" for d in black)
    kids = top(store, "bikini", 20, filters=SearchFilters(genders=("kids",)))
    assert kids and all(kind(d)[1] == "kids" for d in kids)
    cheap = top(store, "bikini top", 50, filters=SearchFilters(max_price=0.02))
    assert cheap and all(d["service"]["price"] <= 0.02 for d in cheap)


def test_no_item_with_every_word_ranks_by_most_words(store: VectorStore) -> None:
    page = rank_items(store, "bikini for my wedding", SearchFilters(), limit=5)
    assert page.ranked_by == ["text: most words"] and page.corrections == {}  # "wed" (wedding): too short to fix
    assert all("bikini" in (d["service"]["title"] + d["service"]["description"]).lower() for _, d in page.rows)
    assert page.rows[0][1]["clothes"]["category"] == ["07swim_01bikinitop"], "bikini tops hold the most words"


# --- fusion, ties, pages ----------------------------------------------------------------------


def test_vector_hits_reorder_text_matches_and_follow_them_alone(store: VectorStore) -> None:
    text = [i for i, _ in rank_items(store, "bikini top", SearchFilters(), limit=100).rows]
    coat = next(i for i, d in rank_items(store, "coat", SearchFilters(), limit=1).rows)
    hits = [(text[15], 0.9), (coat, 0.8)]  # one bikini top the text ranks 16th, one item with none of the words
    page = rank_items(store, "bikini top", SearchFilters(), limit=100, vector_hits=hits, vector_name="vector: v",
                      popular=["x"])
    ids = [i for i, _ in page.rows]
    assert page.ranked_by == ["text: all words", "vector: v", "popularity"]
    assert ids[0] == text[15], "a text match the vector list also finds moves up"
    assert ids.index(coat) >= len(text), "an item only the vector list found follows every text match here"


def test_popularity_breaks_ties(store: VectorStore) -> None:
    hits = text_hits(store, text_query(store, "bikini top", catalogue_facts(store).lexicon), SearchFilters())
    # colourways often share title, attribute words and description: the text scores them alike
    score = next(s for _, s in hits if sum(x == s for _, x in hits) >= 3)
    tied = [i for i, s in hits if s == score]
    favourite = tied[-1]
    again = [i for i, _ in rank_items(store, "bikini top", SearchFilters(), limit=100, popular=[favourite]).rows]
    assert next(i for i in again if i in tied) == favourite


def test_pages_do_not_reshuffle(store: VectorStore) -> None:
    hits = [(i, 1.0 - n / 100) for n, (i, _) in enumerate(rank_items(store, "dress", SearchFilters(), limit=50).rows)]
    whole = [i for i, _ in rank_items(store, "black dress", SearchFilters(), limit=60, vector_hits=hits).rows]
    pages = [i for offset in range(0, 60, 20) for i, _ in
             rank_items(store, "black dress", SearchFilters(), limit=20, offset=offset, vector_hits=hits).rows]
    assert pages == whole


# --- catalogue facts, corrections, migration --------------------------------------------------


def test_price_levels_come_from_the_catalogue_quantiles(store: VectorStore) -> None:
    facts = catalogue_facts(store)
    assert len(facts.price_cuts) == 4 and list(facts.price_cuts) == sorted(facts.price_cuts)
    assert facts.price_level(0.0) == 1 and facts.price_level(1.0) == 5 and facts.price_level(None) is None
    assert "bikini" in facts.lexicon and facts.lexicon.counts["bikini"] >= 24


def test_catalogue_facts_are_read_again_in_the_background(store: VectorStore) -> None:
    first = catalogue_facts(store)
    assert catalogue_facts(store, max_age_s=0) is first, "a stale read answers at once"
    deadline = time.monotonic() + 20
    while catalogue_facts(store) is first:  # the background read replaces it
        assert time.monotonic() < deadline, "the catalogue facts were not read again"
        time.sleep(0.05)


def test_lexicon_corrects_only_near_misses() -> None:
    lexicon = Lexicon({"bikini": 40, "black": 900, "blank": 2, "wedg": 3, "trouser": 80})
    assert lexicon.correct("bikni") == "bikini" and lexicon.correct("blak") == "black"  # "black": held by more
    assert lexicon.correct("trousr") == "trouser" and lexicon.correct("bikini") is None
    assert lexicon.correct("wed") is None and lexicon.correct("zebra") is None
    jersey = Lexicon({"jersey": 500, "jerri": 1, "tab": 9, "famili": 4})
    assert jersey.correct("jersi") == "jerri" and jersey.correct("jersi", "jersy") == "jersey"  # stem and word
    assert jersey.correct("tabl", "table") is None and jersey.correct("famli", "famly") == "famili"
    # a catalogue's own misspelling on a few items yields to the word most items use
    hm = Lexicon({"bikini": 1500, "bikni": 6, "tulle": 15, "tulla": 1})
    assert hm.correct("bikni") == "bikini" and hm.correct("tulle") is None and hm.correct("bikini") is None
    assert edit_distance("ab", "ba") == 1 and edit_distance("bikni", "bikini") == 1


def test_an_existing_table_is_migrated_in_place(store: VectorStore) -> None:
    with store.connection() as conn:
        conn.execute("DROP DATABASE IF EXISTS legacy")
        conn.execute("CREATE DATABASE legacy")
    legacy = make_conninfo(store.conninfo, dbname="legacy")
    title = "Shake it in Balconette"
    item = {"item_id": "old-1", "clothes": {"category": ["07swim_01bikinitop"], "color": ["red"]},
            "reinforced_feature_value": {}, "service": {"title": title, "description": "Lined."}}
    with psycopg.connect(legacy, autocommit=True) as conn:  # a database as schema version 1 left it
        conn.execute("CREATE EXTENSION vector")
        for statement in MIGRATIONS[0][2]:
            assert isinstance(statement, str)
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO schema_version (version, description) VALUES (1, 'items and models')")
        conn.execute("INSERT INTO items (item_id, item, title) VALUES ('old-1', %s, %s)",
                     (psycopg.types.json.Jsonb(item), title))
    migrated = VectorStore(legacy, pool_size=1)
    try:
        assert migrated.schema_version == MIGRATIONS[-1][0]
        page = rank_items(migrated, "red bikini top", SearchFilters())
        assert [i for i, _ in page.rows] == ["old-1"]
    finally:
        migrated.close()
