"""The web service through FastAPI's TestClient, against a real embedded PostgreSQL + pgvector.

A tiny run folder is built once per session by the real pipeline functions: ingest of a
400-article H&M slice (with every transaction of those articles), the column vocabulary, a small
untrained item tower saved as a checkpoint, ``encode_stage`` (MiniLM text + tower) and
``index_stage`` (COPY, HNSW, probe). The service then loads it exactly as ``atelier serve`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from atelier.config import Settings
from atelier.recommend.chain import PopularityStage, Scored, StageRequest, StageSkip, run_chain
from atelier.schema import ItemJSON
from atelier.schema.context import context_attributes
from atelier.serve.app import create_app
from atelier.serve.schemas import ProductIn
from atelier.serve.service import RecommendService
from atelier.serve.stages import register_stage
from atelier.store import SearchFilters
from tests.helpers import API_KEY, build_tiny_run, product, write_evaluation


@pytest.fixture(scope="session")
def serve_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    """Settings of the session's tiny run (shared with the browser test)."""
    return build_tiny_run(tmp_path_factory.getbasetemp() / "serve-run", data_dir)


@pytest.fixture(scope="session")
def service(serve_settings: Settings) -> Iterator[RecommendService]:
    """One service for the session, loaded as ``atelier serve`` loads it."""
    svc = RecommendService(serve_settings)
    yield svc
    svc.close()


@pytest.fixture
def client(service: RecommendService, serve_settings: Settings) -> Iterator[TestClient]:
    """A TestClient over the shared service."""
    with TestClient(create_app(serve_settings, service=service)) as c:
        yield c


@pytest.fixture(scope="session")
def catalogue_ids(serve_settings: Settings) -> list[str]:
    """The ingested item ids in catalogue order."""
    return pd.read_parquet(serve_settings.paths.dataset("hm") / "items.parquet")["item_id"].astype(str).tolist()




AUTH = {"X-API-Key": API_KEY}


# --- health, readiness, schema -----------------------------------------------------------------


def test_health_ready_and_openapi(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] and not body["degraded"] and body["store"] == "ok"
    assert body["model_id"].startswith("item_tower:hm:")
    assert body["stages"]["content"] == "ready" and body["stages"]["popularity"] == "ready"
    assert body["stages"]["two_tower"] == "no model for this dataset"  # no `atelier train user` in this run
    assert body["ingest"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/items", "/items/{item_id}", "/items/{item_id}/similar", "/ready", "/evaluation",
            "/evaluation/plots/{name}"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "merch-form" in page.text


# --- items ------------------------------------------------------------------------------------


def test_get_item_and_unknown(client: TestClient, catalogue_ids: list[str]) -> None:
    item = client.get(f"/items/{catalogue_ids[0]}").json()
    assert item["item_id"] == catalogue_ids[0] and item["title"]
    assert item["attributes"]["category"]
    missing = client.get("/items/0000000000")
    assert missing.status_code == 404 and "unknown item id" in missing.json()["detail"]


def test_search_browse_and_filters(client: TestClient) -> None:
    front = client.get("/items").json()
    assert front["source"] == "popular" and front["items"]
    found = client.get("/items", params={"query": "top", "limit": 5}).json()
    assert found["source"] == "search" and 0 < len(found["items"]) <= 5
    assert all("top" in (i["title"] + i["description"]).lower() or i["attributes"]["category"][0].startswith("02top")
               for i in found["items"])
    dresses = client.get("/items", params={"category": "dress"}).json()["items"]
    assert dresses and all(i["attributes"]["category"] == ["04onepiece_01dress"] for i in dresses)
    bad = client.get("/items", params={"category": "spaceship"})
    assert bad.status_code == 422 and "category" in bad.json()["detail"]
    assert client.get("/items", params={"limit": 0}).status_code == 422


def test_search_is_ranked_and_says_by_what(client: TestClient, service: RecommendService,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    found = client.get("/items", params={"query": "jersy top", "limit": 8}).json()
    assert found["corrections"] == {"jersy": "jersey"} and not found["notes"]
    assert found["ranked_by"] == ["text: all words", f"vector: {service.model_id}", "popularity"]
    assert all("jersey" in (i["title"] + i["description"]).lower() for i in found["items"])
    # no item tower: the page still answers, and says the vector part did not run
    monkeypatch.setattr(service, "encoder", None)
    monkeypatch.setattr(service, "ingest_blocker", "no item tower checkpoint at models/hm.pt")
    textual = client.get("/items", params={"query": "jersey top", "limit": 8}).json()
    assert textual["ranked_by"] == ["text: all words", "popularity"]
    assert textual["notes"] == ["ranked without the vector search: no item tower checkpoint at models/hm.pt"]


def test_prices_are_labelled_and_kept_raw(client: TestClient) -> None:
    items = client.get("/items", params={"limit": 50}).json()["items"]
    priced = [i for i in items if i["price"] is not None]
    assert priced, "the popular items have prices from their sales"
    for item in priced:
        assert 1 <= item["price_level"] <= 5 and item["price_label"] == f"price level {item['price_level']} of 5"
        assert 0 < item["price"] < 1, "the raw normalised H&M price is kept"
    assert {i["price_level"] for i in priced} != {priced[0]["price_level"]}, "levels spread over the catalogue"
    one = client.get(f"/items/{priced[0]['item_id']}").json()
    assert one["price_label"] == priced[0]["price_label"]


def test_a_catalogue_with_a_currency_shows_the_amount() -> None:
    from atelier.serve.schemas import Item, show_prices

    items = [Item(item_id="a", price=1234.5), Item(item_id="b")]
    show_prices(items, lambda price: None if price is None else 4, "EUR")
    assert (items[0].price, items[0].price_level, items[0].price_label) == (1234.5, 4, "1,234.50 EUR")
    assert items[1].price_level is None and items[1].price_label is None


def test_similar(client: TestClient, catalogue_ids: list[str]) -> None:
    res = client.get(f"/items/{catalogue_ids[3]}/similar", params={"k": 5}).json()
    ids = [i["item_id"] for i in res["items"]]
    assert 0 < len(ids) <= 5 and catalogue_ids[3] not in ids
    scores = [i["score"] for i in res["items"]]
    assert scores == sorted(scores, reverse=True)
    assert client.get(f"/items/{catalogue_ids[3]}/similar", params={"k": 0}).status_code == 422
    assert client.get("/items/0000000000/similar").status_code == 404


# --- recommend --------------------------------------------------------------------------------


def test_recommend_cart_is_content_with_explanations(client: TestClient, catalogue_ids: list[str]) -> None:
    cart = catalogue_ids[:2]
    res = client.post("/recommend", json={"cart": cart, "k": 8}).json()
    assert res["stage"] == "content" and not res["degraded"]
    assert len(res["items"]) == 8
    ids = [i["item_id"] for i in res["items"]]
    assert not set(ids) & set(cart), "cart items are excluded"
    content = [i for i in res["items"] if i["stage"] == "content"]
    assert content and all(i["score"] is not None for i in content)
    assert any(s["source"] == "cart" for i in content for s in i["explanation"]["shared"])
    for item in content:  # one plain sentence; the model's detail in its own fields
        why = item["explanation"]
        assert "in your cart" in why["reason"] and why["signal"] in ("similar", "colourway"), why
        assert why["stage"] == "content" and "item tower" in why["detail"] and "item tower" not in why["reason"]
    assert res["stages"][0] == {"name": "content", "status": "served", "detail": "", "items": len(content)}


def test_recommend_anonymous_is_popularity(client: TestClient) -> None:
    res = client.post("/recommend", json={"k": 5, "profile": {"height_cm": 170, "weight_kg": 60, "age": 30}}).json()
    assert res["stage"] == "popularity" and len(res["items"]) == 5
    assert res["stages"][0]["name"] == "content" and res["stages"][0]["status"] == "skipped"
    assert all(i["score"] is None and i["explanation"]["reason"] == "popular this week" for i in res["items"])
    assert all("most bought" in i["explanation"]["detail"] for i in res["items"])


def test_reasons_never_tell_an_anonymous_shopper_what_they_bought(client: TestClient,
                                                                  service: RecommendService) -> None:
    user, history = next((u, h) for u, h in service.shop.histories.items() if len(h) >= 2)
    known = client.post("/recommend", json={"user_id": user, "k": 6}).json()["items"]
    assert all("bought" in i["explanation"]["reason"] for i in known), [i["explanation"] for i in known]
    viewed = client.post("/recommend", json={"recent_item_ids": list(history), "k": 6}).json()["items"]
    reasons = [i["explanation"]["reason"] for i in viewed]
    assert all("looked at" in r and "bought" not in r for r in reasons), reasons


def test_recommend_known_user_excludes_history_when_asked(client: TestClient, service: RecommendService) -> None:
    user, history = next((u, h) for u, h in service.shop.histories.items() if len(h) >= 2)
    res = client.post("/recommend", json={"user_id": user, "k": 6, "exclude_seen": True}).json()
    assert res["stage"] == "content" and not res["notes"]
    assert not {i["item_id"] for i in res["items"]} & set(history)
    # by default past purchases may come back (H&M shoppers re-buy); the request echoes nothing else
    again = client.post("/recommend", json={"user_id": user, "k": 6}).json()
    assert again["stage"] == "content" and len(again["items"]) == 6
    stranger = client.post("/recommend", json={"user_id": "nobody-at-all", "k": 3}).json()
    assert stranger["stage"] == "popularity" and "treated as anonymous" in stranger["notes"][0]


def test_recommend_context_and_filters(client: TestClient) -> None:
    res = client.post("/recommend", json={"context": "a black dress for a wedding", "k": 5,
                                          "filters": {"categories": ["dress"]}}).json()
    assert res["context_attributes"]["category"] == ["04onepiece_01dress"]
    assert res["context_attributes"]["color"] == ["black"]
    assert res["stage"] == "content" and res["items"]
    assert all(i["attributes"]["category"] == ["04onepiece_01dress"] for i in res["items"])


def test_validation_errors_name_the_field(client: TestClient) -> None:
    cases = [
        ({"k": 0}, "body.k"),
        ({"kk": 3}, "body.kk"),
        ({"profile": {"height_cm": 1.7}}, "body.profile.height_cm"),
        ({"filters": {"categories": ["spaceship"]}}, "body.filters.categories"),
        ({"cart": "0108775015"}, "body.cart"),
        ({"filters": {"min_price": 2, "max_price": 1}}, "body.filters"),
    ]
    for body, field in cases:
        res = client.post("/recommend", json=body)
        assert res.status_code == 422, (body, res.text)
        assert field in res.json()["detail"], res.json()
    broken = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422


def test_body_size_limit(client: TestClient, serve_settings: Settings) -> None:
    big = {"context": "x" * 100, "cart": ["a" * 100] * 50, "pad": "y" * serve_settings.serve_max_body_bytes}
    res = client.post("/recommend", json=big)
    assert res.status_code == 413 and "bytes" in res.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must still hold
        yield b'{"context": "'
        for _ in range(serve_settings.serve_max_body_bytes // 1000 + 2):
            yield b"z" * 1000
        yield b'"}'

    res = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert res.status_code == 413


# --- writes -----------------------------------------------------------------------------------


def test_write_endpoints_need_the_key(client: TestClient, service: RecommendService,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.post("/items", json=product("auth-1")).status_code == 401
    assert client.post("/items", json=product("auth-1"), headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.delete("/items/auth-1", headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.post("/items", json=product("auth-1"), headers={"Authorization": "Bearer nope"}).status_code == 403
    monkeypatch.setattr(service.settings, "api_key", "")
    off = client.post("/items", json=product("auth-1"), headers=AUTH)
    assert off.status_code == 403 and "ATELIER_API_KEY" in off.json()["detail"]
    assert client.get("/items/auth-1").status_code == 404


def test_cold_start_product_is_live_at_once(client: TestClient) -> None:
    body = product("new-emerald-1")
    created = client.post("/items", json=body, headers=AUTH)
    assert created.status_code == 201, created.text
    item = created.json()["item"]
    assert item["clothes"]["category"] == ["04onepiece_01dress"] and item["clothes"]["color"] == ["green"]
    assert client.get("/items/new-emerald-1").json()["title"] == body["title"]
    assert client.post("/items", json=body, headers=AUTH).status_code == 409
    # recommendable at once: a shopper describing it gets it, and its neighbours are searchable
    res = client.post("/recommend", json={"context": f"{body['title']}. {body['description']}", "k": 10}).json()
    assert "new-emerald-1" in [i["item_id"] for i in res["items"]], res["items"]
    assert client.get("/items/new-emerald-1/similar", params={"k": 3}).json()["items"]
    # PUT replaces (explicit attributes win over columns), DELETE removes it and its vector
    replaced = client.put("/items/new-emerald-1", json=product("new-emerald-1", attributes={"color": ["navy"]}),
                          headers=AUTH)
    assert replaced.status_code == 200 and replaced.json()["item"]["clothes"]["color"] == ["navy"]
    mismatch = client.put("/items/other-id", json=product("new-emerald-1"), headers=AUTH)
    assert mismatch.status_code == 422 and "item_id" in mismatch.json()["detail"]
    assert client.delete("/items/new-emerald-1", headers=AUTH).status_code == 204
    assert client.get("/items/new-emerald-1").status_code == 404
    assert client.delete("/items/new-emerald-1", headers=AUTH).status_code == 404


def test_product_validation(client: TestClient) -> None:
    bad_attr = client.post("/items", json=product("p-1", attributes={"colour": ["red"]}), headers=AUTH)
    assert bad_attr.status_code == 422 and "attributes" in bad_attr.json()["detail"]
    bad_value = client.post("/items", json=product("p-1", attributes={"color": ["plaid-ish"]}), headers=AUTH)
    assert bad_value.status_code == 422 and "color" in bad_value.json()["detail"]
    bad_id = client.post("/items", json=product("../etc/passwd"), headers=AUTH)
    assert bad_id.status_code == 422 and "item_id" in bad_id.json()["detail"]
    assert client.post("/items", json=product("p-1", title=""), headers=AUTH).status_code == 422


def test_enrichment_failure_stores_nothing(client: TestClient, service: RecommendService,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        name = "broken-llm"

        def __call__(self, product: ProductIn) -> ItemJSON:
            raise TimeoutError("LLM backend timed out")

    monkeypatch.setattr(service, "enricher", Broken())
    res = client.post("/items", json=product("fails-1"), headers=AUTH)
    assert res.status_code == 502
    assert "broken-llm" in res.json()["detail"] and "nothing was stored" in res.json()["detail"]
    assert client.get("/items/fails-1").status_code == 404
    records = [json.loads(line) for line in service.settings.paths.serve_errors.read_text().splitlines()]
    assert records[-1]["item_id"] == "fails-1" and "timed out" in records[-1]["error"]
    assert API_KEY not in service.settings.paths.serve_errors.read_text()


# --- the merchandiser's view -------------------------------------------------------------------


def test_merchandiser_view_of_a_product(client: TestClient, serve_settings: Settings) -> None:
    items = pd.read_parquet(serve_settings.paths.dataset("hm") / "items.parquet")
    group = items["group_id"].value_counts().index[0]  # the product with the most colourways
    product_ids = items.loc[items["group_id"] == group, "item_id"].astype(str).tolist()
    cart = [str(items["item_id"].iloc[-1])]
    answer = client.post("/recommend", json={"cart": cart, "k": 5}).json()
    shown = answer["items"][0]["item_id"]
    assert client.get(f"/items/{shown}/merchandising").status_code == 401
    view = client.get(f"/items/{shown}/merchandising", headers=AUTH).json()
    assert view["carts"][0]["cart"] == cart and view["carts"][0]["times"] >= 1, view["carts"]
    assert view["carts"][0]["titles"][0] == items["title"].iloc[-1]
    assert view["neighbours"] and "recommendations.jsonl" in view["log"]
    # no enrichment report in this run: every value came from the catalogue's columns
    assert view["origins"] and {o["origin"] for o in view["origins"]} == {"columns"}
    assert "no enrichment report" in view["provenance"]
    siblings = client.get(f"/items/{product_ids[0]}/merchandising", headers=AUTH).json()["colourways"]
    assert sorted(i["item_id"] for i in siblings) == sorted(product_ids[1:])


def test_a_relisted_product_reaches_the_shopper_who_bought_its_colourway(client: TestClient,
                                                                          serve_settings: Settings) -> None:
    """Cold start through the API: another colourway of a product a shopper bought, posted under a new id with
    no sales, is encoded from its content alone and reaches that shopper."""
    folder = serve_settings.paths.dataset("hm")
    items = pd.read_parquet(folder / "items.parquet").set_index("item_id")
    log = pd.read_parquet(folder / "interactions.parquet")
    sizes = items["group_id"].value_counts()
    bought = log.groupby("user_id")["item_id"].unique()
    shopper, item = next((u, ids[0]) for u, ids in bought.items()  # one purchase, of a product in colourways
                         if len(ids) == 1 and sizes[items.loc[ids[0], "group_id"]] >= 2)
    sibling = items[(items["group_id"] == items.loc[item, "group_id"]) & (items.index != item)].iloc[0]
    columns = {c: str(sibling[c]) for c in ("product_type_name", "colour_group_name", "graphical_appearance_name",
                                            "index_group_name", "department_name") if pd.notna(sibling[c])}
    relisted = {"item_id": f"relist-{sibling.name}", "title": sibling["title"], "columns": columns,
                "description": sibling["description"] if pd.notna(sibling["description"]) else ""}
    before = client.post("/recommend", json={"user_id": shopper, "k": 12}).json()["items"]
    assert relisted["item_id"] not in {i["item_id"] for i in before}
    assert client.post("/items", json=relisted, headers=AUTH).status_code in (200, 201)
    try:
        after = client.post("/recommend", json={"user_id": shopper, "k": 12}).json()["items"]
        assert relisted["item_id"] in {i["item_id"] for i in after}, [i["item_id"] for i in after]
    finally:
        client.delete(f"/items/{relisted['item_id']}", headers=AUTH)


def test_preview_shows_the_enrichers_attributes_and_stores_nothing(client: TestClient) -> None:
    body = product("preview-1", attributes={"color": ["navy"]})
    assert client.post("/items/preview", json=body).status_code == 401
    res = client.post("/items/preview", json=body, headers=AUTH)
    assert res.status_code == 200, res.text
    origins = {o["field"]: o for o in res.json()["origins"]}
    assert origins["category"]["values"] == ["04onepiece_01dress"] and origins["category"]["origin"] == "columns"
    assert origins["color"]["values"] == ["navy"] and origins["color"]["origin"] == "given"
    assert res.json()["enricher"] == "columns"
    assert client.get("/items/preview-1").status_code == 404


def test_attribute_origins_name_the_enrichment_method_and_model() -> None:
    from atelier.serve.products import attribute_origins

    doc = {"clothes": {"category": ["04onepiece_01dress"], "color": ["black"], "season": ["unknown"]},
           "reinforced_feature_value": {"detail.re": ["puff sleeve"]}}
    sources = {"color": {"method": "tfidf-lr", "model_id": "tfidf-lr@1"}, "re": {"backend": "phrases"}}
    found = {o.field: o for o in attribute_origins(doc, {"category": ["04onepiece_01dress"]}, sources=sources,
                                                   enricher="hybrid@c9")}
    assert found["category"].origin == "columns" and "season" not in found
    assert (found["color"].origin, found["color"].method, found["color"].model_id) == ("enricher", "tfidf-lr",
                                                                                     "tfidf-lr@1")
    assert (found["detail.re"].kind, found["detail.re"].method, found["detail.re"].model_id) == ("re", "phrases",
                                                                                               "hybrid@c9")
    assert {o.origin for o in attribute_origins(doc, None)} == {"posted"}


# --- the evaluation report --------------------------------------------------------------------



def test_evaluation_report_per_cohort_with_its_plots(client: TestClient, serve_settings: Settings) -> None:
    report = json.loads(write_evaluation(serve_settings).read_text())
    res = client.get("/evaluation")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["dataset"] == "hm" and body["validation"] and not body["notes"], body["notes"]
    assert body["baselines"] == ["rules", "popularity"] and body["served"] == "atelier"
    split = report["split"]
    assert body["split"].startswith("Validation split") and "2020-09-19" in body["split"]
    assert f"{split['scored_users']:,} users scored: {split['users_with_history']:,} with history" in body["split"]
    assert client.get("/evaluation", params={"dataset": "hm"}).json() == body
    cohorts = {c["cohort"]: c for c in body["cohorts"]}
    assert {"all", "history", "new"} <= set(cohorts) and cohorts["all"]["users"] == split["scored_users"]
    assert [(r["model"], r["role"]) for r in cohorts["all"]["rows"]] == [
        ("random", "other"), ("popularity", "baseline"), ("rules", "baseline"), ("atelier", "served")]
    for row in cohorts["all"]["rows"]:  # the report's own numbers (NaN, where nothing was scored, is None)
        model = report["models"][row["model"]]
        assert row["map_at_12"] == pytest.approx(model["cohorts"]["all"]["map@12"])
        assert row["recall_at_100"] == pytest.approx(model["cohorts"]["all"]["recall@100"])
        cold = model["cold_items"]["recall@100"]
        assert row["cold_recall_at_100"] == (None if cold != cold else pytest.approx(cold))
    assert all(r["cold_recall_at_100"] is None for r in cohorts["history"]["rows"]), "cold recall: all and cart only"
    plots = {p["name"]: p["url"] for p in body["plots"]}
    assert set(plots) == {"hm_metrics.png", "hm_cohorts.png"}
    png = client.get(plots["hm_metrics.png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_evaluation_fails_loudly_and_serves_only_the_reports_folder(
        client: TestClient, service: RecommendService, serve_settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_evaluation(serve_settings)
    run = service.settings.model_copy(update={"run_dir": tmp_path / "run"})
    monkeypatch.setattr(service, "settings", run)
    missing = client.get("/evaluation")
    assert missing.status_code == 404 and "`atelier evaluate -d hm` (or `atelier run`) writes one" in \
        missing.json()["detail"]
    unknown = client.get("/evaluation", params={"dataset": "zara"})
    assert unknown.status_code == 404 and unknown.json()["detail"] == "unknown dataset 'zara': this run folder has hm"
    for bad in ("../hm", "HM", "hm.json", ""):
        res = client.get("/evaluation", params={"dataset": bad})
        assert res.status_code == 422 and "query.dataset" in res.json()["detail"], (bad, res.text)
    run.paths.reports.mkdir(parents=True)
    report = run.paths.reports / "hm.json"
    report.write_text("{not json")
    broken = client.get("/evaluation")
    assert broken.status_code == 500 and "cannot be read" in broken.json()["detail"]
    report.write_text("[]")
    assert "is not an evaluation report" in client.get("/evaluation").json()["detail"]
    # a model saved after the report: the page is told the report no longer describes what is served
    shutil.copy(good, report)
    os.utime(report, (1e9, 1e9))
    run.paths.ranker("hm").parent.mkdir(parents=True)
    run.paths.ranker("hm").write_bytes(b"")
    body = client.get("/evaluation").json()
    assert body["notes"] == ["saved after this report: ranker-hm.pt; `atelier evaluate -d hm` scores what is "
                             "served now"] and body["plots"] == []
    # plots: regular PNG files of the reports folder only, found by name, never a path from the request
    shutil.copy(good.with_name("hm_metrics.png"), run.paths.reports / "hm_metrics.png")
    (tmp_path / "secret.png").write_bytes(b"not for the web")
    (run.paths.reports / "link.png").symlink_to(tmp_path / "secret.png")
    assert [p["name"] for p in client.get("/evaluation").json()["plots"]] == ["hm_metrics.png"]
    assert client.get("/evaluation/plots/hm_metrics.png").status_code == 200
    assert client.get("/evaluation/plots/link.png").status_code == 404
    assert client.get("/evaluation/plots/nothing.png").status_code == 404
    assert client.get("/evaluation/plots/hm.json").status_code == 422
    for sneaky in ("..%2Fsecret.png", "%2E%2E%2Fsecret.png", "..%5Csecret.png"):
        res = client.get(f"/evaluation/plots/{sneaky}")
        assert res.status_code in (404, 422) and res.content != b"not for the web", sneaky


# --- degraded modes ---------------------------------------------------------------------------


def test_unreachable_store_serves_cached_popular(serve_settings: Settings, service: RecommendService) -> None:
    dead = serve_settings.model_copy(update={"database_url": "postgresql://atelier@127.0.0.1:1/atelier"})
    svc = RecommendService(dead, shop=service.shop, warm_up=False)
    with TestClient(create_app(dead, service=svc)) as c:
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["degraded"] and "unreachable" in ready.json()["store"]
        res = c.post("/recommend", json={"cart": ["0108775015"], "k": 4})
        assert res.status_code == 200
        body = res.json()
        assert body["degraded"] and body["stage"] == "popularity" and len(body["items"]) == 4
        assert all(i["title"] for i in body["items"]), "cached items carry their JSON"
        assert body["stages"][0]["status"] == "unavailable"
        assert c.get("/items/0108775015").status_code == 503
        assert c.post("/items", json=product("x-1"), headers=AUTH).status_code == 503
        assert c.get("/items").json()["items"], "the front page still shows popular items"


def test_store_lost_mid_run_falls_back(serve_settings: Settings, service: RecommendService,
                                       catalogue_ids: list[str]) -> None:
    svc = RecommendService(serve_settings, shop=service.shop, warm_up=False)
    store = svc.store()
    assert store is not None
    with TestClient(create_app(serve_settings, service=svc)) as c:
        assert c.post("/recommend", json={"cart": catalogue_ids[:1], "k": 3}).json()["stage"] == "content"
        store.close()  # the pool is gone: every store call now fails like a lost server
        body = c.post("/recommend", json={"cart": catalogue_ids[:1], "k": 3}).json()
        assert body["degraded"] and body["stage"] == "popularity" and len(body["items"]) == 3
        assert body["stages"][0]["status"] == "failed"
        # the breaker holds: the next request does not touch the store at all
        again = c.post("/recommend", json={"cart": catalogue_ids[:1], "k": 3}).json()
        assert again["degraded"] and again["stages"][0]["status"] == "unavailable"


# --- units ------------------------------------------------------------------------------------


def test_context_attributes_use_schema_synonyms() -> None:
    found = context_attributes("Navy blue trousers for the office, wool")
    assert found["color"] == ["navy"] and found["category"] == ["03bottom_02pants"]
    assert found["fiber_composition"] == ["wool"]
    assert context_attributes("") == {}


class _Fixed:
    def __init__(self, name: str, ids: list[str], skip: bool = False) -> None:
        self.name, self.ids, self.skip = name, ids, skip

    def available(self) -> str | None:
        return None

    def recommend(self, request: StageRequest) -> list[Scored]:
        if self.skip:
            raise StageSkip("nothing to start from")
        return [Scored(i, 1.0, self.name, "fixed") for i in self.ids if i not in request.exclude][: request.k]


def test_chain_pads_from_later_stages_and_reports() -> None:
    chain = [_Fixed("two_tower", [], skip=True), _Fixed("content", ["a", "b"]), _Fixed("popularity", ["b", "c", "d"])]
    result = run_chain(chain, StageRequest(k=3, exclude=frozenset({"d"})))
    assert [(s.item_id, s.stage) for s in result.items] == [("a", "content"), ("b", "content"), ("c", "popularity")]
    assert [r.status for r in result.reports] == ["skipped", "served", "served"]
    with pytest.raises(ValueError, match="unknown stage"):
        register_stage("magic", lambda ctx: None)


def test_popularity_respects_filters(service: RecommendService) -> None:
    stage = PopularityStage(service.shop.popular, lambda p: [])
    dresses = stage.recommend(StageRequest(k=5, filters=SearchFilters(categories=("04onepiece_01dress",))))
    entries = service.shop.popular.entries
    assert all(entries[s.item_id].category == "04onepiece_01dress" for s in dresses)



def test_llm_enricher_through_the_fake_backend(client: TestClient, service: RecommendService,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from atelier.enrich.fake import FakeExtractor
    from atelier.serve.products import make_enricher

    llm_settings = service.settings.model_copy(update={"llm_backend": "fake"})
    enricher = make_enricher("llm", "hm", llm_settings)
    monkeypatch.setattr(service, "enricher", enricher)
    created = client.post("/items", json=product("llm-1"), headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["enricher"] == "llm:fake"
    clothes = created.json()["item"]["clothes"]
    assert clothes["category"] == ["04onepiece_01dress"] and clothes["color"] == ["green"]  # column facts kept
    assert client.delete("/items/llm-1", headers=AUTH).status_code == 204
    # a backend that fails every attempt: 502, nothing stored
    monkeypatch.setattr(enricher, "extractor", FakeExtractor(responses=[RuntimeError("backend down")] * 5))
    failed = client.post("/items", json=product("llm-2"), headers=AUTH)
    assert failed.status_code == 502 and "nothing was stored" in failed.json()["detail"]
    assert client.get("/items/llm-2").status_code == 404
