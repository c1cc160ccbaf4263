"""The LoRA log-likelihood backend (``embedded-ll-lora``): adapter loading, refusal of bad adapters, hybrid fallback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atelier.enrich import (
    BackendError,
    BackendUnavailable,
    EnrichCache,
    EnrichOptions,
    RawProduct,
    available_backends,
    enrich_product,
    enrich_products,
    get_extractor,
)
from atelier.enrich.fieldwise import FieldwiseExtractor, KeywordExtractor
from atelier.enrich.hybrid import FieldSource, FieldSources, HybridExtractor
from atelier.enrich.loglik import LogLikExtractor
from atelier.enrich.lora import ADAPTER_DIR, AdapterError, LoRALogLikExtractor, convert_adapter, read_adapter
from atelier.enrich.prompt import label_maps
from atelier.schema import load_schema

SCHEMA = load_schema()
SHIRT = RawProduct(item_id="p1", title="Navy Blue Men's Checked Shirt", description="")
ONLY_COLOR = EnrichOptions(full=True, fields=("color", "season"), re_fields=(), show_known=False)
needs_adapter = pytest.mark.skipif(not (ADAPTER_DIR / "adapter_model.safetensors").is_file(),
                                   reason="the committed adapter is not in this checkout")


def _copy_adapter(tmp_path: Path) -> Path:
    out = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, out)
    return out


def test_backend_is_registered() -> None:
    assert "embedded-ll-lora" in available_backends()


@needs_adapter
def test_committed_adapter_reads_as_llama_cpp_lora_pairs() -> None:
    cfg, tensors = read_adapter(ADAPTER_DIR)
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert len(tensors) == 18 * 7 * 2  # 18 blocks x 7 projections x (A, B)
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert a.dtype == np.float32 and a.shape == (16, 640) and b.shape[1] == 16
    assert np.abs(b).max() > 0  # trained: B is no longer the zero init


def test_missing_adapter_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"LoRA adapter not found: .*nowhere"):
        read_adapter(tmp_path / "nowhere")
    # At construction (before any model is loaded), and it is a BackendError like every backend failure.
    with pytest.raises(BackendError, match="not found"):
        LoRALogLikExtractor(tmp_path / "model.gguf", adapter_dir=tmp_path / "nowhere")


@needs_adapter
def test_corrupt_adapters_are_refused(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path)
    st = adapter / "adapter_model.safetensors"
    good = st.read_bytes()
    st.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(AdapterError, match=r"corrupt|not a readable"):
        read_adapter(adapter)
    st.write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="not a readable"):
        read_adapter(adapter)
    st.write_bytes(good)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterError, match="not a plain PEFT LoRA"):
        read_adapter(adapter)


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {}
    body = b""
    for name, arr in tensors.items():
        data = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_inconsistent_or_foreign_tensors_are_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    st = tmp_path / "adapter_model.safetensors"
    _safetensors(st, {f"{prefix}.lora_A.weight": np.ones((2, 8)), f"{prefix}.lora_B.weight": np.ones((4, 3))})
    with pytest.raises(AdapterError, match="inconsistent shapes"):
        read_adapter(tmp_path)
    _safetensors(st, {f"{prefix}.lora_A.weight": np.ones((2, 8))})
    with pytest.raises(AdapterError, match="incomplete"):
        read_adapter(tmp_path)
    _safetensors(st, {"base_model.model.model.layers.0.mlp.weird_proj.lora_A.weight": np.ones((2, 8))})
    with pytest.raises(AdapterError, match="unexpected adapter tensor"):
        read_adapter(tmp_path)
    _safetensors(st, {f"{prefix}.lora_A.weight": np.full((2, 8), np.nan), f"{prefix}.lora_B.weight": np.ones((4, 2))})
    with pytest.raises(AdapterError, match="NaN"):
        read_adapter(tmp_path)


@needs_adapter
def test_conversion_writes_a_gguf_lora(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    out = convert_adapter(ADAPTER_DIR, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 32.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert len(shapes) == 252
    # GGUF order (ne0, ne1): a = [in, r], b = [r, out], what llama.cpp checks against the base tensor.
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (2048, 16)
    assert shapes["blk.0.ffn_down.weight.lora_b"] == (16, 640)


# --------------------------------------------------------------------------- hybrid: never crash without it


class _Broken(FieldwiseExtractor):
    """An LLM scorer whose model cannot load here."""

    calls = 0

    @property
    def model_id(self) -> str:
        return "broken"

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        type(self).calls += 1
        raise BackendUnavailable("the embedded-ll backend needs llama-cpp-python: run `make llm`")


class _TooLong(_Broken):
    """An LLM scorer that runs, but fails one product (not a reason to drop the backend)."""

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        raise BackendError("product too long to score (9000 tokens > 8192)")


def _sources() -> FieldSources:
    return FieldSources(fields={"color": FieldSource("loglik_lora", "embedded-ll-lora", None, "keyword"),
                                "season": FieldSource("majority", None, "summer")}, re=None)


@pytest.fixture
def llama_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hybrid's start-up probe believes llama-cpp-python is installed (so failures happen while answering)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "llama_cpp" else real(name, *a))


@pytest.mark.usefixtures("llama_present")
def test_hybrid_falls_back_to_the_baseline_when_the_lora_backend_fails(caplog: pytest.LogCaptureFixture) -> None:
    hybrid = HybridExtractor(_sources(), backends={"embedded-ll-lora": _Broken(SCHEMA),
                                                   "keyword": KeywordExtractor(SCHEMA)}, schema=SCHEMA)
    with caplog.at_level("WARNING"):
        result = enrich_product(SHIRT, hybrid, schema=SCHEMA, options=ONLY_COLOR)
        again = enrich_product(SHIRT, hybrid, schema=SCHEMA, options=ONLY_COLOR)
    assert result.status == "ok" and again.status == "ok", result.issues
    assert result.extracted["clothes"]["color"] == ["navy"]  # keyword rules, the field's baseline
    assert result.extracted["clothes"]["season"] == ["summer"]
    assert "embedded-ll-lora is unavailable" in caplog.text
    assert hybrid.model_id.endswith("+down:embedded-ll-lora")
    # The first product found the source down while answering: its answer is the baseline's, so it is
    # recorded (and would be cached) under the +down id, never under the id that names the LoRA.
    assert result.backend == again.backend == hybrid.model_id


@pytest.mark.usefixtures("llama_present")
def test_hybrid_keeps_its_llm_source_when_one_product_fails() -> None:
    hybrid = HybridExtractor(_sources(), backends={"embedded-ll-lora": _TooLong(SCHEMA),
                                                   "keyword": KeywordExtractor(SCHEMA)}, schema=SCHEMA)
    result = enrich_product(SHIRT, hybrid, schema=SCHEMA, options=ONLY_COLOR)
    assert result.status == "error" and "too long" in (result.error or "")
    assert "+down" not in hybrid.model_id and result.backend == hybrid.model_id


def test_hybrid_without_llama_cpp_uses_the_baseline_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    _Broken.calls = 0
    hybrid = HybridExtractor(_sources(), backends={"embedded-ll-lora": _Broken(SCHEMA),
                                                   "keyword": KeywordExtractor(SCHEMA)}, schema=SCHEMA)
    assert hybrid.model_id.endswith("+down:embedded-ll-lora")  # cache keys never mix LLM and baseline answers
    result = enrich_product(SHIRT, hybrid, schema=SCHEMA, options=ONLY_COLOR)
    assert result.status == "ok" and result.extracted["clothes"]["color"] == ["navy"]
    assert _Broken.calls == 0


def test_hybrid_without_llama_cpp_leaves_re_empty_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    sources = FieldSources(fields=_sources().fields, re="embedded")
    hybrid = HybridExtractor(sources, backends={"embedded-ll-lora": _Broken(SCHEMA), "embedded": _Broken(SCHEMA),
                                                "keyword": KeywordExtractor(SCHEMA)}, schema=SCHEMA)
    options = EnrichOptions(full=True, fields=("color",), re_fields=("category_specification",), show_known=False)
    result = enrich_product(SHIRT, hybrid, schema=SCHEMA, options=options)
    assert result.status == "ok", result.issues
    assert result.extracted["clothes"]["color"] == ["navy"] and not any(result.extracted["re"].values())
    assert hybrid.model_id.endswith("+down:embedded,embedded-ll-lora")


# --------------------------------------------------------------------------- fail loudly (issue #17)

BATCH = [RawProduct(item_id=f"p{i}", title=t, description="") for i, t in
         enumerate(["Navy Blue Men's Checked Shirt", "Black leather boots", "Floral midi dress", "Grey hoodie",
                    "White cotton t-shirt"])]


def test_without_gguf_the_lora_backend_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(BackendUnavailable, match=r"needs the `gguf` package.*make llm"):
        LoRALogLikExtractor(tmp_path / "model.gguf", cache_dir=tmp_path)
    with pytest.raises(BackendUnavailable, match="gguf"):  # what `atelier enrich --backend embedded-ll-lora` builds
        get_extractor("embedded-ll-lora")


def test_cli_refuses_to_start_the_lora_backend_without_gguf(tmp_path: Path, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from atelier.cli import app
    from tests.helpers import write_head

    runner = CliRunner()
    write_head(data_dir / "hm" / "articles.csv.gz", tmp_path / "data" / "hm" / "articles.csv.gz", 20)
    write_head(data_dir / "hm" / "transactions.csv.gz", tmp_path / "data" / "hm" / "transactions.csv.gz", 20)
    env = {"ATELIER_RUN_DIR": str(tmp_path / "runs"), "ATELIER_DATA_DIR": str(tmp_path / "data")}
    assert runner.invoke(app, ["ingest", "-d", "hm"], env=env).exit_code == 0
    monkeypatch.setitem(sys.modules, "gguf", None)
    res = runner.invoke(app, ["enrich", "-d", "hm", "--limit", "5", "--backend", "embedded-ll-lora"], env=env)
    assert res.exit_code == 1 and "gguf" in res.output and "make llm" in res.output
    assert not (tmp_path / "runs" / "enrich" / "cache.jsonl").exists()  # nothing asked, nothing cached


class _BareModel:
    """Stands in for llama.cpp: counts base loads and bare-model scores (what the old code fell back to)."""

    loads = 0
    scores = 0

    @staticmethod
    def load(self: LogLikExtractor) -> None:
        if self._llm is None:
            _BareModel.loads += 1
            self._llm, self._ctx = object(), object()

    @staticmethod
    def score(self: LogLikExtractor, text: str, fields: list[str]) -> dict[str, np.ndarray]:
        _BareModel.scores += 1
        return {f: np.zeros(len(label_maps(SCHEMA)[f])) for f in fields}


def _lora_with_bare_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LoRALogLikExtractor:
    _BareModel.loads = _BareModel.scores = 0
    monkeypatch.setattr(LogLikExtractor, "load", _BareModel.load)
    monkeypatch.setattr(LogLikExtractor, "score", _BareModel.score)
    monkeypatch.setattr(LogLikExtractor, "values", lambda self, name: list(label_maps(SCHEMA)[name].values()))
    def release(self: LoRALogLikExtractor) -> None:
        self._llm = self._ctx = None

    monkeypatch.setattr(LoRALogLikExtractor, "_release", release)
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))  # present when the backend is built
    return LoRALogLikExtractor(tmp_path / "model.gguf", cache_dir=tmp_path, schema=SCHEMA)


@needs_adapter
def test_without_gguf_every_product_is_an_error_record_never_a_bare_model_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = _lora_with_bare_model(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "gguf", None)  # ... and gone when the first product needs it
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        results = enrich_products(BATCH, ex, cache, SCHEMA, ONLY_COLOR)
        assert len(cache) == 0  # no answer stored under the adapter's model id
    assert [r.status for r in results] == ["error"] * len(BATCH)
    assert all("gguf" in (r.error or "") for r in results)
    assert _BareModel.scores == 0 and _BareModel.loads == 0  # converted first: no base model to misuse


@needs_adapter
def test_adapter_that_fails_after_the_base_model_loaded_fails_every_product(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The issue #17 sequence: the base model and context exist, then the adapter step fails. The old
    # load() returned early on the second product and scored with the bare model under the LoRA's id.
    ex = _lora_with_bare_model(tmp_path, monkeypatch)
    ex.gguf_path.write_bytes(b"converted")

    def refuse(self: LoRALogLikExtractor, path: Path) -> None:
        raise AdapterError(f"llama.cpp refused the LoRA adapter {path} (wrong base model?)")

    monkeypatch.setattr(LoRALogLikExtractor, "_attach", refuse)
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        results = enrich_products(BATCH, ex, cache, SCHEMA, ONLY_COLOR)
        assert len(cache) == 0
    assert [r.status for r in results] == ["error"] * len(BATCH)
    assert all("refused the LoRA adapter" in (r.error or "") for r in results)
    assert _BareModel.scores == 0 and _BareModel.loads == 1  # loaded once, released, never retried
    assert ex._llm is None and ex._ctx is None


@pytest.mark.usefixtures("llama_present")
def test_hybrid_without_gguf_uses_the_baseline_under_a_down_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # the probe builds the LoRA backend, which refuses
    from atelier.config import Settings

    hybrid = HybridExtractor(_sources(), settings=Settings(), backends={"keyword": KeywordExtractor(SCHEMA)},
                             schema=SCHEMA)
    results = enrich_products(BATCH, hybrid, None, SCHEMA, ONLY_COLOR)
    assert hybrid.model_id.endswith("+down:embedded-ll-lora")
    assert all(r.status == "ok" and r.backend == hybrid.model_id for r in results)
    assert results[0].extracted["clothes"]["color"] == ["navy"]


class _FakeLlama:
    """Stands in for llama_cpp.Llama: records whether it was asked to generate."""

    generated = 0

    class _Model:
        vocab = object()

    _model = _Model()

    def create_chat_completion(self, **kwargs: Any) -> dict[str, Any]:
        type(self).generated += 1
        return {"choices": [{"message": {"content": "{}"}}]}


def _fake_llama_cpp(grammar_error: Exception | None, sampler: object | None) -> types.ModuleType:
    mod = types.ModuleType("llama_cpp")

    class LlamaGrammar:
        _grammar, _root = "root ::= \"{}\"", "root"

        @classmethod
        def from_json_schema(cls, schema: str, verbose: bool = True) -> LlamaGrammar:
            if grammar_error is not None:
                raise grammar_error
            return cls()

    mod.LlamaGrammar = LlamaGrammar  # type: ignore[attr-defined]
    mod.llama_sampler_init_grammar = lambda *a: sampler  # type: ignore[attr-defined]
    mod.llama_sampler_free = lambda s: None  # type: ignore[attr-defined]
    return mod


@pytest.mark.parametrize(("grammar_error", "sampler", "message"), [
    (ValueError("unsupported schema keyword"), object(), "cannot be turned into a llama.cpp grammar"),
    (None, None, "could not parse the answer grammar"),
])
def test_embedded_without_its_grammar_is_an_error_record_not_unconstrained_text(
        monkeypatch: pytest.MonkeyPatch, grammar_error: Exception | None, sampler: object | None,
        message: str) -> None:
    # llama-cpp-python's response_format path would fall back to a schema-free JSON grammar here.
    from atelier.enrich.embedded import EmbeddedExtractor

    monkeypatch.setitem(sys.modules, "llama_cpp", _fake_llama_cpp(grammar_error, sampler))
    ex = EmbeddedExtractor(Path("model.gguf"))
    monkeypatch.setattr(ex, "load", lambda: _FakeLlama())
    _FakeLlama.generated = 0
    result = enrich_product(SHIRT, ex, schema=SCHEMA, options=ONLY_COLOR)
    assert result.status == "error" and message in (result.error or "")
    assert _FakeLlama.generated == 0


# --------------------------------------------------------------------------- the real model (llama.cpp)


@pytest.mark.slow
@needs_adapter
def test_real_adapter_scores_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from atelier.config import Settings

    settings = Settings()
    ex = LoRALogLikExtractor.from_settings(settings)
    ex.cache_dir = tmp_path  # convert into the test's folder
    try:
        ex.load()
    except BackendError as exc:  # no GGUF model on this machine
        pytest.skip(str(exc))
    try:
        got = ex.pick("Nike Men Black Running Shoes", "", ["category", "color", "gender"])
    finally:
        ex.close()
    assert got["color"] == "black" and got["gender"] == "male" and got["category"].startswith("08shoes")
    assert "+lora-" in ex.model_id
