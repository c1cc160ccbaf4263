from __future__ import annotations

from pathlib import Path

import pytest

from atelier import hardware


@pytest.mark.parametrize(("setting", "expected"), [("0", False), ("1", True)])
def test_cpu_bf16_follows_the_override(monkeypatch: pytest.MonkeyPatch, setting: str, expected: bool) -> None:
    monkeypatch.setenv("ATELIER_CPU_BF16", setting)
    hardware.cpu_bf16.cache_clear()
    try:
        assert hardware.cpu_bf16() is expected
        assert hardware.autocast_bf16("cpu") is expected
        assert hardware.autocast_bf16("cuda:0")  # a GPU always trains in bf16
    finally:
        hardware.cpu_bf16.cache_clear()


def test_cpu_bf16_reads_the_processor_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATELIER_CPU_BF16", raising=False)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = cpuinfo.read_text(encoding="ascii", errors="replace").split()
    hardware.cpu_bf16.cache_clear()
    try:
        assert hardware.cpu_bf16() is bool(hardware.BF16_FLAGS & set(flags))
    finally:
        hardware.cpu_bf16.cache_clear()
