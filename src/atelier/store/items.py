"""Item rows: the ``items`` columns of an item JSON, bulk and live upserts (with vectors), reads, deletes,
vectors of items, and the catalogue reads the web service runs (many items' JSON in one query, ranked
search, the catalogue's price levels, search hits described).

Ranked search (``rank_items``) fuses ranked lists by reciprocal rank fusion (Cormack et al., SIGIR 2009):
full-text search over ``items.search_doc`` (title A, attribute words B, description C; ``ts_rank_cd``)
and, when the caller gives them, the hits of a vector search for the same query; items the text ranks
alike are told apart by the vector list, then by popularity. A query word the catalogue does not know
("bikni") is replaced by the nearest word it does know ("bikini"), found by trigram overlap and edit
distance over the catalogue's own words (``Lexicon``), since the embedded server has no ``pg_trgm``.

References: https://www.postgresql.org/docs/current/textsearch-controls.html (``ts_rank_cd``, weights);
Cormack, Clarke and Buettcher, "Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning
Methods" (SIGIR 2009).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import sql
from psycopg.types.json import Jsonb

from atelier.schema.item import ItemJSON
from atelier.store.schema import attributes_text, get_model
from atelier.store.search import SearchFilters, as_query, filter_clauses
from atelier.store.server import Pooled, StoreError

log = logging.getLogger("atelier.store")
ITEM_COLUMNS = "item_id, item, title, category, gender, price, in_stock, group_id, attributes_text"


def item_row(item: ItemJSON) -> tuple[Any, ...]:
    """The ``items`` columns of one item JSON (first STD value of each filter field, the attribute words)."""

    def first(name: str) -> str | None:
        values = item.clothes.get(name) or []
        return values[0] if values else None

    service = item.service
    in_stock = None if service.stock is None else service.stock > 0
    doc = item.model_dump(mode="json")
    return (
        item.item_id,
        Jsonb(doc),
        service.title or None,
        first("category"),
        first("gender"),
        service.price,
        in_stock,
        service.group_id,
        attributes_text(doc),
    )


# --- writes -----------------------------------------------------------------------------------

_UPDATE_ALL = ", ".join(f"{c} = EXCLUDED.{c}" for c in ITEM_COLUMNS.split(", ")[1:]) + ", updated_at = now()"


def upsert_items(store: Pooled, items: Sequence[ItemJSON]) -> int:
    """Insert or update item rows (binary COPY into a temp table, then one upsert)."""
    latest = {item.item_id: item for item in items}  # last one wins within a batch
    if not latest:
        return 0
    with store.connection() as conn, conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE items_in (item_id text, item jsonb, title text, category text,"
            " gender text, price double precision, in_stock boolean, group_id text, attributes_text text)"
            " ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY items_in FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "jsonb", "text", "text", "text", "float8", "bool", "text", "text"])
            for item in latest.values():
                copy.write_row(item_row(item))
        conn.execute(
            f"INSERT INTO items ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM items_in"
            f" ON CONFLICT (item_id) DO UPDATE SET {_UPDATE_ALL}"
        )
    # Fresh statistics, or the planner misjudges filter selectivity (e.g. picks an exact scan
    # of "87 rows" of a category that really has thousands) until autovacuum gets round to it.
    with store.connection() as conn:
        conn.execute("ANALYZE items")
    return len(latest)


def upsert_item(
    store: Pooled, item: ItemJSON, model_id: str, vector: Any, also: Mapping[str, Any] | None = None
) -> None:
    """Add or update one item and its vector (and its vectors of the models in ``also``, model id ->
    vector) in one transaction; searchable as soon as this returns."""
    with store.connection() as conn, conn.transaction():
        vectors = []
        for mid, vector_of in {model_id: vector, **(also or {})}.items():
            model = get_model(conn, mid)
            vectors.append((model, as_query(vector_of, model.dim, f"{mid} vector of item {item.item_id!r}")))
        # items before vectors: the same lock order as a bulk load, so the two cannot deadlock
        conn.execute(
            f"INSERT INTO items ({ITEM_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (item_id) DO UPDATE SET {_UPDATE_ALL}",
            item_row(item),
        )
        for model, vec in vectors:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (item_id, embedding) VALUES (%s, %s)"
                    " ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding"
                ).format(sql.Identifier(model.table_name)),
                (item.item_id, vec),
            )


def delete_item(store: Pooled, item_id: str) -> bool:
    """Delete an item and, by cascade, its vectors in every model; False when unknown."""
    with store.connection() as conn:
        cur = conn.execute("DELETE FROM items WHERE item_id = %s", (item_id,))
        return cur.rowcount > 0


# --- reads ------------------------------------------------------------------------------------


def get_item(store: Pooled, item_id: str) -> dict[str, Any] | None:
    """The stored item JSON (None when unknown; ``{}`` for a vector-only placeholder row)."""
    with store.connection() as conn:
        row = conn.execute("SELECT item FROM items WHERE item_id = %s", (item_id,)).fetchone()
    if row is None:
        return None
    return dict(row[0]) if row[0] is not None else {}


def get_vector(store: Pooled, model_id: str, item_id: str) -> np.ndarray:
    """The stored vector of an item under a model, or StoreError."""
    with store.connection() as conn:
        model = get_model(conn, model_id)
        row = conn.execute(
            sql.SQL("SELECT embedding FROM {} WHERE item_id = %s").format(sql.Identifier(model.table_name)),
            (item_id,),
        ).fetchone()
        if row is None:
            known = conn.execute("SELECT 1 FROM items WHERE item_id = %s", (item_id,)).fetchone()
            if known is None:
                raise StoreError(f"unknown item id {item_id!r}")
            raise StoreError(f"item {item_id!r} has no vector under model {model.model_id!r}")
        return np.asarray(row[0].to_numpy(), dtype=np.float32)


def vectors_of(store: Pooled, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Vectors of many items under a model in one query (``get_vector`` would cost a round trip each);
    unknown ids are absent from the result."""
    if not item_ids:
        return {}
    with store.connection() as conn:
        table = get_model(conn, model_id).table_name
    with store.connection() as conn:
        rows = conn.execute(
            sql.SQL("SELECT item_id, embedding FROM {} WHERE item_id = ANY(%s)").format(sql.Identifier(table)),
            (list(item_ids),),
        ).fetchall()
    return {str(r[0]): np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows}


def fetch_items(store: Pooled, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored item JSON of many ids in one query; unknown ids are absent from the result."""
    if not item_ids:
        return {}
    with store.connection() as conn:
        rows = conn.execute("SELECT item_id, item FROM items WHERE item_id = ANY(%s)", (list(item_ids),)).fetchall()
    return {str(r[0]): dict(r[1]) if r[1] is not None else {} for r in rows}


def items_in_group(store: Pooled, group_id: str, limit: int = 50) -> list[tuple[str, dict[str, Any]]]:
    """The items of one colourway group (one product in its colours), by id."""
    with store.connection() as conn:
        rows = conn.execute("SELECT item_id, item FROM items WHERE group_id = %s AND item IS NOT NULL"
                            " ORDER BY item_id LIMIT %s", (group_id, limit)).fetchall()
    return [(str(r[0]), dict(r[1])) for r in rows]


# --- ranked search ----------------------------------------------------------------------------

CATALOGUE_CACHE_S = 300.0  # the lexicon and price levels are re-read this often (a new product's words wait this long)
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.): rank 1 and rank 10 differ by 13%, not 10x
TEXT_WEIGHT = 1.0
# Half weight: a vector search always returns its k nearest, relevant or not, so an item only it found ranks
# after about the 60th text match, while it still orders the items the text ranks alike (all "bikini tops").
VECTOR_WEIGHT = 0.5
FUSE_DEPTH = 300  # text hits that take part in fusion; deeper ones follow in text order, so pages never reshuffle
MAX_QUERY_WORDS = 8
RARE_DOCS, RARE_RATIO = 20, 50  # a known word held by <= 20 items yields to a near word held by 50x as many
PRICE_LEVELS = 5  # quintiles: "price level 3 of 5"
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def _trigrams(word: str) -> set[str]:
    padded = f"  {word} "  # pg_trgm's padding: two blanks before a word, one after
    return {padded[i : i + 3] for i in range(len(padded) - 2)}


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: an insertion, deletion, substitution or swap of neighbours costs 1."""
    before: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], before[j - 2] + 1)
        before, prev = prev, cur
    return prev[-1]


def _wordlike(text: str) -> bool:
    return text.replace("-", "").isalpha()  # letters, or hyphenated letters ("t-shirt")


class Lexicon:
    """The catalogue's words (the stems in its full-text documents, with how many items hold each) and a
    trigram index over them: what a misspelt query word is corrected against."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = dict(counts)
        self._grams: dict[str, list[str]] = {}
        for word in self.counts:
            if len(word) >= 3 and _wordlike(word):
                for gram in _trigrams(word):
                    self._grams.setdefault(gram, []).append(word)

    def __contains__(self, word: object) -> bool:
        return word in self.counts

    def correct(self, stem: str, word: str | None = None) -> str | None:
        """The catalogue word nearest to a stem it lacks, or None. Near: at most 1 edit for up to 5 letters, else
        2, from the ``word`` as typed, or from the stem when it has 5 letters or more (stemming changes a
        misspelling: "jersy" stems to "jersi", 2 edits from "jersey"; "famly" to "famli", 1 from "famili");
        of equals, the word more items hold. Stems under 4 letters are left alone (one edit of "wed", from
        wedding, is a third of it), and a 4-letter stem is judged as typed ("table" stems to "tabl": not "tab").
        A word the catalogue holds is corrected only when it is rare there and a near word is far commoner:
        H&M itself titles a few kids' bikinis "Bikni", and a shopper typing "bikni" wants the 1,500 bikinis."""
        known = self.counts.get(stem, 0)
        if known > RARE_DOCS or len(stem) < 4 or not _wordlike(stem):
            return None
        forms = list(dict.fromkeys([word or stem] + ([stem] if len(stem) >= 5 else [])))
        shared: dict[str, int] = {}
        for gram in set().union(*(_trigrams(form) for form in forms)):
            for other in self._grams.get(gram, ()):
                shared[other] = shared.get(other, 0) + 1
        near = heapq.nlargest(50, shared, key=shared.__getitem__)  # edit distance only for the most trigrams shared
        fits = []
        for candidate in near:
            within = [d for form in forms
                      if abs(len(candidate) - len(form)) <= (limit := 1 if len(form) <= 5 else 2)
                      and (d := edit_distance(form, candidate)) <= limit]
            if within and candidate != stem and self.counts[candidate] >= max(1, RARE_RATIO * known):
                fits.append((min(within), -self.counts[candidate], candidate))
        return min(fits)[2] if fits else None


@dataclass
class CatalogueFacts:
    """What searches and pages read about the whole catalogue, kept in memory for ``CATALOGUE_CACHE_S``."""

    lexicon: Lexicon
    price_cuts: tuple[float, ...]  # the PRICE_LEVELS - 1 inner quantiles of the catalogue's prices
    read_at: float = field(default_factory=time.monotonic)

    def price_level(self, price: float | None) -> int | None:
        """1 (cheapest fifth of the catalogue) .. PRICE_LEVELS (dearest fifth); None without a price."""
        if price is None or not self.price_cuts:
            return None
        return bisect.bisect_right(self.price_cuts, price) + 1


def read_catalogue_facts(store: Pooled) -> CatalogueFacts:
    """The lexicon of the items' documents and their price quantiles, read now."""
    quantiles = [level / PRICE_LEVELS for level in range(1, PRICE_LEVELS)]
    with store.connection() as conn:
        words = conn.execute("SELECT word, ndoc FROM ts_stat('SELECT search_doc FROM items WHERE item IS NOT NULL')")
        lexicon = Lexicon({str(w): int(n) for w, n in words.fetchall()})
        row = conn.execute(
            "SELECT percentile_cont(%s::float8[]) WITHIN GROUP (ORDER BY price) FROM items"
            " WHERE item IS NOT NULL AND price IS NOT NULL",
            (quantiles,),
        ).fetchone()
    return CatalogueFacts(lexicon, tuple(float(c) for c in row[0]) if row and row[0] else ())


_FACTS: weakref.WeakKeyDictionary[Any, CatalogueFacts] = weakref.WeakKeyDictionary()
_REFRESHING: weakref.WeakSet[Any] = weakref.WeakSet()
_FACTS_LOCK = threading.Lock()  # guards the two above
_FIRST_READ = threading.Lock()  # one first read at a time: the others wait for its answer instead of reading too


def catalogue_facts(store: Pooled, max_age_s: float = CATALOGUE_CACHE_S) -> CatalogueFacts:
    """This store's catalogue facts. The first call reads them; once older than ``max_age_s`` they are read
    again in a background thread while callers keep the previous ones (on the whole H&M catalogue the read
    takes seconds, which no request should wait for)."""
    with _FACTS_LOCK:
        facts = _FACTS.get(store)
        if facts is not None and time.monotonic() - facts.read_at > max_age_s and store not in _REFRESHING:
            _REFRESHING.add(store)
            threading.Thread(target=_refresh, args=(store,), name="atelier-catalogue-facts", daemon=True).start()
    if facts is not None:
        return facts
    with _FIRST_READ:
        if (facts := _FACTS.get(store)) is None:
            facts = _FACTS[store] = read_catalogue_facts(store)
        return facts


def _refresh(store: Pooled) -> None:
    try:
        facts = read_catalogue_facts(store)
        with _FACTS_LOCK:
            _FACTS[store] = facts
    except Exception as exc:  # the previous facts keep serving; the next stale call tries again
        log.warning("re-reading the catalogue's lexicon and price levels failed: %s", exc)
    finally:
        with _FACTS_LOCK:
            _REFRESHING.discard(store)


@dataclass(frozen=True)
class TextQuery:
    """A shopper's words as full-text search reads them: their stems, misspelt words corrected."""

    words: tuple[str, ...]
    lexemes: tuple[str, ...]  # stems to match (stop words have none), corrections applied
    corrections: dict[str, str]  # misspelt word -> the catalogue word searched instead

    def tsquery(self, operator: str) -> str:
        """The stems joined by ``&`` or ``|`` in tsquery syntax (quoted, so no stem is read as an operator)."""
        return f" {operator} ".join("'" + x.replace("\\", "\\\\").replace("'", "''") + "'" for x in self.lexemes)


def text_query(store: Pooled, query: str, lexicon: Lexicon) -> TextQuery:
    """The query's words, their English stems (as ``search_doc`` holds them) and corrections of unknown ones."""
    words = _WORD.findall(query.lower())[:MAX_QUERY_WORDS]
    if not words:
        return TextQuery((), (), {})
    with store.connection() as conn:
        rows = conn.execute(
            "SELECT w, tsvector_to_array(to_tsvector('english', w)) FROM unnest(%s::text[]) WITH ORDINALITY AS t(w, n)"
            " ORDER BY n",
            (words,),
        ).fetchall()
    lexemes: list[str] = []
    corrections: dict[str, str] = {}
    for word, stems in rows:
        if len(stems) == 1 and (fix := lexicon.correct(stems[0], word)) is not None:
            corrections[str(word)] = fix
            stems = [fix]
        elif len(stems) > 1:  # a hyphenated word: "t-shirt" stems to t-shirt, t (a stop word) and shirt
            whole = next((x for x in stems if "-" in x), None)
            if whole is not None and (fix := lexicon.correct(whole, word)) is not None:  # "t-shrt"
                corrections[str(word)] = fix
                stems = [fix] + [x for x in fix.split("-") if x in lexicon]
            else:  # unknown as a whole: its parts, each corrected
                parts = []
                for stem in stems:
                    if (fix := lexicon.correct(stem)) is not None:
                        corrections[str(stem)] = fix
                    parts += [fix or stem] if stem.isalpha() or stem in lexicon else []
                stems = parts
        lexemes += [str(x) for x in stems]
    return TextQuery(tuple(words), tuple(dict.fromkeys(lexemes)), corrections)


def _where(filters: SearchFilters, colors: Sequence[str]) -> tuple[list[sql.Composable], dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("i.item IS NOT NULL")]
    more, params = filter_clauses(filters, "i.")
    clauses += more
    if colors:
        clauses.append(sql.SQL("i.item->'clothes'->'color' ?| %(colors)s"))
        params["colors"] = list(colors)
    return clauses, params


def text_hits(
    store: Pooled, query: TextQuery, filters: SearchFilters, colors: Sequence[str] = (), depth: int = FUSE_DEPTH,
    popular: Sequence[str] = (), *, every_word: bool = True,
) -> list[tuple[str, tuple[int, float]]]:
    """Items matching every stem (or, ``every_word=False``, any), best first: ``(item_id, (stems matched,
    ts_rank_cd))``; equal scores in popularity order (``popular``: item ids, most bought first)."""
    if not query.lexemes:
        return []
    clauses, params = _where(filters, colors)
    params.update(q=query.tsquery("&" if every_word else "|"), depth=depth, popular=list(popular))
    params.update({f"stem{n}": TextQuery((), (x,), {}).tsquery("&") for n, x in enumerate(query.lexemes)})
    matched = (sql.Literal(len(query.lexemes)) if every_word else  # how many of the stems each item holds
               sql.SQL(" + ").join(sql.SQL("(i.search_doc @@ {}::tsquery)::int").format(sql.Placeholder(f"stem{n}"))
                                   for n in range(len(query.lexemes))))
    statement = sql.SQL(
        "SELECT i.item_id, {matched} AS matched, ts_rank_cd(i.search_doc, %(q)s::tsquery) AS rank FROM items i"
        " LEFT JOIN unnest(%(popular)s::text[]) WITH ORDINALITY AS p(item_id, pop) ON p.item_id = i.item_id"
        " WHERE i.search_doc @@ %(q)s::tsquery AND {where}"
        " ORDER BY matched DESC, rank DESC, p.pop NULLS LAST, i.item_id LIMIT %(depth)s"
    ).format(matched=matched, where=sql.SQL(" AND ").join(clauses))
    with store.connection() as conn:
        rows = conn.execute(statement, params).fetchall()
    return [(str(r[0]), (int(r[1]), float(r[2]))) for r in rows]


def rrf(ranked: Sequence[tuple[str, Any]], weight: float, depth: int | None = None) -> dict[str, float]:
    """Each item's reciprocal-rank-fusion share from one list (best first); equal scores share a rank."""
    out: dict[str, float] = {}
    rank, last = 0, object()
    for position, (item_id, score) in enumerate(ranked[:depth]):
        if score != last:
            rank, last = position + 1, score
        out[item_id] = weight / (RRF_K + rank)
    return out


@dataclass
class RankedPage:
    """One page of a ranked search and what ranked it."""

    rows: list[tuple[str, dict[str, Any]]]  # (item_id, item JSON), best first
    more: bool  # there is a next page
    ranked_by: list[str]  # the lists fused: "text: all words" or "text: most words", the vector list, "popularity"
    corrections: dict[str, str]  # misspelt word -> the word searched instead


def rank_items(
    store: Pooled, query: str, filters: SearchFilters, colors: Sequence[str] = (), limit: int = 24, offset: int = 0,
    *, vector_hits: Sequence[tuple[str, float]] | None = None, vector_name: str = "vector",
    popular: Sequence[str] = (),
) -> RankedPage:
    """Full-text hits fused with ``vector_hits`` (the caller's vector search for the same query and filters,
    best first; None: text only, and ``ranked_by`` says so) by reciprocal rank fusion, popularity breaking ties."""
    facts = catalogue_facts(store)
    parsed = text_query(store, query, facts.lexicon)
    depth = max(FUSE_DEPTH, offset + limit + 1)
    hits = text_hits(store, parsed, filters, colors, depth, popular)
    mode = "text: all words"
    if not hits and len(parsed.lexemes) > 1:  # no item has every word: the items with the most of them
        hits, mode = text_hits(store, parsed, filters, colors, depth, popular, every_word=False), "text: most words"
    vectors = list(vector_hits or [])
    if vectors and colors:  # the vector search knows the SQL filters, not the colours
        clauses, params = _where(SearchFilters(), colors)
        statement = sql.SQL("SELECT i.item_id FROM items i WHERE i.item_id = ANY(%(ids)s) AND {}").format(
            sql.SQL(" AND ").join(clauses))
        with store.connection() as conn:
            keep = {r[0] for r in conn.execute(statement, {**params, "ids": [i for i, _ in vectors]}).fetchall()}
        vectors = [(i, s) for i, s in vectors if i in keep]
    score = rrf(hits, TEXT_WEIGHT, FUSE_DEPTH)
    for item_id, share in rrf(vectors, VECTOR_WEIGHT).items():
        score[item_id] = score.get(item_id, 0.0) + share
    text_rank = {item_id: n for n, (item_id, _) in enumerate(hits)}
    pop_rank = {item_id: n for n, item_id in enumerate(popular)}
    ranked = sorted(dict.fromkeys([i for i, _ in hits] + [i for i, _ in vectors]),
                    key=lambda i: (-score.get(i, 0.0), text_rank.get(i, len(hits)), pop_rank.get(i, len(pop_rank)), i))
    page = ranked[offset : offset + limit + 1]
    docs = fetch_items(store, page)
    ranked_by = ([mode] if parsed.lexemes else []) + ([vector_name] if vector_hits is not None else [])
    return RankedPage([(i, docs[i]) for i in page[:limit] if i in docs], len(page) > limit,
                      ranked_by + (["popularity"] if popular else []), parsed.corrections)


def search_items(
    store: Pooled, query: str, filters: SearchFilters, colors: Sequence[str] = (),
    limit: int = 24, offset: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """Items passing the filters, newest first; with a query, ``rank_items`` by text alone."""
    if query.strip():
        return rank_items(store, query, filters, colors, limit, offset).rows
    clauses, params = _where(filters, colors)
    statement = sql.SQL(
        "SELECT i.item_id, i.item FROM items i WHERE {where} ORDER BY i.updated_at DESC, i.item_id"
        " LIMIT %(limit)s OFFSET %(offset)s"
    ).format(where=sql.SQL(" AND ").join(clauses))
    with store.connection() as conn:
        rows = conn.execute(statement, {**params, "limit": limit, "offset": offset}).fetchall()
    return [(str(r[0]), dict(r[1])) for r in rows]


def describe_hits(store: Pooled, hits: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """Search hits with their title, category, colour, gender, price and group from the items table."""
    with store.connection() as conn:
        rows = conn.execute(
            "SELECT item_id, item, title, category, gender, price, group_id FROM items WHERE item_id = ANY(%s)",
            ([hit for hit, _ in hits],),
        ).fetchall()
    by_id = {row[0]: row for row in rows}
    out = []
    for hit_id, score in hits:
        row = by_id.get(hit_id)
        item = (row[1] if row else None) or {}
        colors = item.get("clothes", {}).get("color") or [None]
        out.append(
            {
                "item_id": hit_id,
                "score": score,
                "title": row[2] if row else None,
                "category": row[3] if row else None,
                "color": colors[0],
                "gender": row[4] if row else None,
                "price": row[5] if row else None,
                "group_id": row[6] if row else None,
            }
        )
    return out
