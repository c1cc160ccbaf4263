"""Index pointers: which model's vectors the store serves for a dataset, with the load's figures.

``atelier index`` (item tower) and the user-tower stage (two-tower keys) write a pointer after each
load (``RunPaths.index_pointer``); serving, ``atelier similar`` and ``atelier recommend`` read the model
id from it. Written atomically, so a reader sees the old pointer or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atelier.atomic import write_json
from atelier.paths import RunPaths

# What to run when a pointer is missing, per model kind.
_HOW = {"item_tower": "atelier index -d {dataset}", "two_tower": "atelier train user -d {dataset}"}


def write_pointer(path: Path, report: dict[str, Any]) -> None:
    """Write an index report (the live model id with its figures) atomically: temp file, then rename."""
    write_json(path, report, indent=2, default=str)


def read_pointer(paths: RunPaths, dataset: str, model: str = "item_tower") -> dict[str, Any]:
    """The last load report of a dataset's ``model`` (FileNotFoundError saying what to run when none)."""
    pointer = paths.index_pointer(dataset, model)
    if not pointer.is_file():
        how = _HOW.get(model, "atelier run").format(dataset=dataset)
        raise FileNotFoundError(f"no {model} index for {dataset}; run `{how}` first")
    found: dict[str, Any] = json.loads(pointer.read_text())
    return found


def live_model_id(paths: RunPaths, dataset: str, model: str = "item_tower") -> str:
    """The store's model id of what was last loaded for a dataset."""
    return str(read_pointer(paths, dataset, model)["model_id"])
