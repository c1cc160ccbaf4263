"""The OpenAI-compatible backend against a real HTTP server on loopback speaking the protocol.

The stub is a ``ThreadingHTTPServer`` in a thread: it answers ``POST /v1/chat/completions`` with a
chat completion whose content fills the requested JSON schema (first enum value per field), or
misbehaves on demand: slow, HTTP 500, a 200 whose body is garbage, content that is not JSON, or
a 400 (or llama-cpp-python's 500) for servers without ``json_schema`` support.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from atelier.enrich import EnrichCache, EnrichOptions, RawProduct, enrich_product, enrich_products
from atelier.enrich.openai_backend import OpenAIExtractor
from tests.openai_stub import Stub, make_handler

VEST = RawProduct(item_id="0108775015", title="Strap top", description="Jersey top with narrow shoulder straps.",
                  known={"category": ["02top_08vesttop"], "category_specification": ["top"]})
SMALL = EnrichOptions(fields=("color", "season"), re_fields=("style",))


@pytest.fixture
def stub_server() -> Iterator[tuple[Stub, str]]:
    """A live stub server on a free loopback port; yields (state, base_url)."""
    stub = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def backend(url: str, **kw: Any) -> OpenAIExtractor:
    """A backend with fast backoff so failure tests take milliseconds, not seconds."""
    opts: dict[str, Any] = {"timeout": 5.0, "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05}
    opts.update(kw)
    return OpenAIExtractor(url, "stub-model", api_key="k", **opts)


def test_schema_constrained_request_and_parsed_answer(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    result = enrich_product(VEST, backend(url), options=SMALL)
    assert result.status == "ok", result.error
    assert result.item is not None and result.item.clothes["color"] == ["black"]
    assert result.item.reinforced_feature_value == {"style": ["stub phrase"]}
    sent = stub.requests[0]
    assert sent["model"] == "stub-model" and sent["response_format"]["type"] == "json_schema"
    assert "black" in sent["response_format"]["json_schema"]["schema"]["properties"]["color"]["enum"]
    assert result.backend == "openai:stub-model"


def test_500s_are_retried_with_backoff(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.script = ["500", "500"]
    ext = backend(url)
    result = enrich_product(VEST, ext, options=SMALL)
    assert result.status == "ok" and ext.retries == 2 and len(stub.requests) == 3


def test_persistent_500_becomes_an_error_record(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.default = "500"
    result = enrich_product(VEST, backend(url, max_retries=2), options=SMALL)
    assert result.status == "error" and "InternalServerError" in (result.error or "")
    assert len(stub.requests) == 3  # first try + 2 retries, then it gives up
    assert result.error_record()["backend"] == "openai:stub-model"


def test_slow_server_times_out_then_recovers(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.script = ["slow"]
    ext = backend(url, timeout=0.5)
    start = time.perf_counter()
    result = enrich_product(VEST, ext, options=SMALL)
    assert result.status == "ok" and ext.retries == 1
    assert time.perf_counter() - start < 1.4  # it did not wait for the slow answer
    stub.default = "slow"
    failed = enrich_product(VEST, backend(url, timeout=0.3, max_retries=1), options=SMALL)
    assert failed.status == "error" and "Timeout" in (failed.error or "")


def test_garbage_body_is_retried(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.script = ["garbage"]
    ext = backend(url)
    result = enrich_product(VEST, ext, options=SMALL)
    assert result.status == "ok" and ext.retries == 1
    stub.default = "garbage"
    failed = enrich_product(VEST, backend(url, max_retries=1), options=SMALL)
    assert failed.status == "error" and failed.item is None


def test_non_json_content_is_asked_again_then_recorded(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.script = ["not_json_content"]
    result = enrich_product(VEST, backend(url), options=SMALL)
    assert result.status == "repaired" and result.attempts == 2
    assert stub.requests[1]["temperature"] > 0  # the retry samples
    stub.default = "not_json_content"
    failed = enrich_product(VEST, backend(url), options=SMALL)
    assert failed.status == "error" and failed.raw == "Sure! The colour is black." and failed.attempts == 3


@pytest.mark.parametrize("mode", ["no_json_schema", "llama_server"])
def test_server_without_json_schema_falls_back_to_json_object_with_schema(stub_server: tuple[Stub, str],
                                                                          mode: str) -> None:
    stub, url = stub_server
    stub.default = mode
    ext = backend(url)
    result = enrich_product(VEST, ext, options=EnrichOptions(fields=("color",), re_fields=()))
    assert result.status == "ok" and result.item is not None and result.item.clothes["color"] == ["black"]
    sent = stub.requests[-1]["response_format"]
    assert sent["type"] == "json_object" and "black" in sent["schema"]["properties"]["color"]["enum"]
    assert ext.retries == 0  # a format the server lacks is not a transient failure


def test_server_without_any_schema_falls_back_to_plain_json_object(stub_server: tuple[Stub, str]) -> None:
    stub, url = stub_server
    stub.default = "plain_json_object"
    result = enrich_product(VEST, backend(url), options=EnrichOptions(fields=("color",), re_fields=()))
    assert result.status == "ok" and stub.requests[-1]["response_format"] == {"type": "json_object"}


def test_bounded_concurrency_against_a_slow_server(stub_server: tuple[Stub, str], tmp_path: Any) -> None:
    stub, url = stub_server
    stub.delay = 0.15
    items = [RawProduct(item_id=f"p{i}", title=f"Black top {i}") for i in range(12)]
    start = time.perf_counter()
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        results = enrich_products(items, backend(url, concurrency=4), cache, options=SMALL)
    wall = time.perf_counter() - start
    assert [r.item_id for r in results] == [p.item_id for p in items] and all(r.status == "ok" for r in results)
    assert 2 <= stub.max_in_flight <= 4
    assert wall < 12 * 0.15 * 0.6  # well under the serial time
