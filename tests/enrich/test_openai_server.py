"""The ``openai`` backend against a real OpenAI-compatible server: llama-cpp-python's own, on loopback.

The server (``python -m llama_cpp.server``, the ``server`` part of the ``llm`` extra) serves the embedded
Gemma 3 270M; a handful of real H&M products go through the normal enrichment path (prompt, JSON-schema
``response_format``, parse, validate, cache). Slow (the model answers on the CPU) and skipped without the
``llm`` extra (``make llm``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from atelier.enrich import EnrichCache, EnrichOptions, RawProduct, enrich_products
from atelier.enrich.openai_backend import OpenAIExtractor
from atelier.paths import GGUF_NAME
from atelier.schema import load_schema

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None,
        reason="llama-cpp-python[server] is not installed (run `make llm`)"),
]
REPO_GGUF = Path(__file__).resolve().parents[2] / "runs" / "models" / GGUF_NAME
ALIAS = "gemma3-270m-q4km-local"


def free_port() -> int:
    """A port nothing listens on (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server with the embedded model; yields its base URL."""
    import httpx

    from atelier.enrich.embedded import ensure_gguf

    gguf = ensure_gguf(REPO_GGUF if REPO_GGUF.is_file() else tmp_path_factory.mktemp("gguf") / GGUF_NAME)
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_openai_backend_enriches_real_products_through_llama_cpp_server(server: str, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    import httpx

    models = httpx.get(f"{server}/models", timeout=5).json()
    assert ALIAS in [m["id"] for m in models["data"]]
    articles = pd.read_csv(data_dir / "hm" / "articles.csv.gz", dtype=str, nrows=100).sample(3, random_state=2)
    products = [RawProduct(item_id=r.article_id, title=r.prod_name, description=r.detail_desc or "",
                           known={"category_specification": ["top"]}) for r in articles.itertuples(index=False)]
    extractor = OpenAIExtractor(server, ALIAS, concurrency=1, timeout=300, max_retries=1)
    assert extractor.model_id == f"openai:{ALIAS}"
    schema = load_schema()
    options = EnrichOptions(fields=("season", "fit"), re_fields=("fit",))
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        results = enrich_products(products, extractor, cache, schema, options)
        assert [r.item_id for r in results] == [p.item_id for p in products]
        for r in results:
            assert r.status in ("ok", "repaired"), (r.error, r.raw)
            assert r.item is not None and r.backend == f"openai:{ALIAS}"
            # schema-constrained on the server: every STD answer is an allowed value (or left out as unknown)
            for field, values in r.extracted["clothes"].items():
                assert field in ("season", "fit") and set(values) <= set(schema.std[field].values) | {"unknown"}
        # a second pass is answered from the cache, without the server
        again = enrich_products(products, extractor, cache, schema, options)
    assert all(r.cached for r in again)
