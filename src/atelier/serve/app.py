"""The FastAPI app factory: routers, error handlers, the body-size limit and the static page.

``create_app(settings)`` builds the ``RecommendService`` at start-up (lifespan), or takes one
ready-made (tests). ``app_from_env`` is the import string uvicorn workers use (``atelier serve``).
Errors are JSON ``{"detail": ...}``: validation errors are 422 naming the field, bodies over
``ATELIER_SERVE_MAX_BODY_BYTES`` are 413, an unreachable store is 503; never a bare 500 for bad input.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier.config import Settings, get_settings
from atelier.serve.routes import evaluation, health, items, recommend
from atelier.serve.schemas import error_responses
from atelier.serve.service import RecommendService, ServiceError
from atelier.store import StoreError

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("atelier.serve")


class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413 before any route parses them.

    Content-Length is checked first; a chunked body is read up to the limit and then replayed to
    the app, so a client cannot get past the limit by leaving the header out.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = f'{{"detail":"request body over {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


def _store_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("store error: %s", exc)
    return JSONResponse({"detail": f"vector store error: {exc}"}, status_code=503)


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A psycopg error that escaped the service: bad data is the client's 422, anything else a 503
    (and, when the server does not answer, the service serves degraded until it is back)."""
    assert isinstance(exc, psycopg.Error)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, psycopg.DataError):
        return JSONResponse({"detail": f"a value in the request cannot be stored or searched: {reason}"},
                            status_code=422)
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.store_failed(reason)
    log.warning("database error: %s", reason)
    return JSONResponse({"detail": f"vector store error: {reason}"}, status_code=503)


def create_app(
    settings: Settings | None = None,
    *,
    service: RecommendService | None = None,
    service_factory: Callable[[Settings], RecommendService] | None = None,
) -> FastAPI:
    """The web app: API routers, error handlers, body limit, and the page at ``/``."""
    settings = settings or get_settings()
    build = service_factory or RecommendService.from_settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.service is None
        if owned:
            app.state.service = build(settings)
        try:
            yield
        finally:
            if owned:
                app.state.service.close()
                app.state.service = None

    app = FastAPI(
        title="atelier", version="0.1.0", lifespan=lifespan,
        description="Content-based fashion recommendations: item lookup, search, similar items, "
                    "recommendations with explanations, cold-start product ingest, and the latest evaluation.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.serve_max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(psycopg.Error, _database_error)
    for module in (health, items, recommend, evaluation):
        # any route may answer 400 (a body that is not JSON), 422 (a bad parameter, named) or 503 (store
        # down): all documented, so clients and the fuzz tests know every status they can get
        app.include_router(module.router, responses=error_responses(400, 422, 503))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def app_from_env() -> FastAPI:
    """The app for uvicorn's ``--factory`` import string: settings from the environment."""
    return create_app(get_settings())
