"""Recommendations for a known user or an anonymous shopper."""

from __future__ import annotations

from fastapi import APIRouter

from atelier.serve.deps import ServiceDep
from atelier.serve.schemas import RecommendRequest, RecommendResponse

router = APIRouter(tags=["recommend"])


@router.post("/recommend", response_model=RecommendResponse)
def recommend(service: ServiceDep, request: RecommendRequest) -> RecommendResponse:
    """Items with scores, the stage that produced each, and the attributes they share with the input.

    The best available stage serves (``stages`` says what each did); ``degraded`` is true when the
    store was unreachable and the cached popular list answered.
    """
    return service.recommend(request)
