"""The vector store against a real embedded PostgreSQL + pgvector (started once per session)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from atelier.config import Settings
from atelier.schema.item import ItemJSON, Service
from atelier.store import (
    SCHEMA_VERSION,
    SearchFilters,
    StoreError,
    VectorStore,
    check_pgvector_version,
    index_vectors,
    open_store,
    parse_version,
    similar,
    table_name_for,
    version_at_least,
)

DIM = 32  # small vectors keep HNSW builds in tens of milliseconds
CATEGORIES = ("04onepiece_01dress", "02top_06tshirt", "03bottom_01jeans")
COLORS = ("red", "blue", "black")


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Random unit vectors: inner product = cosine, as the item tower produces."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, dim)


def make_item(i: int, *, prefix: str = "i") -> ItemJSON:
    """Item i: category/colour cycle by 3, gender by 2, price i % 100, stock i % 5, 4 colourways a group."""
    return ItemJSON(
        item_id=f"{prefix}{i:05d}",
        clothes={
            "category": [CATEGORIES[i % 3]],
            "gender": ["female" if i % 2 else "male"],
            "color": [COLORS[i % 3]],
        },
        service=Service(title=f"item {i}", price=float(i % 100), stock=i % 5, group_id=f"g{i // 4}"),
    )


def ids_for(n: int, prefix: str = "i") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


@pytest.fixture(scope="session")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings whose run folder holds the session's embedded server (``<run_dir>/pgdata``)."""
    run_dir = tmp_path_factory.mktemp("store-run")
    return Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""})


@pytest.fixture(scope="session")
def session_store(store_settings: Settings) -> Iterator[VectorStore]:
    """One embedded PostgreSQL for the whole session (first start ~1-5 s)."""
    store = open_store(store_settings)
    yield store
    store.close()
    if store.server is not None:
        store.server.cleanup()  # stop it now rather than at interpreter exit


@pytest.fixture
def store(session_store: VectorStore) -> VectorStore:
    """The session store, emptied: no items, no models."""
    for model in session_store.models():
        session_store.drop_model(model.model_id)
    with session_store.connection() as conn:
        conn.execute("TRUNCATE items CASCADE")
    return session_store


@pytest.fixture
def loaded(store: VectorStore) -> tuple[VectorStore, np.ndarray]:
    """2,000 items with metadata and model ``m`` loaded (HNSW built)."""
    n = 2000
    vectors = unit_vectors(n)
    store.upsert_items([make_item(i) for i in range(n)])
    store.load_vectors("m", ids_for(n), vectors)
    return store, vectors


def table_names(store: VectorStore) -> set[str]:
    with store.connection() as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    return {r[0] for r in rows}


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-(vectors @ query), kind="stable")[:k])


# --- schema -----------------------------------------------------------------------------------


def test_schema_init_is_idempotent(store: VectorStore) -> None:
    again = VectorStore(store.conninfo, pool_size=1)  # runs the migrations a second time
    again.close()
    with store.connection() as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert {"items", "models", "schema_version"} <= table_names(store)
    assert version_at_least(store.pgvector_version)


def test_table_names_are_safe_and_distinct() -> None:
    a, b = table_name_for("Item Tower/v1"), table_name_for("item-tower-v1")
    assert a != b and a.startswith("vec_item_tower_v1_") and len(a) <= 45
    assert table_name_for("😀").startswith("vec_model_")


# --- load, search, swap -----------------------------------------------------------------------


def test_top100_returns_100_with_good_recall(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    hits = store.search("m", vectors[7], 100)
    assert len(hits) == 100  # pgvector's default ef_search of 40 would stop at ~40
    assert hits[0][0] == "i00007" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)
    report = store.probe("m", sample=50)
    assert report["recall_at_k"] >= 0.9
    assert report["rows"] == 2000 and report["duplicate_ids"] == 0 and report["orphan_vectors"] == 0
    assert report["index_valid"] and report["min_returned"] == 100
    assert store.model("m").ef_factor == report["ef_factor"]  # calibrated factor is kept
    assert len(store.search("m", vectors[7], 1500)) == 1500  # beyond ef_search's cap of 1000


def test_database_url_is_used_when_set(session_store: VectorStore, tmp_path: Path) -> None:
    settings = Settings.model_validate({"run_dir": tmp_path, "DATABASE_URL": session_store.conninfo})
    with open_store(settings, pool_size=1) as external:
        assert external.server is None and external.pgvector_version == session_store.pgvector_version
    assert not (tmp_path / "pgdata").exists()  # no embedded server was started


def test_exact_search_matches_numpy(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    query = unit_vectors(1, seed=99)[0]
    hits = store.exact_search("m", query, 20)
    assert [h for h, _ in hits] == [f"i{i:05d}" for i in exact_top(vectors, query, 20)]
    assert hits[0][1] == pytest.approx(float(np.max(vectors @ query)), abs=1e-5)
    batch = store.search_batch("m", unit_vectors(5, seed=3), 10)
    assert len(batch) == 5 and all(len(b) == 10 for b in batch)


def _vectors_then(vectors: np.ndarray, last: object) -> Iterator[object]:
    yield from vectors
    yield last


def _vectors_then_raise(vectors: np.ndarray) -> Iterator[np.ndarray]:
    yield from vectors
    raise RuntimeError("encoder crashed mid-load")


def test_failed_loads_leave_the_old_index_serving(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    before = store.search("m", vectors[0], 50)
    model_before = store.model("m")
    tables_before = table_names(store)
    new = unit_vectors(2000, seed=5)
    bad_nan = new.copy()
    bad_nan[-1, 3] = np.nan
    ids = ids_for(2000)
    with pytest.raises(StoreError, match="NaN"):
        store.load_vectors("m", ids, bad_nan)
    with pytest.raises(StoreError, match="shape"):
        store.load_vectors("m", ids, _vectors_then(new[:-1], np.ones(DIM + 1, dtype=np.float32)))
    with pytest.raises(RuntimeError, match="encoder crashed"):
        store.load_vectors("m", [*ids, "extra"], _vectors_then_raise(new))
    with pytest.raises(StoreError, match="duplicate"):
        store.load_vectors("m", [*ids[:-1], ids[0]], new)
    # A brand-new model whose load fails leaves no trace either (no table, no placeholder items).
    with pytest.raises(StoreError, match="NaN"):
        store.load_vectors("fresh", ids_for(2000, prefix="new"), bad_nan)
    assert store.search("m", vectors[0], 50) == before
    assert store.model("m") == model_before
    assert table_names(store) == tables_before
    assert not any(name.endswith("__new") for name in table_names(store))
    assert [m.model_id for m in store.models()] == ["m"]
    with store.connection() as conn:
        row = conn.execute("SELECT count(*) FROM items").fetchone()
    assert row is not None and row[0] == 2000


def test_reload_swaps_while_searches_run(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    errors: list[BaseException] = []
    counts: list[int] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            try:
                counts.append(len(store.search("m", vectors[1], 100)))
            except BaseException as exc:  # report any failure to the main thread
                errors.append(exc)
                return

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        new = unit_vectors(2000, seed=11)
        report = store.load_vectors("m", ids_for(2000), new)
    finally:
        stop.set()
        thread.join()
    assert not errors and counts and set(counts) == {100}
    assert report.rows == 2000 and report.placeholder_items == 0
    assert store.search("m", new[1], 1)[0][0] == "i00001"
    assert store.model("m").ef_factor is None  # a new index needs a new calibration


def test_vectors_before_items_get_placeholder_rows(store: VectorStore) -> None:
    report = store.load_vectors("m", ids_for(1000), unit_vectors(1000))
    assert report.placeholder_items == 1000
    assert store.get_item("i00003") == {}
    store.upsert_items([make_item(3)])
    item = store.get_item("i00003")
    assert item is not None and item["clothes"]["color"] == [COLORS[3 % 3]]


# --- live upsert and delete ---------------------------------------------------------------------


def test_upserted_item_is_searchable_at_once_and_delete_removes_it(
    loaded: tuple[VectorStore, np.ndarray],
) -> None:
    store, _ = loaded
    query = unit_vectors(1, seed=42)[0]
    new_item = make_item(0, prefix="live")
    store.upsert_item(new_item, "m", query)
    assert store.search("m", query, 5)[0] == ("live00000", pytest.approx(1.0, abs=1e-5))
    moved = -query
    store.upsert_item(new_item, "m", moved)  # update: the old vector is replaced
    assert store.search("m", moved, 1)[0][0] == "live00000"
    assert "live00000" not in {i for i, _ in store.search("m", query, 50)}
    assert store.delete_item("live00000")
    assert "live00000" not in {i for i, _ in store.search("m", moved, 50)}
    assert not store.delete_item("live00000")
    with pytest.raises(StoreError, match="unknown item id"):
        store.get_vector("m", "live00000")


# --- filters, exclusions, colourways ------------------------------------------------------------


def test_filters_are_applied_and_still_return_k(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    query = unit_vectors(1, seed=7)[0]
    filters = SearchFilters(
        categories=["02top_06tshirt"], genders=["male"], min_price=10, max_price=60, in_stock_only=True
    )
    hits = store.search("m", query, 50, filters=filters)

    def ok(i: int) -> bool:
        return i % 3 == 1 and i % 2 == 0 and 10 <= i % 100 <= 60 and i % 5 > 0

    matching = [i for i in range(2000) if ok(i)]
    assert len(matching) > 50  # so "returns k" is a real requirement
    assert len(hits) == 50
    assert all(ok(int(h[2:])) for h, _ in hits)
    truth = {f"i{matching[j]:05d}" for j in exact_top(vectors[matching], query, 50)}
    assert len(truth & {h for h, _ in hits}) >= 45
    assert {h for h, _ in store.exact_search("m", query, 50, filters=filters)} == truth


def test_exclusions_and_colourway_dedupe(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, vectors = loaded
    query = vectors[100]
    top = [h for h, _ in store.search("m", query, 30)]
    bought = top[:10]
    hits = store.search("m", query, 30, exclude_ids=bought)
    assert len(hits) == 30 and not set(bought) & {h for h, _ in hits}
    assert [h for h, _ in hits][:20] == top[10:]

    deduped = store.search("m", query, 100, dedupe_groups=True)
    groups = [int(h[1:]) // 4 for h, _ in deduped]
    assert len(deduped) == 100 and len(set(groups)) == 100
    # each kept item is the best of its group among the plain results
    best: dict[int, str] = {}
    for h, _ in store.exact_search("m", query, 2000):
        best.setdefault(int(h[1:]) // 4, h)
    assert sum(best[g] == h for g, (h, _) in zip(groups, deduped, strict=True)) >= 95


# --- errors -------------------------------------------------------------------------------------


def test_clear_errors_for_bad_dims_and_unknown_ids(loaded: tuple[VectorStore, np.ndarray]) -> None:
    store, _ = loaded
    with pytest.raises(StoreError, match=r"shape \(33,\), the model's vectors have 32 dimensions"):
        store.search("m", np.ones(DIM + 1), 10)
    with pytest.raises(StoreError, match="dimensions"):
        store.upsert_item(make_item(1), "m", np.ones(DIM - 1))
    with pytest.raises(StoreError, match="NaN"):
        store.search("m", np.full(DIM, np.nan), 10)
    with pytest.raises(StoreError, match=r"unknown model id 'nope'.*\['m'\]"):
        store.search("nope", np.ones(DIM), 10)
    with pytest.raises(StoreError, match="unknown item id 'missing'"):
        store.get_vector("m", "missing")
    with pytest.raises(StoreError, match="k must be"):
        store.search("m", np.ones(DIM), 0)


def test_refused_connection_is_a_clear_store_error(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path}&port=5999"  # a socket dir with no server
    settings = Settings.model_validate({"run_dir": tmp_path, "DATABASE_URL": url})
    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL \(host=.*port=5999"):
        open_store(settings)


def test_pgvector_version_check() -> None:
    assert parse_version("0.8.5") == (0, 8, 5) and parse_version("0.9.0-dev") == (0, 9, 0)
    assert version_at_least("0.8.4") and version_at_least("0.9") and version_at_least("1.0.0")
    assert not version_at_least("0.8.3") and not version_at_least("0.7.10")
    check_pgvector_version("0.8.5", "0.8.5")
    check_pgvector_version(None, "0.8.4")  # installable: fine, CREATE EXTENSION follows
    with pytest.raises(StoreError, match=r"pgvector 0\.8\.0 is installed.*>= 0\.8\.4.*ALTER EXTENSION"):
        check_pgvector_version("0.8.0", "0.8.5")
    with pytest.raises(StoreError, match=r"0\.7\.4.*upgrade pgvector"):
        check_pgvector_version("0.7.4", "0.7.4")
    with pytest.raises(StoreError, match="not available"):
        check_pgvector_version(None, None)
    with pytest.raises(StoreError, match=r"offers pgvector 0\.8\.1"):
        check_pgvector_version(None, "0.8.1")


# --- the CLI's functions ------------------------------------------------------------------------


def test_index_vectors_and_similar(store: VectorStore, store_settings: Settings) -> None:
    n = 1200
    vectors = unit_vectors(n, seed=4)
    items = [make_item(i) for i in range(n)]
    stages: set[str] = set()
    result = index_vectors(
        store_settings,
        "tower",
        ids_for(n),
        vectors,
        items,
        sample=40,
        progress=lambda stage, done, total: stages.add(stage),
    )
    assert result["ok"] and result["rows"] == n and result["items_upserted"] == n
    assert result["recall_at_100"] >= 0.9 and result["probe"]["duplicate_ids"] == 0
    assert stages == {"copy", "index", "probe"}

    neighbours = similar(store_settings, "tower", "i00010", 5)
    assert len(neighbours) == 5 and "i00010" not in {n["item_id"] for n in neighbours}
    first = neighbours[0]
    assert set(first) >= {"item_id", "score", "title", "category", "color"}
    i = int(first["item_id"][1:])
    expected = (f"item {i}", CATEGORIES[i % 3], COLORS[i % 3])
    assert (first["title"], first["category"], first["color"]) == expected
    assert len({n["group_id"] for n in neighbours}) == 5  # colourways folded

    with pytest.raises(StoreError, match="unknown item id"):
        similar(store_settings, "tower", "nope", 5)
    with pytest.raises(StoreError, match="unknown model id"):
        similar(store_settings, "other", "i00010", 5)
    with pytest.raises(StoreError, match="dimensions"):
        index_vectors(store_settings, "bad", ["a"], np.ones((1, 2001), dtype=np.float32))
