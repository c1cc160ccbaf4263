"""The service app for load tests, optionally with a subset of the stage chain.

``PERF_STAGES=content,two_tower,popularity`` keeps only those stages (e.g. retrieval only: the chain
without ``rerank``); unset, the chain is what ``atelier serve`` builds. Used as uvicorn's factory:
``uvicorn benchmarks.perf.serve_app:app --factory``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from atelier.config import get_settings
from atelier.serve import stages
from atelier.serve.app import create_app


def app() -> FastAPI:
    """``create_app`` after dropping the stage factories that PERF_STAGES leaves out."""
    keep = [s for s in os.environ.get("PERF_STAGES", "").split(",") if s]
    if keep:
        for name in list(stages.STAGE_FACTORIES):
            if name not in keep:
                del stages.STAGE_FACTORIES[name]
    return create_app(get_settings())
