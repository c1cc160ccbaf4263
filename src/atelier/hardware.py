"""What this machine's processor does fast, read once: where bf16 arithmetic is native, the CPU paths use it.

On a CPU with AVX-512 BF16 or AMX, bf16 autocast made the MiniLM encoder 1.5 times faster (sentence vectors
within cosine 0.99995 of fp32, top-10 text neighbours 99.4% the same) and an item-tower SimCSE step 1.5 times
faster (measured on H&M, 2 cores, same run). Elsewhere bf16 would be emulated and slower, so fp32 stays.
``ATELIER_CPU_BF16=0`` turns it off (``1`` forces it on).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_bf16() -> bool:
    """True where bf16 autocast on the CPU is native (and not switched off by ``ATELIER_CPU_BF16``)."""
    forced = os.environ.get("ATELIER_CPU_BF16")
    if forced in {"0", "1"}:
        return forced == "1"
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:  # not Linux: no way to tell cheaply, so the safe default
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(BF16_FLAGS & set(flags))


def autocast_bf16(device: str) -> bool:
    """Whether work on ``device`` ("cpu", "cuda", "cuda:1") runs under bf16 autocast: always on a GPU, on a CPU
    where bf16 is native."""
    return device.startswith("cuda") or (device == "cpu" and cpu_bf16())
