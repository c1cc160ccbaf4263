"""Crash-safe artifact writes: a temp file in the target's folder, fsync, then one ``os.replace``.

Every checkpoint, vector file, report and pointer under the run folder goes through
``atomic_write``, so a reader (or the next run after a ``kill -9``, a full disk or a power cut)
sees either the previous complete file or the new complete file, never a torn one. The temp file
is a hidden ``.<name>.<random>.tmp`` beside the target: same filesystem (``os.replace`` is atomic
only there), never matched by the ``*.npz`` / ``*.pt`` / ``*.json`` globs that find artifacts, and
removed when the write fails (an ``ENOSPC`` leaves no half-written file behind).

References: rename(2) atomicity; "Files are hard" (Dan Luu) on fsync of the file and its folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["atomic_write", "write_bytes", "write_json", "write_text"]


@contextmanager
def atomic_write(path: Path, mode: Literal["w", "wb"] = "wb") -> Iterator[IO[Any]]:
    """A file object whose content replaces ``path`` only if the ``with`` block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide artifacts from other users of the run folder
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems refuse to open a folder)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: Path, obj: Any, **dumps: Any) -> None:
    """Replace ``path`` with ``json.dumps(obj, **dumps)`` atomically (serialised before the file opens)."""
    write_text(path, json.dumps(obj, **dumps))
