"""Enrichment: answer parsing and repair, error records, the cache, resume after kill -9, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.enrich import (
    PROMPT_VERSION,
    EnrichCache,
    EnrichOptions,
    RawProduct,
    UnknownBackendError,
    available_backends,
    enrich_product,
    enrich_products,
    get_extractor,
    parse_answer,
)
from atelier.enrich.core import AnswerError, prepare
from atelier.enrich.fake import FakeExtractor
from atelier.enrich.prompt import UNKNOWN_LABEL, asked_fields, label_maps
from atelier.enrich.rules import keyword_values
from atelier.schema import UNKNOWN, load_schema

SCHEMA = load_schema()
VEST = RawProduct(item_id="0108775015", title="Strap top", description="Jersey top with narrow shoulder straps.",
                  known={"category": ["02top_08vesttop"], "category_specification": ["top"], "color": ["black"]})


def products(n: int, tag: str = "") -> list[RawProduct]:
    """``n`` distinct synthetic products (the fake answers from their titles)."""
    kinds = ["Navy Blue Shirt", "Striped cotton t-shirt", "Black leather boots", "Floral midi dress", "Grey hoodie"]
    return [RawProduct(item_id=f"p{i:04d}", title=f"{kinds[i % len(kinds)]} {tag}{i}") for i in range(n)]


# --------------------------------------------------------------------------- registry and prompt


def test_registry_knows_backends_and_names_them_on_unknown() -> None:
    assert {"embedded", "openai", "fake"} <= set(available_backends())
    with pytest.raises(UnknownBackendError, match=r"'gpt-9'.*embedded, embedded-ll, .*fake, .*openai"):
        get_extractor("gpt-9")
    assert isinstance(get_extractor("fake"), FakeExtractor)


def test_openai_backend_without_a_server_says_which_setting_to_set() -> None:
    from atelier.enrich import BackendError

    with pytest.raises(BackendError, match="ATELIER_LLM_BASE_URL"):
        get_extractor("openai")


def test_columns_are_not_asked_again_unless_full() -> None:
    asked = asked_fields(VEST, SCHEMA)
    assert "color" not in asked and "category" not in asked and "season" in asked
    assert "bottom.length_type" not in asked  # not a bottom
    assert "top.neck_color_design" in asked
    full = asked_fields(VEST, SCHEMA, full=True)
    assert {"color", "category", "bottom.length_type"} <= set(full)
    assert asked_fields(VEST, SCHEMA, full=True, only=["color", "gender"]) == ["color", "gender"]


def test_answer_schema_has_std_enums_of_labels_and_bounded_re_phrases() -> None:
    prep = prepare(VEST, SCHEMA, EnrichOptions(full=True))
    props = prep.request.schema["properties"]
    assert "vest top" in props["category"]["enum"] and UNKNOWN_LABEL in props["category"]["enum"]
    assert set(props["color"]["enum"]) == {*SCHEMA.std["color"].values, UNKNOWN_LABEL}
    phrase = props["re"]["properties"]["style"]
    assert phrase["maxItems"] >= 1 and phrase["items"]["maxLength"] <= 40
    assert set(prep.request.schema["required"]) == set(props)
    # Every label maps back onto exactly one allowed value.
    for name, labels in label_maps(SCHEMA).items():
        assert sorted(labels.values()) == sorted(SCHEMA.std[name].values)


def test_prompt_is_versioned_and_has_no_copyable_example_values() -> None:
    prep = prepare(VEST, SCHEMA, EnrichOptions())
    text = prep.request.messages[-1]["content"]
    assert PROMPT_VERSION.startswith("enrich-v")
    assert "Strap top" in text and "vest top" in text  # known facts as labels, not ids
    assert "02top_08vesttop" not in text
    # The fixed guide comes first so llama.cpp can reuse its KV cache across products.
    other = prepare(products(1)[0], SCHEMA, EnrichOptions()).request.messages[-1]["content"]
    shared = next(i for i, (a, b) in enumerate(zip(text, other, strict=False)) if a != b)
    assert text[:shared].endswith("Product listing:\nTitle: ")


def test_keyword_rules_pick_the_longest_then_last_term() -> None:
    found = keyword_values("Turtle Check Men Navy Blue Shirts", SCHEMA, ["color", "gender", "print", "category"])
    assert found == {"color": "navy", "gender": "male", "print": "check", "category": "02top_03shirt"}


# --------------------------------------------------------------------------- parsing and repair


FIELDS = ["color", "season", "category", "print"]


def test_parse_clean_answer() -> None:
    raw = json.dumps({"color": "navy", "season": "unknown", "category": "vest top", "print": "stripe",
                      "re": {"style": ["sailor stripe"]}})
    clothes, rfv, notes = parse_answer(raw, SCHEMA, FIELDS, ["style"])
    assert clothes == {"color": ["navy"], "category": ["02top_08vesttop"], "print": ["stripe"]}
    assert rfv == {"style": ["sailor stripe"]} and notes == []


def test_parse_repairs_fences_synonyms_and_out_of_vocabulary() -> None:
    raw = 'Sure! ```json\n{"color": "Navy Blue", "season": "fall", "category": "moon boots", "print": ["plain"],' \
          ' "gender": "men", "re": {"style": "preppy stripes", "nope": ["x"]}}\n```'
    clothes, rfv, notes = parse_answer(raw, SCHEMA, FIELDS, ["style"])
    assert clothes == {"color": ["navy"], "season": ["autumn"], "category": [UNKNOWN], "print": ["solid"]}
    assert rfv == {"style": ["preppy stripes"]}
    assert any("text around the object" in n for n in notes)
    assert any("gender: not asked" in n for n in notes) and any("re.nope" in n for n in notes)


def test_parse_accepts_the_item_json_shape() -> None:
    raw = json.dumps({"item_id": "x", "clothes": {"color": ["black"]}, "reinforced_feature_value": {"style": ["goth"]}})
    clothes, rfv, notes = parse_answer(raw, SCHEMA, FIELDS, ["style"])
    assert clothes == {"color": ["black"]} and rfv == {"style": ["goth"]}
    assert any("item-JSON" in n for n in notes)


@pytest.mark.parametrize("raw", ["", "not json at all", '{"color": "black"', "[1, 2]", '"black"'])
def test_unusable_answers_raise(raw: str) -> None:
    with pytest.raises(AnswerError):
        parse_answer(raw, SCHEMA, FIELDS, [])


def test_invalid_json_is_retried_then_repaired_result() -> None:
    good = json.dumps({"season": "summer"})
    fake = FakeExtractor(responses=["{broken", good])
    result = enrich_product(VEST, fake, options=EnrichOptions(fields=("season",), re_fields=()))
    assert result.status == "repaired" and result.attempts == 2
    assert result.item is not None and result.item.clothes["season"] == ["summer"]
    assert result.item.clothes["color"] == ["black"]  # columns kept
    assert fake.calls[1].context["attempt"] == 2  # the retry asks the backend to sample


def test_bounded_retries_end_in_an_error_record_with_raw_output() -> None:
    fake = FakeExtractor(responses=["nope", "still nope", "{", "never asked"])
    result = enrich_product(VEST, fake, options=EnrichOptions(max_attempts=3))
    assert result.status == "error" and result.item is None and result.attempts == 3
    assert len(fake.calls) == 3
    rec = result.error_record()
    assert rec["item_id"] == VEST.item_id and rec["backend"] == "fake:rules@1"
    assert rec["raw"] == "{" and "invalid JSON" in rec["error"]


def test_backend_failure_is_an_error_record_not_an_exception() -> None:
    result = enrich_product(VEST, FakeExtractor(responses=[RuntimeError("server on fire")]))
    assert result.status == "error" and "server on fire" in (result.error or "")


def test_full_extraction_keeps_model_values_apart_from_columns() -> None:
    raw = json.dumps({"color": "white", "category": "vest top"})
    result = enrich_product(VEST, FakeExtractor(responses=[raw]),
                            options=EnrichOptions(full=True, fields=("color", "category"), re_fields=(),
                                                  show_known=False))
    assert result.extracted["clothes"] == {"color": ["white"], "category": ["02top_08vesttop"]}
    assert result.item is not None and result.item.clothes["color"] == ["black"]  # columns win in the item


def test_hidden_columns_never_reach_the_prompt() -> None:
    fake = FakeExtractor()
    enrich_product(VEST, fake, options=EnrichOptions(full=True, fields=("color",), show_known=False))
    assert "Known facts" not in fake.calls[0].messages[-1]["content"]


def test_dict_input_for_the_ingest_endpoint() -> None:
    raw = {"item_id": " n1 ", "title": "Red wool coat", "price": 49.9, "clothes": {"gender": "female"}}
    result = enrich_product(raw, FakeExtractor())
    assert result.status == "ok" and result.item is not None
    assert result.item.item_id == "n1" and result.item.service.price == 49.9
    assert result.item.clothes["color"] == ["red"] and result.item.clothes["gender"] == ["female"]
    with pytest.raises(ValueError, match="item_id"):
        enrich_product({"title": "no id"}, FakeExtractor())


# --------------------------------------------------------------------------- cache


def test_cache_hits_misses_changed_inputs_and_prompt_bump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache.jsonl"
    items = products(6)
    fake = FakeExtractor()
    with EnrichCache(path) as cache:
        first = enrich_products(items, fake, cache)
    assert len(fake.calls) == 6 and not any(r.cached for r in first)
    # Same inputs: all hits, read back from disk by a new cache object.
    fake2 = FakeExtractor()
    with EnrichCache(path) as cache:
        again = enrich_products(items, fake2, cache)
    assert fake2.calls == [] and all(r.cached for r in again)
    assert [r.item for r in again] == [r.item for r in first]
    # One changed description and one new product: only those two are asked.
    changed = [*items[:5], RawProduct(item_id=items[5].item_id, title=items[5].title, description="now in linen"),
               *products(1, tag="new")]
    fake3 = FakeExtractor()
    with EnrichCache(path) as cache:
        enrich_products(changed, fake3, cache)
    assert sorted(c.item_id for c in fake3.calls) == ["p0000", "p0005"]
    # Another model or a prompt-version bump misses everything.
    fake4 = FakeExtractor(version="2")
    with EnrichCache(path) as cache:
        enrich_products(items, fake4, cache)
    assert len(fake4.calls) == 6
    monkeypatch.setattr("atelier.enrich.core.PROMPT_VERSION", "enrich-v999")
    monkeypatch.setattr("atelier.enrich.batch.PROMPT_VERSION", "enrich-v999")
    fake5 = FakeExtractor()
    with EnrichCache(path) as cache:
        bumped = enrich_products(items, fake5, cache)
    assert len(fake5.calls) == 6 and {r.prompt_version for r in bumped} == {"enrich-v999"}


def test_errors_are_logged_but_retried_next_run(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with EnrichCache(path) as cache:
        [bad] = enrich_products(products(1), FakeExtractor(responses=["x", "y", "z"]), cache)
    assert bad.status == "error"
    with EnrichCache(path) as cache:
        assert cache.error(bad.key) is not None and cache.get(bad.key) is None
        [good] = enrich_products(products(1), FakeExtractor(), cache)
    assert good.status == "ok" and not good.cached
    with EnrichCache(path) as cache:
        assert cache.get(good.key) is not None and cache.error(good.key) is None
        assert len(list(cache.records())) == 1


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with EnrichCache(path) as cache:
        enrich_products(products(3), FakeExtractor(), cache)
    with path.open("ab") as fh:
        fh.write(b'{"key": "half a rec')  # what kill -9 mid-write leaves
    with EnrichCache(path) as cache:
        assert cache.torn_lines == 1 and len(cache) == 3
        enrich_products(products(4), FakeExtractor(), cache)
    with EnrichCache(path) as cache:
        assert cache.torn_lines == 1 and len(cache) == 4


_WORKER = """
import sys, time
from pathlib import Path
from atelier.enrich import EnrichCache, RawProduct, enrich_products
from atelier.enrich.fake import FakeExtractor
kinds = ["Navy Blue Shirt", "Striped cotton t-shirt", "Black leather boots", "Floral midi dress", "Grey hoodie"]
items = [RawProduct(item_id=f"p{i:04d}", title=f"{kinds[i % len(kinds)]} {i}") for i in range(int(sys.argv[2]))]
with EnrichCache(Path(sys.argv[1])) as cache:
    enrich_products(items, FakeExtractor(delay=float(sys.argv[3]), concurrency=int(sys.argv[4])), cache)
"""


@pytest.mark.parametrize("concurrency", [1, 4])
def test_resume_after_kill_9_mid_batch(tmp_path: Path, concurrency: int) -> None:
    path, total = tmp_path / "cache.jsonl", 200
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(total), "0.02", str(concurrency)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.is_file() and path.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with EnrichCache(path) as cache:
        finished = len(cache)
    assert 20 <= finished < total, "the worker should have been killed mid-batch"
    fake = FakeExtractor(concurrency=concurrency)
    with EnrichCache(path) as cache:
        results = enrich_products(products(total), fake, cache)
    assert len(fake.calls) == total - finished  # nothing finished is redone
    assert [r.item_id for r in results] == [p.item_id for p in products(total)]  # nothing lost
    assert all(r.status == "ok" for r in results)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines() if line.startswith("{")
            and line.endswith("}")]
    assert len(keys) == len(set(keys)) == total  # no duplicate rows


def test_threads_keep_input_order_and_bound_concurrency() -> None:
    fake = FakeExtractor(delay=0.01, concurrency=4)
    items = products(24)
    results = enrich_products(items, fake, None)
    assert [r.item_id for r in results] == [p.item_id for p in items]
    assert len(fake.calls) == 24


# --------------------------------------------------------------------------- CLI


def test_cli_enrich_fake_backend_writes_items_errors_and_summary(tmp_path: Path, data_dir: Path) -> None:
    from typer.testing import CliRunner

    from atelier.cli import app
    from tests.helpers import write_head

    runner = CliRunner()
    run_dir = tmp_path / "runs"
    write_head(data_dir / "hm" / "articles.csv.gz", tmp_path / "data" / "hm" / "articles.csv.gz", 60)
    write_head(data_dir / "hm" / "transactions.csv.gz", tmp_path / "data" / "hm" / "transactions.csv.gz", 50)
    env = {"ATELIER_RUN_DIR": str(run_dir), "ATELIER_DATA_DIR": str(tmp_path / "data")}
    res = runner.invoke(app, ["enrich", "-d", "hm", "--backend", "fake"], env=env)
    assert res.exit_code == 1 and "atelier ingest -d hm" in res.output
    ingested = runner.invoke(app, ["ingest", "-d", "hm"], env=env)
    assert ingested.exit_code == 0, ingested.output
    res = runner.invoke(app, ["enrich", "-d", "hm", "--limit", "40", "--backend", "fake"], env=env)
    assert res.exit_code == 0, res.output
    lines = (run_dir / "items" / "hm.enriched.jsonl").read_text().splitlines()
    assert len(lines) == 40
    item = json.loads(lines[0])
    assert item["clothes"]["category"] and item["reinforced_feature_value"]["category_specification"]
    summary = json.loads((run_dir / "reports" / "enrich-hm.json").read_text())
    assert summary["total"] == 40 and summary["ok"] + summary["repaired"] == 40 and summary["errors"] == 0
    res = runner.invoke(app, ["enrich", "-d", "hm", "--limit", "50", "--backend", "fake"], env=env)
    summary = json.loads((run_dir / "reports" / "enrich-hm.json").read_text())
    assert summary["cached"] == 40 and summary["total"] == 50
    bad = runner.invoke(app, ["enrich", "-d", "hm", "--backend", "gpt-9"], env=env)
    assert bad.exit_code == 1 and "known backends" in bad.output
