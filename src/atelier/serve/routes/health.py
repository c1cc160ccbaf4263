"""Liveness, readiness and what the page needs to draw its pickers."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from atelier.serve.deps import ServiceDep
from atelier.serve.schemas import Meta, Ready

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers (it says nothing about the store)."""
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
def ready(service: ServiceDep, response: Response) -> Ready:
    """Readiness: the store answers a query and a model is indexed; 503 (with the same body) otherwise."""
    report = service.readiness()
    if not report.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return report


@router.get("/meta", response_model=Meta)
def meta(service: ServiceDep) -> Meta:
    """Dataset, allowed category/colour/gender values and the stage chain."""
    return service.meta()
