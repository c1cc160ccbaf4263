"""The log-likelihood scorer with the committed LoRA adapter (``embedded-ll-lora``).

``data/adapters/gemma3-270m-std-lora`` is a PEFT adapter (r=16, bf16, q/k/v/o/gate/up/down) trained on a
GPU by ``benchmarks/bench_lora_gpu.py`` for exactly the ``embedded-ll`` method: the product prompt and
the per-field question of ``loglik.py``, the label's spoken form, mean log-probability per label token;
its training items share no id, ``group_id`` or normalised text with an evaluation item
(``bench_extraction.training_pool``). This module runs it on CPU through llama.cpp: the PEFT safetensors
are converted once into a GGUF LoRA (numpy + the ``gguf`` package, no torch; written next to the model
under ``<run_dir>/models/``, keyed by the adapter's hash) and attached to the scorer's context with
``llama_set_adapters_lora``. llama.cpp adds ``alpha / r * B(A x)`` to each projection of the Q4_K_M base
at run time, so the base file is untouched.

Tensor layout: PEFT ``lora_A`` is (r, in) and ``lora_B`` (out, r) in numpy order; GGUF reverses the
dimensions, which gives llama.cpp's expected ``a`` = [in, r] and ``b`` = [r, out]. Gemma's projections
are not permuted by llama.cpp's converter, so the adapter maps name for name.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.enrich.base import BackendError, BackendUnavailable, register
from atelier.enrich.loglik import LOGLIK_VERSION, LogLikExtractor
from atelier.paths import LORA_ADAPTER_DIR

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["ADAPTER_DIR", "AdapterError", "LoRALogLikExtractor", "convert_adapter", "read_adapter"]

# The committed adapter (repository checkout); the setting ATELIER_LORA_ADAPTER names another.
ADAPTER_DIR = LORA_ADAPTER_DIR
# PEFT module name -> llama.cpp tensor name (per block).
_MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class AdapterError(BackendUnavailable):
    """The adapter directory is missing, incomplete or not a PEFT LoRA this module understands."""


def _import_gguf() -> Any:
    """The ``gguf`` package, or ``BackendUnavailable`` saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise BackendUnavailable("the embedded-ll-lora backend needs the `gguf` package to convert its LoRA "
                                 "adapter for llama.cpp: run `make llm` (installs the `llm` extra)") from exc
    return gguf


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 arrays (bf16 widened by a shift; no torch)."""
    try:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from exc
    body = memoryview(raw)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            start, end = meta["data_offsets"]
            arr = np.frombuffer(body[start:end], dtype=dtype).reshape(meta["shape"])
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterError(f"{path}: tensor {name!r} is corrupt or of an unsupported type ({exc})") from exc
        bf16 = meta["dtype"] == "BF16"
        out[name] = (arr.astype(np.uint32) << 16).view(np.float32) if bf16 else arr.astype(np.float32)
    return out


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config, {gguf tensor name: float32 array}) of a PEFT LoRA directory; AdapterError if unusable."""
    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise AdapterError(f"LoRA adapter not found: {adapter_dir} needs adapter_config.json and "
                           "adapter_model.safetensors (the committed one is data/adapters/gemma3-270m-std-lora)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if cfg.get("peft_type") != "LORA" or not cfg.get("r") or cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: not a plain PEFT LoRA adapter (peft_type LORA, r > 0, no DoRA)")
    tensors: dict[str, np.ndarray] = {}
    for name, arr in _read_safetensors(st_path).items():
        # base_model.model.model.layers.<i>.<module>.lora_A.weight
        parts = name.split(".")
        try:
            i = parts.index("layers")
            block, module, ab = int(parts[i + 1]), ".".join(parts[i + 2:i + 4]), parts[i + 4]
        except (ValueError, IndexError) as exc:
            raise AdapterError(f"unexpected adapter tensor {name!r}") from exc
        if module not in _MODULES or ab not in ("lora_A", "lora_B"):
            raise AdapterError(f"unexpected adapter tensor {name!r} (only {', '.join(_MODULES)} are supported)")
        tensors[f"blk.{block}.{_MODULES[module]}.weight.lora_{ab[-1].lower()}"] = arr
    pairs = {k.rsplit(".", 1)[0] for k in tensors}
    for base in pairs:
        a, b = tensors.get(base + ".lora_a"), tensors.get(base + ".lora_b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter tensor pair {base} is incomplete or has inconsistent shapes")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"adapter tensor pair {base} holds NaN or inf")
    if not tensors:
        raise AdapterError(f"{st_path}: no LoRA tensors")
    return cfg, tensors


def adapter_digest(adapter_dir: Path) -> str:
    """Short hash of the adapter files (part of the model id and of the converted file's name)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = adapter_dir / name
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()[:12]


def convert_adapter(adapter_dir: Path, out: Path) -> Path:
    """Write the PEFT adapter as a GGUF LoRA for llama.cpp (float32 tensors); returns ``out``."""
    gguf = _import_gguf()
    cfg, tensors = read_adapter(adapter_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "gemma3")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(cfg.get("lora_alpha") or cfg["r"]))
    for name in sorted(tensors):
        writer.add_tensor(name, np.ascontiguousarray(tensors[name]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)  # atomic: a concurrent or interrupted run never sees half a file
    return out


@register("embedded-ll-lora")
class LoRALogLikExtractor(LogLikExtractor):
    """``embedded-ll`` with the committed LoRA adapter applied by llama.cpp (CPU).

    It answers with the adapter or not at all: construction refuses an unreadable adapter, or one
    that cannot be converted here (no ``gguf`` and no converted file yet); ``load`` attaches the
    adapter before the first score, and a failure there is kept and raised for every later product
    (each becomes an error record), never scored with the bare base model under this id.
    """

    def __init__(self, model_path: Path, adapter_dir: Path | None = None, cache_dir: Path | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        self.adapter_dir = Path(adapter_dir or ADAPTER_DIR)
        self.cache_dir = cache_dir or model_path.parent
        self._adapter: Any = None
        self._failed: BackendUnavailable | None = None
        read_adapter(self.adapter_dir)  # fail at construction, with the path, not mid-batch
        self._digest = adapter_digest(self.adapter_dir)
        if not self.gguf_path.is_file():
            _import_gguf()  # refuse to start rather than fail every product

    @classmethod
    def from_settings(cls, settings: Settings) -> LoRALogLikExtractor:
        """Same model file and threads as the embedded backend; the committed adapter."""
        return cls(settings.gguf_path(), adapter_dir=settings.lora_adapter, n_threads=settings.llm_threads or None)

    @property
    def model_id(self) -> str:
        """``embedded-ll-lora:<gguf package>@ll-v1+lora-<adapter hash>``."""
        return f"{super().model_id.split('@', 1)[0]}@{LOGLIK_VERSION}+lora-{self._digest}"

    @property
    def gguf_path(self) -> Path:
        """Where the converted adapter lives (keyed by the adapter's hash)."""
        return self.cache_dir / f"{self.adapter_dir.name}-{self._digest}.gguf"

    def load(self) -> None:
        """Convert the adapter if needed, load the base model and context, attach the adapter; all or nothing."""
        if self._adapter is not None:
            return
        if self._failed is not None:
            raise self._failed  # the same cause for every product, without reloading the model each time
        try:
            # Convert first: a missing `gguf` fails before any base model exists to be misused.
            if not self.gguf_path.is_file():
                convert_adapter(self.adapter_dir, self.gguf_path)
            super().load()
            self._attach(self.gguf_path)
        except BackendError as exc:
            self._release()
            self._failed = exc if isinstance(exc, BackendUnavailable) else BackendUnavailable(str(exc))
            raise self._failed from exc
        except Exception as exc:  # a llama.cpp or file error: the same rule, with its type
            self._release()
            self._failed = BackendUnavailable(f"embedded-ll-lora could not load: {type(exc).__name__}: {exc}")
            raise self._failed from exc

    def _attach(self, gguf_path: Path) -> None:
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs a line per tensor
            adapter = llama_cpp.llama_adapter_lora_init(self._llm._model.model, str(gguf_path).encode())
        if not adapter:
            raise AdapterError(f"llama.cpp refused the LoRA adapter {gguf_path} (wrong base model?)")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
            llama_cpp.llama_adapter_lora_free(adapter)
            raise AdapterError("llama.cpp could not attach the LoRA adapter to the scoring context")
        self._adapter = adapter

    def score(self, text: str, fields: list[str]) -> dict[str, np.ndarray]:
        """``LogLikExtractor.score`` with the adapter attached (refuses to score without it)."""
        self.load()
        if self._adapter is None:  # load() raises rather than return without it; this guards later edits
            raise BackendUnavailable("embedded-ll-lora: the LoRA adapter is not attached; refusing to score")
        return super().score(text, fields)

    def _release(self) -> None:
        """Free the context, the adapter and the model (the adapter before the model it belongs to)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            import llama_cpp

            llama_cpp.llama_free(ctx)
        if self._adapter is not None:
            import llama_cpp

            llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def close(self) -> None:
        """Free the context, the adapter and the model."""
        with self._lock:
            self._release()
