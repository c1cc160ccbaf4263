"""The LoRA log-likelihood backend (``embedded-ll-lora``): adapter loading, refusal of bad adapters, hybrid fallback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atelier.enrich import BackendError, EnrichOptions, RawProduct, available_backends, enrich_product
from atelier.enrich.fieldwise import FieldwiseExtractor, KeywordExtractor
from atelier.enrich.hybrid import FieldSource, FieldSources, HybridExtractor
from atelier.enrich.lora import ADAPTER_DIR, AdapterError, LoRALogLikExtractor, convert_adapter, read_adapter
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
        raise BackendError("the embedded-ll backend needs llama-cpp-python: run `make llm`")


def _sources() -> FieldSources:
    return FieldSources(fields={"color": FieldSource("loglik_lora", "embedded-ll-lora", None, "keyword"),
                                "season": FieldSource("majority", None, "summer")}, re=None)


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
