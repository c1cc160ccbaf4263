"""Reliability and security (issue 12): fuzzing, bad input, faults, auth, crash-safe artifacts.

Everything runs against a real embedded PostgreSQL + pgvector holding a 400-article H&M slice
(built by the pipeline's own functions, ``tests.test_serve_api.build_tiny_run``) in this module's
own run folder, so the faults injected here (the database killed with SIGKILL, a full disk) never
touch the store other test modules use. Each test prints what it tried and what survived; run
with ``-s`` to see the counts. ``-m slow`` adds the 1,000+ request fuzz run and the kill -9 of an
enrichment job.

Consistency after every fault is ``VectorStore.consistency``: 0 duplicated items or vectors, 0
items with metadata but no vector, 0 vectors without an item, 0 leftover staging tables, and the
expected set of item ids present (0 lost).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from atelier.config import Settings
from atelier.serve.app import create_app
from atelier.serve.service import RecommendService
from atelier.store import StoreError, VectorStore, open_store
from atelier.store.pointers import live_model_id
from tests.helpers import API_KEY, build_tiny_run, product

AUTH = {"X-API-Key": API_KEY}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rel_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    """A tiny indexed run of this module's own (its embedded server is killed by the fault tests)."""
    return build_tiny_run(tmp_path_factory.mktemp("reliability") / "run", data_dir)


@pytest.fixture(scope="module")
def rel_service(rel_settings: Settings) -> Iterator[RecommendService]:
    svc = RecommendService(rel_settings)
    yield svc
    svc.close()


@pytest.fixture
def client(rel_service: RecommendService, rel_settings: Settings) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a bug must show up as the 500 a real client would get
    with TestClient(create_app(rel_settings, service=rel_service), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def catalogue(rel_settings: Settings) -> list[str]:
    import pandas as pd

    return pd.read_parquet(rel_settings.paths.dataset("hm") / "items.parquet")["item_id"].astype(str).tolist()


def live_ids(store: VectorStore) -> set[str]:
    """Ids of items with metadata (placeholder rows of vector-only loads excluded)."""
    with store.connection() as conn:
        return {r[0] for r in conn.execute("SELECT item_id FROM items WHERE item IS NOT NULL").fetchall()}


def check_consistency(service: RecommendService, expected: set[str] | None = None, what: str = "") -> dict[str, Any]:
    """The store's consistency counts, asserted clean; ``expected`` ids must all be there (0 lost)."""
    store = service.store()
    assert store is not None, f"{what}: the store did not come back"
    assert service.model_id is not None
    report = store.consistency(service.model_id)
    ids = live_ids(store)
    report["lost"] = len(expected - ids) if expected is not None else 0
    print(f"[consistency] {what}: {json.dumps(report)}")
    bad = {k: v for k, v in report.items()
           if k in ("duplicate_items", "duplicate_vectors", "items_without_vector", "vectors_without_item",
                    "staging_tables", "lost") and v}
    assert not bad, f"{what}: {bad}"
    return report


def kill_postgres(store: VectorStore) -> int:
    """SIGKILL the embedded postmaster (a crash, not a clean stop); returns its pid."""
    assert store.server is not None, "the fault tests need the embedded server"
    pid = store.server.get_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return pid


def wait_until_serving(client: TestClient, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /ready until the store is back (the service restarts the embedded server itself)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        res = client.get("/ready")
        body = res.json()
        if res.status_code == 200:
            return body
        time.sleep(0.5)
    raise AssertionError(f"the service did not recover within {timeout} s: {body}")


# --- 1. API fuzzing -----------------------------------------------------------------------------


def fuzz(app: Any, examples: int) -> dict[str, Any]:
    """Schemathesis against the app's own OpenAPI schema: positive and negative cases per operation,
    every response checked (no 5xx, status documented, body matches the schema, auth not ignored,
    schema-invalid input refused). Returns counts and the distinct failures found."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # A schema-valid request can still be refused: STD values ("dress", "navy") are plain strings
    # in the schema but checked against the attribute vocabulary (422 naming the allowed values),
    # and a PUT's path id must equal its body's. Every other check runs.
    excluded = [schemathesis.checks.positive_data_acceptance]
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    failures: dict[tuple[str, str], str] = {}
    unnamed_4xx: list[str] = []
    def runner(op: Any, mode: GenerationMode) -> Any:
        @given(case=op.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            # every case carries the key so write endpoints get past auth; ignored_auth checks the rest
            try:
                res = case.call_and_validate(headers=AUTH, excluded_checks=excluded)
            except Exception as exc:
                codes = re.findall(r"- (ST\d+ [^\n]*)", str(exc)) or [f"{type(exc).__name__}: {str(exc)[:200]}"]
                for code in codes:
                    failures.setdefault((op.label, code), case.as_curl_command()[:400])
                return
            statuses[(op.label, res.status_code)] += 1
            if 400 <= res.status_code < 500:
                detail = res.json().get("detail") if "json" in res.headers.get("content-type", [""])[0] else None
                if not isinstance(detail, str) or len(detail) < 5:
                    unnamed_4xx.append(f"{op.label} {res.status_code}: {res.text[:120]}")

        return run

    for mode in GenerationMode:
        for result in schema.get_all_operations():
            with contextlib.suppress(Unsatisfiable):  # no parameters to break (GET /health, negative mode)
                runner(result.ok(), mode)()
    total = sum(statuses.values()) + len(failures)
    by_status = collections.Counter(status for (_, status) in statuses.elements())
    return {"requests": total, "by_status": dict(sorted(by_status.items())), "failures": failures,
            "unnamed_4xx": unnamed_4xx, "per_operation": collections.Counter(op for op, _ in statuses.elements())}


def _assert_fuzz(report: dict[str, Any], minimum: int) -> None:
    print(f"[fuzz] {report['requests']} requests; by status {report['by_status']}; "
          f"per operation {dict(report['per_operation'])}")
    print(f"[fuzz] failures: {len(report['failures'])}; 4xx without a message: {len(report['unnamed_4xx'])}")
    assert not report["failures"], "\n".join(f"{k}: {v}" for k, v in report["failures"].items())
    assert not report["unnamed_4xx"], report["unnamed_4xx"][:5]
    assert report["requests"] >= minimum
    assert not any(s >= 500 for s in report["by_status"]), report["by_status"]
    assert report["by_status"].get(201, 0) > 0, "the fuzzer never got a product in: the write path went untested"


def test_fuzz_api_quick(client: TestClient, rel_service: RecommendService, catalogue: list[str]) -> None:
    report = fuzz(client.app, examples=8)
    _assert_fuzz(report, minimum=100)
    check_consistency(rel_service, set(catalogue) - _deleted(rel_service), "after the quick fuzz run")


@pytest.mark.slow
def test_fuzz_api_1000_requests(client: TestClient, rel_service: RecommendService, catalogue: list[str]) -> None:
    report = fuzz(client.app, examples=80)
    _assert_fuzz(report, minimum=1000)
    check_consistency(rel_service, set(catalogue) - _deleted(rel_service), "after 1,000+ fuzzed requests")


def _deleted(service: RecommendService) -> set[str]:
    """ShopState ids the fuzzer deleted (a DELETE with a real id is a legitimate request)."""
    store = service.store()
    assert store is not None
    with store.connection() as conn:
        present = {r[0] for r in conn.execute("SELECT item_id FROM items").fetchall()}
    import pandas as pd

    ids = pd.read_parquet(service.settings.paths.dataset("hm") / "items.parquet")["item_id"].astype(str)
    return set(ids) - present


# --- 2. bad input -------------------------------------------------------------------------------

INJECTIONS = [
    "'; DROP TABLE items; --", "\" OR 1=1 --", "Robert'); DELETE FROM items WHERE ('1'='1",
    "<script>alert(1)</script>", "{{7*7}} ${7*7} %s %(q)s", "../../etc/passwd", "ünïcödé 漢字 🧥👗 ‮RTL",
    "\u200b\u200d zero width", "a" * 190,
]


def test_bad_input_is_a_clear_4xx_and_stores_nothing(client: TestClient, rel_service: RecommendService,
                                                       catalogue: list[str]) -> None:
    store = rel_service.store()
    assert store is not None
    before = store.consistency(rel_service.model_id or "")
    big = rel_service.settings.serve_max_body_bytes
    cases: list[tuple[str, str, Any, int, str]] = [  # method, path, JSON body (or raw bytes), status, named in detail
        ("POST", "/items", b'{"item_id": "x1", "title": ', 422, "JSON decode"),
        ("POST", "/items", b"\xff\xfe\x00garbage", 422, ""),
        ("POST", "/items", [1, 2, 3], 422, "body"),
        ("POST", "/items", {"item_id": "x1"}, 422, "body.title"),
        ("POST", "/items", product("x1", price="12"), 422, "body.price"),
        ("POST", "/items", product("x1", price=-1), 422, "body.price"),
        ("POST", "/items", product("x1", stock=True), 422, "body.stock"),
        ("POST", "/items", product("x1", columns={"product_type_name": 5}), 422, "body.columns"),
        ("POST", "/items", product("x1", title="nul \x00 byte"), 422, "body.title"),
        ("POST", "/items", product("x1", description="x" * 5001), 422, "body.description"),
        ("POST", "/items", product("x1", attributes={"color": ["plaid-ish"]}), 422, "body.attributes"),
        ("POST", "/items", product("x1", surprise=1), 422, "body.surprise"),
        ("POST", "/items", product("'; DROP TABLE items; --"), 422, "body.item_id"),
        ("POST", "/items", {**product("x1"), "description": "y" * (big + 10)}, 413, "bytes"),
        ("PUT", "/items/x2", product("x3"), 422, "item_id"),
        ("DELETE", "/items/no-such-item", None, 404, "unknown item"),
        ("GET", "/items/no-such-item", None, 404, "unknown item"),
        ("GET", "/items/no-such-item/similar", None, 404, "unknown item"),
        ("GET", f"/items/{catalogue[0]}/similar?k=0", None, 422, "query.k"),
        ("GET", f"/items/{catalogue[0]}/similar?k=101", None, 422, "query.k"),
        ("GET", "/items?limit=-1", None, 422, "query.limit"),
        ("GET", "/items?min_price=abc", None, 422, "query.min_price"),
        ("GET", "/items?query=%00", None, 422, "query.query"),
        ("POST", "/recommend", {"k": 0}, 422, "body.k"),
        ("POST", "/recommend", {"k": 101}, 422, "body.k"),
        ("POST", "/recommend", {"k": "12"}, 422, "body.k"),
        ("POST", "/recommend", {"k": True}, 422, "body.k"),
        ("POST", "/recommend", {"profile": {"height_cm": -170}}, 422, "body.profile.height_cm"),
        ("POST", "/recommend", {"profile": {"height_cm": 1.7}}, 422, "body.profile.height_cm"),
        ("POST", "/recommend", {"profile": {"weight_kg": 9999}}, 422, "body.profile.weight_kg"),
        ("POST", "/recommend", {"profile": {"age": 500}}, 422, "body.profile.age"),
        ("POST", "/recommend", b'{"profile": {"height_cm": NaN}}', 422, "body.profile.height_cm"),
        ("POST", "/recommend", b'{"filters": {"max_price": Infinity}}', 422, "body.filters.max_price"),
        ("POST", "/recommend", {"cart": "0108775015"}, 422, "body.cart"),
        ("POST", "/recommend", {"cart": ["a\x00b"]}, 422, "body.cart.0"),
        ("POST", "/recommend", b'{"context": "lone \\ud800 surrogate"}', 422, "body.context"),
        ("POST", "/recommend", {"cart": ["x"] * 51}, 422, "body.cart"),
        ("POST", "/recommend", {"context": "c" * 501}, 422, "body.context"),
    ]
    tried = collections.Counter()
    for method, path, body, status, named in cases:
        kw: dict[str, Any] = {"headers": {**AUTH, "content-type": "application/json"}}
        if isinstance(body, bytes):
            kw["content"] = body
        elif body is not None:
            kw["content"] = json.dumps(body).encode()
        res = client.request(method, path, **kw)
        assert res.status_code == status, (method, path, str(body)[:80], res.status_code, res.text[:300])
        detail = res.json()["detail"]
        assert isinstance(detail, str) and named in detail, (path, named, detail)
        assert "Traceback" not in res.text
        tried[status] += 1
    # Accepted odd-but-valid input: empty histories, unknown ids, injection and unicode strings in
    # every text field; all SQL is parameterised, so they are data, stored and returned verbatim.
    ok = [{}, {"recent_item_ids": [], "cart": []}, {"user_id": "nobody"}, {"cart": ["no-such-item"], "k": 100},
          {"context": INJECTIONS[0], "profile": {"body_type": INJECTIONS[1]}, "user_id": INJECTIONS[2]},
          {"cart": INJECTIONS[:5], "recent_item_ids": INJECTIONS[5:-1]}]
    for body in ok:
        res = client.post("/recommend", json=body)
        assert res.status_code == 200 and res.json()["items"], (body, res.text[:300])
        tried[200] += 1
    for i, text in enumerate(INJECTIONS):
        item_id = f"inj-{i}"
        body = product(item_id, title=text[:200], description=text, brand=text[:100], group_id=text[:128],
                       columns={"product_type_name": text[:500], "colour_group_name": "Black"})
        res = client.post("/items", json=body, headers=AUTH)
        assert res.status_code == 201, res.text[:300]
        got = client.get(f"/items/{item_id}").json()
        assert got["title"] == text[:200] and got["description"] == text
        search = client.get("/items", params={"query": text[:200]})
        assert search.status_code == 200
        assert client.delete(f"/items/{item_id}", headers=AUTH).status_code == 204
        tried[201] += 1
    after = store.consistency(rel_service.model_id or "")
    print(f"[bad input] {len(cases)} bad requests -> {dict(tried)}; items before {before['items']}, "
          f"after {after['items']}; injection strings stored verbatim and removed: {len(INJECTIONS)}")
    assert after["items"] == before["items"] and after["vectors"] == before["vectors"], "something was stored"
    check_consistency(rel_service, None, "after bad input")


# --- 4. auth ------------------------------------------------------------------------------------


def test_writes_need_the_key_compared_in_constant_time_and_never_logged(
    client: TestClient, rel_service: RecommendService, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hmac

    compared: list[int] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr("atelier.serve.deps.hmac.compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    store = rel_service.store()
    assert store is not None
    before = len(live_ids(store))
    writes = [("POST", "/items", product("auth-x")), ("PUT", "/items/auth-x", product("auth-x")),
              ("DELETE", "/items/auth-x", None)]
    headers = [({}, 401), ({"X-API-Key": ""}, 401), ({"X-API-Key": "wrong"}, 403),
               ({"X-API-Key": API_KEY[:-1]}, 403), ({"X-API-Key": API_KEY + "x"}, 403),
               ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": f"Basic {API_KEY}"}, 401)]
    n = 0
    for method, path, body in writes:
        for hdr, status in headers:
            res = client.request(method, path, json=body, headers=hdr)
            assert res.status_code == status, (method, hdr, res.status_code, res.text)
            assert res.json()["detail"], res.text
            n += 1
    assert len(live_ids(store)) == before, "a rejected write stored something"
    assert len(compared) >= 12, "wrong keys must go through hmac.compare_digest"
    # the right key works (header or bearer), and neither the key nor the attempt leaks into logs
    assert client.post("/items", json=product("auth-x"), headers=AUTH).status_code == 201
    assert client.delete("/items/auth-x", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 204
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert API_KEY not in logged
    errors_file = rel_service.settings.paths.serve_errors
    assert not errors_file.is_file() or API_KEY not in errors_file.read_text()
    schema = client.get("/openapi.json").json()
    assert {"APIKeyHeader", "HTTPBearer"} <= set(schema["components"]["securitySchemes"])
    print(f"[auth] {n} unauthorised writes rejected (401/403), {len(compared)} constant-time comparisons, "
          f"0 stored, key absent from {len(caplog.records)} log records")


def test_reads_expose_no_internal_fields(client: TestClient, rel_service: RecommendService,
                                         catalogue: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from atelier.serve.schemas import Item

    allowed = set(Item.model_fields)
    item = client.get(f"/items/{catalogue[0]}").json()
    assert set(item) <= allowed, set(item) - allowed
    rec = client.post("/recommend", json={"cart": catalogue[:2], "k": 5}).json()
    extra = set(Item.model_fields) | {"score", "stage", "explanation"}
    assert all(set(i) <= extra for i in rec["items"])

    class Leaky:
        name = "leaky-llm"

        def __call__(self, product: Any) -> Any:
            raise RuntimeError("backend exploded")

    monkeypatch.setattr(rel_service, "enricher", Leaky())
    failed = client.post("/items", json=product("leak-1"), headers=AUTH)
    assert failed.status_code == 502
    text = failed.text
    for secret in ("Traceback", "File \"", "system", "prompt", API_KEY):
        assert secret not in text, (secret, text)
    print(f"[reads] item fields {sorted(item)}; recommendation fields within {sorted(extra)}; 502 body "
          f"{len(text)} chars, no trace or prompt")


# --- 3. faults ----------------------------------------------------------------------------------


def test_database_killed_during_recommend_and_upsert(client: TestClient, rel_service: RecommendService,
                                                      catalogue: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    store = rel_service.store()
    assert store is not None
    expected = live_ids(store)
    assert client.post("/recommend", json={"cart": catalogue[:2], "k": 6}).json()["stage"] == "content"

    # recommend: the server dies between two requests' store calls
    kill_postgres(store)
    t0 = time.monotonic()
    res = client.post("/recommend", json={"cart": catalogue[:2], "k": 6})
    first_s = time.monotonic() - t0
    body = res.json()
    assert res.status_code == 200 and body["degraded"] and len(body["items"]) == 6, body
    assert body["stage"] == "popularity" and all(i["title"] for i in body["items"])
    t0 = time.monotonic()
    again = client.post("/recommend", json={"cart": catalogue[:2], "k": 6}).json()
    assert again["degraded"] and time.monotonic() - t0 < 1.0, "the breaker must answer at once"
    assert client.get("/ready").status_code == 503
    assert client.get(f"/items/{catalogue[0]}").status_code == 503
    print(f"[fault: db killed during recommend] first answer {first_s:.1f} s (degraded, {len(body['items'])} "
          f"items), then at once")

    # the service restarts the embedded server by itself, and answers fully again
    ready = wait_until_serving(client)
    assert ready["store"] == "ok"
    assert client.post("/recommend", json={"cart": catalogue[:2], "k": 6}).json()["stage"] == "content"
    check_consistency(rel_service, expected, "after the db was killed during recommend")

    # upsert: the server dies after enrichment and encoding, right before the transaction
    encoder = rel_service.encoder
    assert encoder is not None
    real_encode = encoder.encode
    current = rel_service.store()
    assert current is not None

    def encode_then_crash(items: Any) -> Any:
        vectors = real_encode(items)
        kill_postgres(current)
        return vectors

    monkeypatch.setattr(encoder, "encode", encode_then_crash)
    res = client.post("/items", json=product("crash-upsert-1"), headers=AUTH)
    assert res.status_code == 503, res.text
    monkeypatch.setattr(encoder, "encode", real_encode)
    degraded = client.post("/recommend", json={"k": 3}).json()
    assert degraded["degraded"] and len(degraded["items"]) == 3
    wait_until_serving(client)
    assert client.get("/items/crash-upsert-1").status_code == 404, "a failed upsert stored a row"
    check_consistency(rel_service, expected, "after the db was killed during an upsert")
    rerun = client.post("/items", json=product("crash-upsert-1"), headers=AUTH)
    assert rerun.status_code == 201, rerun.text
    report = check_consistency(rel_service, expected | {"crash-upsert-1"}, "after the upsert was re-run")
    assert client.delete("/items/crash-upsert-1", headers=AUTH).status_code == 204
    print(f"[fault: db killed during upsert] 503, nothing stored, re-run 201; items {report['items']}")


def test_database_killed_during_an_index_load(rel_settings: Settings, rel_service: RecommendService,
                                              client: TestClient) -> None:
    from atelier.pipeline.item_tower import index_stage

    # a product added through the API since `atelier encode` must keep its vector through a re-index
    assert client.post("/items", json=product("live-before-reindex"), headers=AUTH).status_code == 201
    store = rel_service.store()
    assert store is not None
    expected = live_ids(store)
    assert "live-before-reindex" in expected
    pointer = rel_settings.run_dir / "index" / "hm.json"
    pointer_before = pointer.read_bytes()
    killed: list[int] = []

    def crash_mid_copy(stage: str, done: int, total: int) -> None:
        if stage in ("copy", "index") and not killed:
            killed.append(kill_postgres(store))

    with pytest.raises(StoreError):
        index_stage(rel_settings, "hm", progress=crash_mid_copy)
    assert killed, "the load never reached the copy step"
    assert pointer.read_bytes() == pointer_before, "a failed load moved the live model pointer"
    # serving continues, degraded, while the server is down; then it restarts it
    res = client.post("/recommend", json={"k": 4})
    assert res.status_code == 200 and len(res.json()["items"]) == 4
    wait_until_serving(client)
    check_consistency(rel_service, expected, "after the db was killed mid-load (old vectors still live)")
    report = index_stage(rel_settings, "hm")  # the re-run completes
    assert report["ok"], report["problems"]
    assert live_model_id(rel_settings.paths, "hm") == rel_service.model_id
    wait_until_serving(client)
    after = check_consistency(rel_service, expected, "after the index load was re-run")
    assert report["kept_live"] >= 1 and client.get("/items/live-before-reindex/similar").status_code == 200
    assert client.delete("/items/live-before-reindex", headers=AUTH).status_code == 204
    print(f"[fault: db killed during index load] load failed cleanly, pointer unchanged, re-run loaded "
          f"{report['rows']} vectors ({report['kept_live']} live-ingested kept); consistency {after}")


class _Stub:
    """A loopback OpenAI-compatible server whose answers the test scripts (tests/openai_stub.py)."""

    def __init__(self) -> None:
        from tests.openai_stub import Stub, make_handler

        self.state = Stub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_llm_server_hangs_returns_garbage_or_500s(client: TestClient, rel_service: RecommendService,
                                                  catalogue: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from atelier.serve.products import make_enricher

    stub = _Stub()
    try:
        llm = rel_service.settings.model_copy(update={
            "llm_backend": "openai", "llm_base_url": stub.url, "llm_model": "stub-model", "llm_timeout_s": 0.5,
            "llm_max_retries": 1})
        monkeypatch.setattr(rel_service, "enricher", make_enricher("llm", "hm", llm))
        store = rel_service.store()
        assert store is not None
        expected = live_ids(store)
        outcomes = {}
        for mode in ("500", "garbage", "not_json_content", "hang"):
            stub.state.default = "ok" if mode == "hang" else mode
            stub.state.delay = 3.0 if mode == "hang" else 0.0
            item_id = f"llm-{mode.replace('_', '-')}"
            t0 = time.monotonic()
            res = client.post("/items", json=product(item_id), headers=AUTH)
            took = time.monotonic() - t0
            assert res.status_code == 502 and "nothing was stored" in res.json()["detail"], (mode, res.text)
            assert took < 10, f"{mode}: the request waited {took:.1f} s"
            assert client.get(f"/items/{item_id}").status_code == 404
            rec = client.post("/recommend", json={"cart": catalogue[:1], "k": 3}).json()
            assert rec["items"] and not rec["degraded"], "the service must keep answering"
            outcomes[mode] = f"502 in {took:.1f} s"
        # the LLM recovers: the re-run of every product completes
        stub.state.default, stub.state.delay = "ok", 0.0
        for mode in outcomes:
            res = client.post("/items", json=product(f"llm-{mode.replace('_', '-')}"), headers=AUTH)
            assert res.status_code == 201, res.text
        ids = {f"llm-{m.replace('_', '-')}" for m in outcomes}
        check_consistency(rel_service, expected | ids, "after the LLM faults and the re-run")
        records = [json.loads(line) for line in rel_service.settings.paths.serve_errors.read_text().splitlines()]
        assert {r["item_id"] for r in records} >= ids
        for item_id in ids:
            assert client.delete(f"/items/{item_id}", headers=AUTH).status_code == 204
        print(f"[fault: LLM] {outcomes}; re-run stored {len(ids)}; {len(records)} failures recorded")
    finally:
        stub.close()


# --- 3. full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (as root), else skip: the real ENOSPC of a full run folder."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> int:
    """Fill a filesystem to the last byte (unbuffered writes, halving the chunk at each ENOSPC)."""
    written, chunk = 0, 1 << 20
    with (folder / "filler").open("wb", buffering=0) as fh:
        while chunk:
            try:
                written += fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk //= 2
    return written


def test_full_disk_keeps_old_artifacts_and_the_service_answers(
    small_disk: Path, client: TestClient, rel_service: RecommendService, rel_settings: Settings,
    catalogue: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from atelier.atomic import write_json
    from atelier.models.item_tower import load_checkpoint, save_checkpoint

    # artifacts: a checkpoint and a report that exist, then a disk with no byte left
    model, payload = load_checkpoint(rel_settings.paths.item_tower("hm"))
    ckpt, report = small_disk / "models" / "item_tower-hm.pt", small_disk / "reports" / "hm.json"
    save_checkpoint(model, ckpt, payload["vocab"], {"dataset": "hm"})
    write_json(report, {"version": 1})
    old_ckpt, old_report = ckpt.read_bytes(), report.read_bytes()
    filled = fill(small_disk)
    failed = 0
    for attempt in (lambda: save_checkpoint(model, ckpt, payload["vocab"], {"dataset": "hm", "v": 2}),
                    lambda: write_json(report, {"version": 2, "pad": "x" * 100_000})):
        # torch wraps the ENOSPC of its zip writer in a RuntimeError; json writes raise it as is
        with pytest.raises((OSError, RuntimeError)) as info:
            attempt()
        chain = [info.value, info.value.__context__, info.value.__cause__]
        assert any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain), repr(info.value)
        failed += 1
    assert ckpt.read_bytes() == old_ckpt and report.read_bytes() == old_report, "a failed write touched the file"
    load_checkpoint(ckpt)  # still loads
    leftovers = [p.name for p in small_disk.rglob(".*.tmp")]
    assert not leftovers, leftovers

    # the service's own writes: its failed-ingest log lives on the full disk
    serve_dir = rel_settings.paths.serve_errors.parent
    monkeypatch.setattr(rel_service, "error_log", small_disk / "serve" / "errors.jsonl")

    class Broken:
        name = "broken"

        def __call__(self, product: Any) -> Any:
            raise TimeoutError("LLM timed out")

    monkeypatch.setattr(rel_service, "enricher", Broken())
    res = client.post("/items", json=product("disk-full-1"), headers=AUTH)
    assert res.status_code == 502, res.text  # not a 500 from the log write
    assert client.post("/recommend", json={"cart": catalogue[:1], "k": 3}).json()["items"]
    # space back: the re-run completes
    (small_disk / "filler").unlink()
    save_checkpoint(model, ckpt, payload["vocab"], {"dataset": "hm", "v": 2})
    assert load_checkpoint(ckpt)[1]["v"] == 2
    print(f"[fault: full disk] {filled // 1024} KiB filler on a 16 MiB tmpfs; {failed} artifact writes failed with "
          f"ENOSPC leaving the old files intact and no temp files; ingest answered 502 not 500; "
          f"after freeing space the re-run wrote the new checkpoint (serve log dir {serve_dir.name} untouched)")


# --- 3. kill -9 of an enrichment job --------------------------------------------------------------

_ENRICH_JOB = """
import sys
from pathlib import Path
from atelier.config import Settings
from atelier.enrich import enrich_dataset
from atelier.enrich.fake import FakeExtractor
settings = Settings.model_validate({"run_dir": Path(sys.argv[1]), "DATABASE_URL": ""})
enrich_dataset(settings, "hm", FakeExtractor(delay=float(sys.argv[2]), concurrency=4), limit=int(sys.argv[3]))
"""


@pytest.mark.slow
def test_kill_9_enrichment_job_mid_batch_then_rerun(rel_settings: Settings) -> None:
    from atelier.enrich import PROMPT_VERSION, EnrichCache, EnrichOptions, cache_path, enrich_dataset, load_products
    from atelier.enrich.core import cache_key, prepare
    from atelier.enrich.fake import FakeExtractor
    from atelier.schema import load_schema

    total, cache = 300, cache_path(rel_settings)
    cache.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _ENRICH_JOB, str(rel_settings.run_dir), "0.03", str(total)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.is_file() and cache.read_bytes().count(b"\n") >= 60:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with EnrichCache(cache) as log:
        finished, torn = len(log), log.torn_lines
        # identical catalogue rows share a cache key: count products and keys separately
        schema, fake = load_schema(), FakeExtractor(concurrency=4)
        keys_of = [cache_key(prepare(p, schema, EnrichOptions()).input_hash, PROMPT_VERSION, fake.model_id)
                   for p in load_products(rel_settings, "hm", total, schema)]
        unfinished = sum(k not in log for k in keys_of)
    assert 30 <= finished < len(set(keys_of)), f"killed after {finished} of {total}"
    summary = enrich_dataset(rel_settings, "hm", fake, limit=total)
    lines = (rel_settings.run_dir / "items" / "hm.enriched.jsonl").read_text().splitlines()
    ids = [json.loads(line)["item_id"] for line in lines]
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()
            if line.startswith("{") and line.endswith("}")]
    print(f"[fault: kill -9 enrichment] killed after {finished}/{total} (torn lines {torn}); re-run asked "
          f"{len(fake.calls)}, cached {summary.cached}; items file {len(ids)} rows, {len(set(ids))} distinct; "
          f"cache {len(keys)} records, {len(set(keys))} distinct")
    assert summary.total == total and summary.errors == 0 and summary.cached == total - unfinished
    assert len(fake.calls) == unfinished, "finished products were asked again"
    assert len(ids) == len(set(ids)) == total, "lost or duplicated enrichment records"
    with EnrichCache(cache) as log:
        assert len(log) == len(set(keys_of)) == len(set(keys)), "lost cache records"


# --- 6. crash-safe artifacts ----------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path: Path) -> None:
    from atelier.atomic import atomic_write, write_json

    path = tmp_path / "reports" / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_write(path, "w") as fh:
        fh.write('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"], "temp file left behind"
    assert oct(path.stat().st_mode & 0o777) == "0o644"


_SAVER = """
import sys, torch
from pathlib import Path
from atelier.atomic import atomic_write
path, i = Path(sys.argv[1]), 0
while True:
    i += 1
    with atomic_write(path) as fh:
        torch.save({"i": i, "w": torch.full((256, 1024), float(i))}, fh)
    print(i, flush=True)
"""


def test_kill_9_while_saving_checkpoints_never_leaves_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    saved = 0
    for _ in range(5):  # let it write a few, then kill it mid-write of the next
        saved = int(proc.stdout.readline())
    time.sleep(0.013)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    payload = torch.load(path, weights_only=True)
    assert payload["i"] >= saved and float(payload["w"][0, 0]) == payload["i"]
    print(f"[artifacts] writer killed after {saved} saves; checkpoint {payload['i']} loads whole; "
          f"{len(list(tmp_path.glob('.*.tmp')))} temp files left (ignored by loaders)")


def test_corrupt_or_mismatched_checkpoints_fail_loudly(tmp_path: Path, rel_settings: Settings) -> None:
    from atelier.models.item_tower import CheckpointError, load_checkpoint, save_checkpoint

    model, payload = load_checkpoint(rel_settings.paths.item_tower("hm"))
    good = tmp_path / "good.pt"
    save_checkpoint(model, good, payload["vocab"], {})
    raw = good.read_bytes()
    cases: dict[str, tuple[bytes | dict[str, Any], str]] = {
        "truncated": (raw[: len(raw) // 2], "unreadable checkpoint"),
        "empty": (b"", "unreadable checkpoint"),
        "garbage": (os.urandom(4096), "unreadable checkpoint"),
        "not a tower": ({"kind": "ranker", "format": 1}, "not a checkpoint of the item tower"),
        "future format": ({**torch.load(good, weights_only=False), "format": 99}, "format 99"),
        "config mismatch": ({**torch.load(good, weights_only=False),
                             "config": {**payload["config"], "d_model": 64}}, "do not match"),
        "unknown config key": ({**torch.load(good, weights_only=False),
                                "config": {**payload["config"], "new_knob": 1}}, "do not match"),
        "no weights": ({k: v for k, v in torch.load(good, weights_only=False).items() if k != "state_dict"}, "lacks"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.pt"
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            torch.save(content, bad)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(bad)
    print(f"[artifacts] {len(cases)} corrupt or mismatched checkpoints -> CheckpointError naming the file")


def test_changed_checkpoint_blocks_ingest_instead_of_mixing_spaces(rel_settings: Settings,
                                                                  rel_service: RecommendService) -> None:
    """A checkpoint replaced after `atelier index` must not encode new products into another space."""

    ckpt = rel_settings.paths.item_tower("hm")
    original = ckpt.read_bytes()
    try:
        ckpt.write_bytes(original[:-10] + b"0123456789")  # a different file (its hash changes)
        svc = RecommendService(rel_settings, shop=rel_service.shop, warm_up=False)
        try:
            assert svc.encoder is None and "changed since" in (svc.ingest_blocker or "")
            with TestClient(create_app(rel_settings, service=svc)) as c:
                res = c.post("/items", json=product("mixed-1"), headers=AUTH)
                assert res.status_code == 503 and "ingest is unavailable" in res.json()["detail"]
                assert c.get("/ready").json()["ingest"] != "ready"
                assert c.post("/recommend", json={"k": 3}).status_code == 200
        finally:
            svc.close()
    finally:
        ckpt.write_bytes(original)
    print("[artifacts] a checkpoint changed after indexing: ingest refused (503), reads still served")


def test_open_store_restarts_a_stopped_embedded_server(rel_settings: Settings, rel_service: RecommendService,
                                                      client: TestClient) -> None:
    store = rel_service.store()
    assert store is not None
    pid = kill_postgres(store)
    again = open_store(rel_settings)
    try:
        assert again.server is not None and again.server.get_pid() != pid
        with again.connection() as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()
    finally:
        again.close()
    wait_until_serving(client)
    print(f"[store] embedded postmaster {pid} killed; open_store started {again.server.get_pid()}")


def test_cache_hit_of_an_identical_product_keeps_its_own_id_and_price(tmp_path: Path) -> None:
    """Regression (found by the kill -9 test): catalogue rows with the same text share a cache key,
    and a hit used to come back under the first row's id, so one product was lost and one doubled."""
    from atelier.enrich import EnrichCache, RawProduct, enrich_products
    from atelier.enrich.fake import FakeExtractor

    twins = [RawProduct(item_id=f"twin-{i}", title="Black jersey dress", description="Short dress.",
                        service={"price": 0.01 * (i + 1)}) for i in range(3)]
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        first = enrich_products(twins[:1], FakeExtractor(), cache)
        fake = FakeExtractor()
        again = enrich_products(twins, fake, cache)
    assert first[0].item is not None and len(fake.calls) == 0, "the twins should be cache hits"
    assert [r.item_id for r in again] == [t.item_id for t in twins]
    assert [r.item.item_id for r in again if r.item] == [t.item_id for t in twins]
    assert [r.item.service.price for r in again if r.item] == [0.01, 0.02, 0.03]
    assert all(r.item and r.item.clothes == first[0].item.clothes for r in again)
    print(f"[enrich cache] {len(twins)} identical products, 1 model call, {len({r.item_id for r in again})} ids back")
