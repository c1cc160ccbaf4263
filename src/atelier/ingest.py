"""Readers for the real catalogues and interaction logs, normalised to Parquet with a manifest.

Every dataset becomes the same four tables under ``<run_dir>/data/<name>/``:

- ``items.parquet``: ``item_id, title, description, group_id, price`` + the source's own columns; ``price``
  is the catalogue's own (empty for H&M, whose prices live on the transactions: ``datasets.catalogue_as_of``
  derives them from a training window, so no price comes from days a model must not see)
- ``interactions.parquet``: ``user_id, item_id, ts`` (+ dataset extras: price, rating, fit, occasion, and the
  renter's stated profile on RentTheRunway)
- ``users.parquet``: ``user_id`` + profile fields that exist (``height_cm, weight_kg, age, body_type``)
- ``rejects.parquet``: ``source, line, reason, raw``: every row that could not be read, with why

``manifest.json`` records the source files (SHA-256, size), row counts, reject counts by reason
and timings. A second ingest of unchanged sources is a no-op; outputs are written to a temporary
folder and swapped in whole, so an interrupted ingest never leaves a half-written dataset.

Sources: H&M Personalized Fashion Recommendations (Kaggle 2022), RentTheRunway (Misra, Wan and
McAuley, RecSys 2018), Myntra product styles, and any CSV/JSONL catalogue described by a
column-mapping TOML file (see ``read_custom``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from atelier.schema import read_toml

INGEST_FORMAT = 2  # bump when the output tables change shape: cached ingests are then redone
# Body-profile columns a log's rows may carry (each rental states them): ``datasets.users_as_of`` derives
# the profile known at a cut from them.
PROFILE_COLUMNS = ("height_cm", "weight_kg", "age", "body_type", "bust_size_num", "bust_size_letter")
DATASETS = ("hm", "rtr", "myntra")

# Plausible adult profile ranges; values outside become missing (and are counted), not rejects:
# RentTheRunway has ages of 0 and 116 and a few impossible heights.
PROFILE_RANGES = {"height_cm": (120.0, 220.0), "weight_kg": (30.0, 250.0), "age": (13.0, 100.0)}
RAW_PREVIEW_CHARS = 200

StepCallback = Callable[[str], None]


class IngestError(RuntimeError):
    """A source cannot be ingested at all (missing, empty, wrong columns, not UTF-8)."""


@dataclass
class Tables:
    """The normalised tables of one dataset plus the rows that could not be read."""

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    rejects: pd.DataFrame
    sources: list[Path]
    notes: dict[str, int] = field(default_factory=dict)  # cleaned values, not rejects


@dataclass
class IngestResult:
    """What an ingest wrote (or found already written) and how long it took."""

    dataset: str
    out_dir: Path
    counts: dict[str, int]
    rejects: dict[str, int]
    notes: dict[str, int]
    seconds: float
    cached: bool


# --------------------------------------------------------------------------- CSV reading


def _open_text_head(path: Path, encoding: str = "utf-8") -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            head = fh.readline()
    except (OSError, EOFError) as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None
    try:
        return head.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise IngestError(f"{path}: cannot read the header row as {encoding}: {exc}") from None


def read_csv_strings(
    path: Path, required: Iterable[str], rejects: list[dict[str, object]], encoding: str = "utf8"
) -> pd.DataFrame:
    """Read a CSV (optionally .gz) with every column as text; malformed rows go to ``rejects``.

    Raises IngestError for a missing or empty file, missing required columns, or bad encoding.
    """
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    if path.stat().st_size == 0 or not _open_text_head(path, encoding).strip():
        raise IngestError(f"{path}: file is empty (expected a header row)")
    header = _header(path, encoding)
    missing = [c for c in required if c not in header]
    if missing:
        raise IngestError(f"{path}: missing required columns {missing}; found {header}")

    def on_bad_row(row: pacsv.InvalidRow) -> str:
        rejects.append({
            "source": path.name,
            "line": int(row.number) if row.number is not None else -1,
            "reason": f"malformed row: expected {row.expected_columns} fields, got {row.actual_columns}",
            "raw": (row.text or "")[:RAW_PREVIEW_CHARS],
        })
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            # Threads off: row numbers of malformed rows are only known single-threaded.
            read_options=pacsv.ReadOptions(encoding=encoding, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_bad_row, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header}, strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        if "UTF8" in str(exc) or "UTF-8" in str(exc):
            raise IngestError(
                f"{path}: not valid {encoding} text ({exc}); re-save it as UTF-8 or pass its encoding"
            ) from None
        raise IngestError(f"{path}: cannot parse CSV: {exc}") from None
    frame = table.to_pandas()
    frame.columns = [c.strip() for c in frame.columns]
    # Physical line of each kept row (header = line 1), for reject reports after validation.
    frame["_line"] = np.arange(2, len(frame) + 2)
    return frame


def _header(path: Path, encoding: str) -> list[str]:
    line = _open_text_head(path, encoding).lstrip("\ufeff")
    return [c.strip() for c in next(csv.reader([line]))]


def _reject_rows(
    frame: pd.DataFrame, bad: pd.Series, reason: str, source: str, rejects: list[dict[str, object]]
) -> pd.DataFrame:
    """Move the rows where ``bad`` is true into ``rejects`` and return the rest."""
    if not bad.any():
        return frame
    dropped = frame[bad]
    cells = dropped.drop(columns=["_line"]).astype(object).to_numpy()
    rejects.extend(
        {"source": source, "line": int(line), "reason": reason,
         "raw": ",".join("" if pd.isna(v) else str(v) for v in row)[:RAW_PREVIEW_CHARS]}
        for line, row in zip(dropped["_line"], cells, strict=True)
    )
    return frame[~bad]


def _blank(series: pd.Series) -> pd.Series:
    return series.isna() | (series.astype("string").str.strip() == "")


def _rejects_frame(rejects: list[dict[str, object]]) -> pd.DataFrame:
    columns = {"source": "string", "line": "int64", "reason": "string", "raw": "string"}
    frame = pd.DataFrame(rejects, columns=list(columns))
    return frame.astype(columns)


def _clean_range(frame: pd.DataFrame, column: str, notes: dict[str, int]) -> None:
    """Set values outside the plausible range to missing and count them."""
    lo, hi = PROFILE_RANGES[column]
    out = frame[column].notna() & ~frame[column].between(lo, hi)
    if out.any():
        notes[f"{column} out of range [{lo:g}, {hi:g}] set to missing"] = int(out.sum())
        frame.loc[out, column] = np.nan


# --------------------------------------------------------------------------- H&M

HM_ARTICLE_COLUMNS = (
    "article_id", "product_code", "prod_name", "product_type_name", "product_group_name",
    "graphical_appearance_name", "colour_group_name", "perceived_colour_value_name",
    "perceived_colour_master_name", "department_name", "index_name", "index_group_name",
    "section_name", "garment_group_name", "detail_desc",
)
HM_TRANSACTION_COLUMNS = ("t_dat", "customer_id", "article_id", "price", "sales_channel_id")


def read_hm(folder: Path) -> Tables:
    """H&M: ``articles.csv.gz`` (catalogue) and ``transactions.csv.gz`` (purchases)."""
    rejects: list[dict[str, object]] = []
    art_path, tx_path = folder / "articles.csv.gz", folder / "transactions.csv.gz"
    art = read_csv_strings(art_path, HM_ARTICLE_COLUMNS, rejects)
    art["article_id"] = art["article_id"].str.strip()
    art = _reject_rows(art, ~art["article_id"].str.fullmatch(r"\d{10}").fillna(False),
                       "article_id is not a 10-digit id", art_path.name, rejects)
    art = _reject_rows(art, art["article_id"].duplicated(), "duplicate article_id", art_path.name, rejects)

    tx = _hm_transactions(tx_path, art["article_id"], rejects)

    items = art.drop(columns=["_line"]).rename(columns={"article_id": "item_id"})
    items.insert(1, "title", items["prod_name"].fillna(""))
    items.insert(2, "description", items["detail_desc"].fillna(""))
    items.insert(3, "group_id", items["product_code"])
    # The catalogue has no price column; prices live on the transactions (see datasets.catalogue_as_of).
    items.insert(4, "price", np.nan)
    interactions = tx
    users = (interactions.groupby("user_id", sort=True).size().rename("n_interactions")
             .reset_index())
    return Tables(items.reset_index(drop=True), interactions, users, _rejects_frame(rejects),
                  [art_path, tx_path])


# --------------------------------------------------------------------------- RentTheRunway

def _hm_transactions(path: Path, known_items: pd.Series, rejects: list[dict[str, object]]) -> pd.DataFrame:
    """H&M purchases in the Kaggle ``transactions_train.csv`` format, validated row by row."""
    tx = read_csv_strings(path, HM_TRANSACTION_COLUMNS, rejects)
    tx["article_id"] = tx["article_id"].str.strip()
    tx["ts"] = pd.to_datetime(tx["t_dat"], format="%Y-%m-%d", errors="coerce")
    tx["price"] = pd.to_numeric(tx["price"], errors="coerce")
    tx["sales_channel_id"] = pd.to_numeric(tx["sales_channel_id"], errors="coerce").astype("Int8")
    tx = _reject_rows(tx, tx["ts"].isna(), "t_dat is not a YYYY-MM-DD date", path.name, rejects)
    tx = _reject_rows(tx, _blank(tx["customer_id"]), "customer_id is empty", path.name, rejects)
    tx = _reject_rows(tx, tx["price"].isna() | (tx["price"] < 0), "price is not a non-negative number",
                      path.name, rejects)
    tx = _reject_rows(tx, ~tx["article_id"].isin(known_items), "article_id not in the catalogue",
                      path.name, rejects)
    return pd.DataFrame({
        "user_id": tx["customer_id"].str.strip().astype("string"),
        "item_id": tx["article_id"].astype("string"),
        "ts": tx["ts"],
        "price": tx["price"].astype("float64"),
        "sales_channel_id": tx["sales_channel_id"],
    }).reset_index(drop=True)


RTR_COLUMNS = ("user_id", "item_id", "rating", "fit", "rented_for", "body_type", "category", "size",
               "age", "height_in", "weight_lbs", "review_date")
LB_TO_KG, IN_TO_CM = 0.45359237, 2.54


def _rtr_rentals(path: Path, rejects: list[dict[str, object]], notes: dict[str, int]) -> pd.DataFrame:
    """Rentals validated, profile units made metric, implausible values cleared; oldest first."""
    raw = read_csv_strings(path, RTR_COLUMNS, rejects)
    raw["ts"] = pd.to_datetime(raw["review_date"], format="%Y-%m-%d", errors="coerce")
    raw = _reject_rows(raw, raw["ts"].isna(), "review_date is not a YYYY-MM-DD date", path.name, rejects)
    raw = _reject_rows(raw, _blank(raw["user_id"]) | _blank(raw["item_id"]), "user_id or item_id is empty",
                       path.name, rejects)
    num = {c: pd.to_numeric(raw[c], errors="coerce") for c in ("rating", "size", "age", "height_in", "weight_lbs")}
    raw = raw.assign(
        rating=num["rating"], size=num["size"], age=num["age"],
        height_cm=num["height_in"] * IN_TO_CM, weight_kg=num["weight_lbs"] * LB_TO_KG,
    )
    for column in ("height_cm", "weight_kg", "age"):
        _clean_range(raw, column, notes)
    return raw.sort_values(["ts", "_line"], kind="stable").reset_index(drop=True)


def _rtr_interactions(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per rental with the profile the renter stated on it (``PROFILE_COLUMNS``)."""
    frame = pd.DataFrame({
        "user_id": raw["user_id"].str.strip().astype("string"),
        "item_id": raw["item_id"].str.strip().astype("string"),
        "ts": raw["ts"],
        "rating": raw["rating"].astype("float64"),
        "fit": raw["fit"].astype("string"),
        "occasion": raw["rented_for"].astype("string"),
        "size": raw["size"].astype("float64"),
        "category": raw["category"].astype("string"),
        "height_cm": raw["height_cm"].astype("float64"),
        "weight_kg": raw["weight_kg"].astype("float64"),
        "age": raw["age"].astype("float64"),
        "body_type": raw["body_type"].astype("string"),
    })
    if "bust_size_num" in raw.columns:
        frame["bust_size_num"] = pd.to_numeric(raw["bust_size_num"], errors="coerce")
    if "bust_size_letter" in raw.columns:
        frame["bust_size_letter"] = raw["bust_size_letter"].astype("string")
    return frame.reset_index(drop=True)


def read_rtr(folder: Path) -> Tables:
    """RentTheRunway: ``rentals.csv.gz``, one row per reviewed rental with the renter's profile."""
    rejects: list[dict[str, object]] = []
    path = folder / "rentals.csv.gz"
    notes: dict[str, int] = {}
    raw = _rtr_rentals(path, rejects, notes)
    interactions = _rtr_interactions(raw)
    # Profile = the latest known value of each field over the whole log (people's weight changes between
    # rentals): what a server knows today. Models see the profile as of their cut (datasets.users_as_of).
    present = [c for c in PROFILE_COLUMNS if c in interactions.columns]
    users = interactions.groupby("user_id", sort=True)[present].last().reset_index()
    users["n_interactions"] = users["user_id"].map(interactions["user_id"].value_counts()).astype("int64")
    # RTR items have no catalogue: only the category their renters gave (the most common one).
    cat = interactions.groupby("item_id")["category"].agg(lambda s: s.mode().iat[0] if s.notna().any() else "")
    items = pd.DataFrame({"item_id": cat.index.astype("string"), "title": cat.to_numpy(), "description": "",
                          "group_id": cat.index.astype("string"), "price": np.nan, "category": cat.to_numpy()})
    return Tables(items, interactions, users, _rejects_frame(rejects), [path], notes)


# --------------------------------------------------------------------------- Myntra

MYNTRA_COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season",
                  "year", "usage", "productDisplayName")


def read_myntra(folder: Path) -> Tables:
    """Myntra styles: product titles with labels (a catalogue without interactions)."""
    rejects: list[dict[str, object]] = []
    path = folder / "styles.csv"
    raw = read_csv_strings(path, MYNTRA_COLUMNS, rejects)
    raw["id"] = raw["id"].str.strip()
    raw = _reject_rows(raw, _blank(raw["id"]), "id is empty", path.name, rejects)
    raw = _reject_rows(raw, raw["id"].duplicated(), "duplicate id", path.name, rejects)
    raw = _reject_rows(raw, _blank(raw["productDisplayName"]), "productDisplayName is empty", path.name, rejects)
    items = raw.drop(columns=["_line"]).rename(columns={"id": "item_id"})
    items.insert(1, "title", items["productDisplayName"])
    items.insert(2, "description", "")
    items.insert(3, "group_id", items["item_id"])
    items.insert(4, "price", np.nan)
    return Tables(items.reset_index(drop=True), _empty_interactions(), _empty_users(),
                  _rejects_frame(rejects), [path])


def _empty_interactions() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype="string"), "item_id": pd.Series(dtype="string"),
                         "ts": pd.Series(dtype="datetime64[ns]")})


def _empty_users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype="string"), "n_interactions": pd.Series(dtype="int64")})


# --------------------------------------------------------------------------- custom catalogues


def _read_jsonl(path: Path, rejects: list[dict[str, object]]) -> pd.DataFrame:
    records: list[dict[str, object]] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not valid UTF-8 text ({exc}); re-save it as UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.append({"source": path.name, "line": number, "reason": f"invalid JSON: {exc.msg}",
                            "raw": line[:RAW_PREVIEW_CHARS]})
            continue
        if not isinstance(record, dict):
            rejects.append({"source": path.name, "line": number, "reason": "line is not a JSON object",
                            "raw": line[:RAW_PREVIEW_CHARS]})
            continue
        records.append({k: None if v is None else str(v) for k, v in record.items()})
        lines.append(number)
    if not records and not rejects:
        raise IngestError(f"{path}: file is empty")
    frame = pd.DataFrame.from_records(records).astype("string")
    frame["_line"] = lines
    return frame


def _read_table(path: Path, required: list[str], rejects: list[dict[str, object]]) -> pd.DataFrame:
    if path.suffix in {".jsonl", ".ndjson"} or path.name.endswith((".jsonl.gz",)):
        if not path.is_file():
            raise IngestError(f"{path}: file not found")
        frame = _read_jsonl(path, rejects)
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise IngestError(f"{path}: missing required fields {missing}; found {list(frame.columns)}")
        return frame
    return read_csv_strings(path, required, rejects)


def read_custom(mapping_file: Path) -> Tables:
    """Any CSV/JSONL catalogue (and optional interactions) described by a column-mapping TOML file.

    The file names the source files (relative to itself) and which column plays which part::

        name = "myshop"
        [items]
        path = "products.csv"          # or .jsonl
        item_id = "sku"                # required
        title = "name"                 # optional: description, group_id, price
        [interactions]                 # optional
        path = "orders.csv"
        user_id = "customer"
        item_id = "sku"
        timestamp = "ordered_at"
    """
    spec = read_toml(mapping_file, IngestError, "mapping file")
    items_spec = spec.get("items")
    if not isinstance(items_spec, dict) or "path" not in items_spec or "item_id" not in items_spec:
        raise IngestError(f"{mapping_file}: needs an [items] table with 'path' and 'item_id'")
    rejects: list[dict[str, object]] = []
    base = mapping_file.parent
    item_path = base / str(items_spec["path"])
    roles = {role: str(items_spec[role]) for role in ("item_id", "title", "description", "group_id", "price")
             if role in items_spec}
    raw = _read_table(item_path, list(roles.values()), rejects)
    id_col = roles["item_id"]
    raw[id_col] = raw[id_col].str.strip()
    raw = _reject_rows(raw, _blank(raw[id_col]), f"{id_col} (item_id) is empty", item_path.name, rejects)
    raw = _reject_rows(raw, raw[id_col].duplicated(), f"duplicate {id_col} (item_id)", item_path.name, rejects)
    items = pd.DataFrame({
        "item_id": raw[id_col].astype("string"),
        "title": raw[roles["title"]].fillna("") if "title" in roles else "",
        "description": raw[roles["description"]].fillna("") if "description" in roles else "",
        "group_id": raw[roles["group_id"]] if "group_id" in roles else raw[id_col],
        "price": pd.to_numeric(raw[roles["price"]], errors="coerce") if "price" in roles else np.nan,
    })
    # Source columns ride along, except where they would shadow a canonical column.
    extra = raw.drop(columns=[c for c in [*roles.values(), *items.columns, "_line"] if c in raw.columns])
    items = pd.concat([items, extra], axis=1).reset_index(drop=True)
    sources = [item_path]

    interactions, users = _empty_interactions(), _empty_users()
    inter_spec = spec.get("interactions")
    if isinstance(inter_spec, dict):
        need = ("path", "user_id", "item_id", "timestamp")
        if any(k not in inter_spec for k in need):
            raise IngestError(f"{mapping_file}: [interactions] needs {list(need)}")
        inter_path = base / str(inter_spec["path"])
        cols = {r: str(inter_spec[r]) for r in ("user_id", "item_id", "timestamp")}
        tx = _read_table(inter_path, list(cols.values()), rejects)
        tx["ts"] = pd.to_datetime(tx[cols["timestamp"]], errors="coerce", format="mixed")
        tx = _reject_rows(tx, tx["ts"].isna(), f"{cols['timestamp']} is not a date", inter_path.name, rejects)
        tx = _reject_rows(tx, _blank(tx[cols["user_id"]]), f"{cols['user_id']} is empty", inter_path.name, rejects)
        tx = _reject_rows(tx, ~tx[cols["item_id"]].str.strip().isin(items["item_id"]),
                          "item_id not in the catalogue", inter_path.name, rejects)
        interactions = pd.DataFrame({"user_id": tx[cols["user_id"]].str.strip().astype("string"),
                                     "item_id": tx[cols["item_id"]].str.strip().astype("string"),
                                     "ts": tx["ts"]}).reset_index(drop=True)
        users = interactions.groupby("user_id").size().rename("n_interactions").reset_index()
        sources.append(inter_path)
    return Tables(items, interactions, users, _rejects_frame(rejects), sources)


def read_interactions_file(dataset: str, path: Path, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interactions from a file in the dataset's own format (``--test-file``) and its rejects."""
    rejects: list[dict[str, object]] = []
    if dataset == "hm":
        frame = _hm_transactions(path, items["item_id"], rejects)
    elif dataset == "rtr":
        frame = _rtr_interactions(_rtr_rentals(path, rejects, {}))
    else:
        raise IngestError(f"--test-file is supported for hm and rtr, not {dataset!r}")
    return frame, _rejects_frame(rejects)


# --------------------------------------------------------------------------- orchestration

READERS: dict[str, Callable[[Path], Tables]] = {"hm": read_hm, "rtr": read_rtr, "myntra": read_myntra}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(paths: Iterable[Path]) -> list[dict[str, object]]:
    return [{"path": str(p.resolve()), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in paths]


def load_manifest(out_dir: Path) -> dict[str, object] | None:
    """The manifest of an ingested dataset, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((out_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _source_paths(dataset: str, source: Path) -> list[Path]:
    if dataset == "custom":
        return [source]
    names = {"hm": ["articles.csv.gz", "transactions.csv.gz"], "rtr": ["rentals.csv.gz"],
             "myntra": ["styles.csv"]}[dataset]
    return [source / n for n in names]


def ingest(
    dataset: str,
    source: Path,
    out_root: Path,
    *,
    force: bool = False,
    on_step: StepCallback | None = None,
) -> IngestResult:
    """Read one dataset from ``source`` and write its normalised tables under ``out_root/<name>``.

    ``dataset`` is ``hm``, ``rtr``, ``myntra`` (``source`` = the dataset's folder) or ``custom``
    (``source`` = a column-mapping TOML file). Unchanged sources are not read again unless ``force``.
    """
    step = on_step or (lambda _msg: None)
    if dataset not in (*DATASETS, "custom"):
        raise IngestError(f"unknown dataset {dataset!r}; choose one of {[*DATASETS, 'custom']}")
    started = time.perf_counter()
    name = dataset
    if dataset == "custom":
        name = str(read_toml(source, IngestError, "mapping file").get("name", source.stem))
    elif not source.is_dir():
        raise IngestError(f"{source}: dataset folder not found (set ATELIER_DATA_DIR or --data-dir)")
    out_dir = out_root / name

    step("hashing sources")
    paths = _source_paths(dataset, source)
    for p in paths:
        if not p.is_file():
            raise IngestError(f"{p}: file not found")
    fingerprint = _source_record(paths)
    manifest = load_manifest(out_dir)
    if (not force and manifest is not None and manifest.get("format") == INGEST_FORMAT
            and dataset != "custom" and manifest.get("sources") == fingerprint
            and all((out_dir / f"{t}.parquet").is_file() for t in ("items", "interactions", "users", "rejects"))):
        return IngestResult(name, out_dir, dict(manifest["counts"]), dict(manifest["rejects"]),  # type: ignore[call-overload]
                            dict(manifest.get("notes", {})), time.perf_counter() - started, cached=True)  # type: ignore[call-overload]

    step(f"reading {name}")
    tables = read_custom(source) if dataset == "custom" else READERS[dataset](source)
    if dataset == "custom":
        fingerprint = _source_record(tables.sources) + fingerprint

    step(f"writing {name}")
    counts = {"items": len(tables.items), "interactions": len(tables.interactions),
              "users": len(tables.users), "rejected_rows": len(tables.rejects)}
    reject_counts = {str(k): int(v) for k, v in tables.rejects["reason"].value_counts().items()}
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{name}.tmp-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        tables.items.to_parquet(tmp / "items.parquet", index=False)
        tables.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        tables.users.to_parquet(tmp / "users.parquet", index=False)
        tables.rejects.to_parquet(tmp / "rejects.parquet", index=False)
        seconds = time.perf_counter() - started
        record = {
            "dataset": name, "format": INGEST_FORMAT, "sources": fingerprint, "counts": counts,
            "rejects": reject_counts, "notes": tables.notes, "seconds": round(seconds, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(record, indent=2))
        # Swap the whole folder: readers see either the old dataset or the new one, never a mix.
        old = out_root / f".{name}.old-{int(time.time() * 1000)}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IngestResult(name, out_dir, counts, reject_counts, tables.notes, seconds, cached=False)


def load_tables(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Items, interactions and users of an ingested dataset (IngestError if it was never ingested)."""
    if load_manifest(out_dir) is None:
        raise IngestError(f"{out_dir}: no ingested dataset here; run `atelier ingest` first")
    items, interactions, users = (pd.read_parquet(out_dir / f"{t}.parquet") for t in ("items", "interactions", "users"))
    return items, interactions, users


def result_dict(result: IngestResult) -> dict[str, object]:
    """A JSON-friendly view of an ingest result."""
    out = asdict(result)
    out["out_dir"] = str(result.out_dir)
    return out
