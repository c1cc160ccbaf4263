"""Recommendations for a known user or an anonymous shopper, each item with one plain sentence of why."""

from __future__ import annotations

import json
import logging
import threading
import time

import psycopg
from fastapi import APIRouter

from atelier.serve.deps import ServiceDep
from atelier.serve.explain import Shopper, plain_reason
from atelier.serve.routes.items import recommendation_log, show_catalogue_prices
from atelier.serve.schemas import RecommendRequest, RecommendResponse
from atelier.serve.service import RecommendService
from atelier.store import StoreError, fetch_items

router = APIRouter(tags=["recommend"])
log = logging.getLogger("atelier.serve")
HISTORY_NAMED = 20  # the latest history items a sentence may name (the content stage's own horizon)
_log_lock = threading.Lock()


def log_answer(service: RecommendService, request: RecommendRequest, response: RecommendResponse) -> None:
    """Append an answer to a shopper with a cart to the recommendation log (the merchandiser's view counts the
    carts each product was recommended to); no user id is written."""
    if not request.cart or not response.items:
        return
    line = json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cart": list(dict.fromkeys(request.cart)),
                       "items": [i.item_id for i in response.items], "stage": response.stage}, ensure_ascii=False)
    path = recommendation_log(service)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _log_lock, path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError as exc:  # a full or read-only run folder must not fail the answer
        log.warning("could not log the answer in %s: %s", path, exc)


def shopper_of(service: RecommendService, request: RecommendRequest, degraded: bool) -> Shopper:
    """What a sentence may say about the requesting shopper: cart and history items, which were bought."""
    bought = service.shop.histories.get(request.user_id, ()) if request.user_id else ()
    recent = list(dict.fromkeys(request.recent_item_ids))
    history = [i for i in bought if i not in set(recent)] + recent
    cart = list(dict.fromkeys(request.cart))
    store = None if degraded else service.store()
    docs: dict[str, dict[str, object]] = {}
    if store is not None and (cart or history):
        try:
            docs = fetch_items(store, cart + history[-HISTORY_NAMED:])
        except (StoreError, psycopg.Error) as exc:  # the sentences then name no item; the answer stands
            log.warning("cart items for the reasons unavailable: %s", exc)
    return Shopper(cart={i: docs.get(i, {}) for i in cart},
                   history={i: docs[i] for i in history[-HISTORY_NAMED:] if i in docs},
                   history_ids=frozenset(history), bought_ids=frozenset(bought),
                   context=request.context, window_days=service.shop.popular.window_days)


@router.post("/recommend", response_model=RecommendResponse)
def recommend(service: ServiceDep, request: RecommendRequest) -> RecommendResponse:
    """Items with scores, the stage that produced each, one sentence of why (``explanation.reason``) and the
    model's detail (``explanation``: stage, source, the stage's words, the attributes shared with the input).

    The best available stage serves (``stages`` says what each did); ``degraded`` is true when the
    store was unreachable and the cached popular list answered.
    """
    response = service.recommend(request)
    shopper = shopper_of(service, request, response.degraded)
    for item in response.items:
        doc = {"clothes": item.attributes, "service": {"group_id": item.group_id}}
        item.explanation.reason, item.explanation.signal = plain_reason(item.item_id, doc, item.explanation, shopper)
    show_catalogue_prices(service, response.items)
    log_answer(service, request, response)
    return response
