from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from atelier.ingest import IngestError, ingest, load_tables, read_csv_strings, read_hm, read_rtr
from tests.helpers import write_head


def test_hm_slice_is_normalised(hm_slice: Path) -> None:
    tables = read_hm(hm_slice)
    assert len(tables.items) == 3000
    first = tables.items.iloc[0]
    # Leading zeros survive: article ids are text, never integers.
    assert first["item_id"] == "0108775015"
    assert first["title"] == "Strap top"
    assert first["group_id"] == "0108775"[1:] or first["group_id"] == "108775"
    assert {"user_id", "item_id", "ts", "price"} <= set(tables.interactions.columns)
    # Transactions of articles outside the 3,000-article slice are rejected with a reason, not dropped.
    n_tx = len(tables.interactions) + len(tables.rejects)
    assert n_tx == 5000
    assert set(tables.rejects["reason"]) <= {"article_id not in the catalogue"}
    assert tables.interactions["item_id"].isin(tables.items["item_id"]).all()


def test_ingest_writes_manifest_and_is_idempotent(hm_slice: Path, tmp_path: Path) -> None:
    first = ingest("hm", hm_slice, tmp_path / "out")
    assert not first.cached
    manifest = json.loads((first.out_dir / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 3000
    assert len(manifest["sources"]) == 2 and all(len(s["sha256"]) == 64 for s in manifest["sources"])
    again = ingest("hm", hm_slice, tmp_path / "out")
    assert again.cached and again.counts == first.counts
    items, inter, users = load_tables(first.out_dir)
    assert len(items) == 3000 and len(users) == inter["user_id"].nunique()
    forced = ingest("hm", hm_slice, tmp_path / "out", force=True)
    assert not forced.cached
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hm"]  # no temp folders left behind


def test_changed_source_is_reingested(hm_slice: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hm"
    write_head(hm_slice / "articles.csv.gz", folder / "articles.csv.gz", 100)
    write_head(hm_slice / "transactions.csv.gz", folder / "transactions.csv.gz", 100)
    assert ingest("hm", folder, tmp_path / "out").counts["items"] == 100
    write_head(hm_slice / "articles.csv.gz", folder / "articles.csv.gz", 200)
    result = ingest("hm", folder, tmp_path / "out")
    assert not result.cached and result.counts["items"] == 200


def test_rtr_profiles_are_metric_and_cleaned(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "rtr"
    write_head(data_dir / "rtr" / "rentals.csv.gz", folder / "rentals.csv.gz", 3000)
    tables = read_rtr(folder)
    users = tables.users.set_index("user_id")
    # First real row: user 119679, height 68 in -> 172.72 cm.
    assert users.loc["119679", "height_cm"] == pytest.approx(68 * 2.54)
    assert users["age"].dropna().between(13, 100).all()
    assert {"occasion", "rating", "fit"} <= set(tables.interactions.columns)
    assert tables.interactions["ts"].is_monotonic_increasing
    assert set(tables.items["item_id"]) == set(tables.interactions["item_id"])


def test_myntra_reads_labels(data_dir: Path) -> None:
    from atelier.ingest import read_myntra

    tables = read_myntra(data_dir / "myntra")
    assert len(tables.items) + len(tables.rejects) == 27144
    assert {"articleType", "baseColour", "gender", "season", "usage"} <= set(tables.items.columns)
    assert tables.interactions.empty


# ---- bad input: a clear error or a reported skip, never a bare traceback


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_missing_columns_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", b"article_id,prod_name\n0108775015,Strap top\n")
    with pytest.raises(IngestError, match=r"missing required columns \['product_code'"):
        read_csv_strings(path, ["article_id", "product_code"], [])


def test_malformed_row_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", b"a,b\n1,2\n3,4,5\n6,7\n")
    rejects: list[dict[str, object]] = []
    frame = read_csv_strings(path, ["a", "b"], rejects)
    assert list(frame["a"]) == ["1", "6"]
    assert len(rejects) == 1 and rejects[0]["line"] == 3 and "expected 2 fields, got 3" in str(rejects[0]["reason"])


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="empty"):
        read_csv_strings(_write(tmp_path / "a.csv", b""), ["a"], [])


def test_non_utf8_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "a,b\nCaf\xe9,2\n".encode("latin-1"))
    with pytest.raises(IngestError, match="not valid utf8 text"):
        read_csv_strings(path, ["a", "b"], [])
    frame = read_csv_strings(path, ["a", "b"], [], encoding="latin-1")
    assert frame["a"].iloc[0] == "Café"


def test_missing_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="file not found"):
        read_csv_strings(tmp_path / "nope.csv", ["a"], [])
    with pytest.raises(IngestError, match="unknown dataset"):
        ingest("amazon", tmp_path, tmp_path / "out")
    with pytest.raises(IngestError, match="dataset folder not found"):
        ingest("hm", tmp_path / "missing", tmp_path / "out")


def test_bad_values_are_rejected_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "hm"
    header = ("article_id,product_code,prod_name,product_type_name,product_group_name,graphical_appearance_name,"
              "colour_group_name,perceived_colour_value_name,perceived_colour_master_name,department_name,"
              "index_name,index_group_name,section_name,garment_group_name,detail_desc\n")
    row = ",108775,Strap top,Vest top,Garment Upper body,Solid,Black,Dark,Black,Jersey,Ladieswear,Ladieswear,S,J,desc\n"
    _write(folder / "articles.csv.gz", (header + "0108775015" + row + "12345" + row + "0108775015" + row).encode())
    _write(folder / "transactions.csv.gz", (
        b"t_dat,customer_id,article_id,price,sales_channel_id\n"
        b"2020-09-16,c1,0108775015,0.05,2\n"
        b"not-a-date,c1,0108775015,0.05,2\n"
        b"2020-09-16,,0108775015,0.05,2\n"
        b"2020-09-16,c2,0108775015,-1,2\n"
        b"2020-09-16,c2,0999999999,0.05,2\n"
    ))
    result = ingest("hm", folder, tmp_path / "out")
    assert result.counts["items"] == 1 and result.counts["interactions"] == 1
    assert result.rejects == {
        "article_id is not a 10-digit id": 1, "duplicate article_id": 1,
        "t_dat is not a YYYY-MM-DD date": 1, "customer_id is empty": 1,
        "price is not a non-negative number": 1, "article_id not in the catalogue": 1,
    }
    rejects = pd.read_parquet(result.out_dir / "rejects.parquet")
    by_source = rejects.groupby("source")["line"].apply(sorted).to_dict()
    assert by_source == {"articles.csv.gz": [3, 4], "transactions.csv.gz": [3, 4, 5, 6]}


def test_custom_catalogue_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "products.jsonl").write_text(
        '{"sku": "A1", "name": "Linen shirt", "desc": "Relaxed", "brand": "X"}\n'
        "not json\n"
        '{"sku": "A2", "name": "Wrap dress"}\n'
        '["a list"]\n'
    )
    (tmp_path / "orders.csv").write_text("customer,sku,at\nu1,A1,2024-01-02\nu1,A9,2024-01-03\nu2,A2,bad\n")
    (tmp_path / "shop.toml").write_text(
        'name = "shop"\n[items]\npath = "products.jsonl"\nitem_id = "sku"\ntitle = "name"\ndescription = "desc"\n'
        '[interactions]\npath = "orders.csv"\nuser_id = "customer"\nitem_id = "sku"\ntimestamp = "at"\n'
    )
    result = ingest("custom", tmp_path / "shop.toml", tmp_path / "out")
    assert result.dataset == "shop"
    assert result.counts == {"items": 2, "interactions": 1, "users": 1, "rejected_rows": 4}
    items = pd.read_parquet(result.out_dir / "items.parquet")
    assert list(items["title"]) == ["Linen shirt", "Wrap dress"] and "brand" in items.columns


def test_custom_mapping_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[items]\npath = 'x.csv'\n")
    with pytest.raises(IngestError, match="'path' and 'item_id'"):
        ingest("custom", tmp_path / "bad.toml", tmp_path / "out")
    (tmp_path / "broken.toml").write_text("[items\n")
    with pytest.raises(IngestError, match="not valid TOML"):
        ingest("custom", tmp_path / "broken.toml", tmp_path / "out")
