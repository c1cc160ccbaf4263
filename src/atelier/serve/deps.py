"""Dependencies shared by the routers: the service object and the write-endpoint API key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from atelier.serve.service import RecommendService


def get_service(request: Request) -> RecommendService:
    """The process's service object (built at start-up, see ``create_app``)."""
    service: RecommendService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the service is still starting")
    return service


ServiceDep = Annotated[RecommendService, Depends(get_service)]


# Declared as OpenAPI security schemes (the /docs page gets an "Authorize" button and schema-driven
# clients and fuzzers know which operations need a key); auto_error=False so this module alone
# decides between 401 and 403.
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the ATELIER_API_KEY value")
bearer = HTTPBearer(auto_error=False, description="the ATELIER_API_KEY value as a bearer token")


def require_api_key(
    service: ServiceDep,
    x_api_key: Annotated[str | None, Depends(api_key_header)] = None,
    authorization: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
) -> None:
    """401 without a key, 403 with a wrong one (or when no key is configured); the key is never logged."""
    expected = service.settings.api_key
    if not expected:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "write endpoints are disabled: set ATELIER_API_KEY")
    given = x_api_key or (authorization.credentials.strip() if authorization else None)
    if not given:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "ApiKey"})
    # constant-time comparison: response timing must not reveal how much of a guess was right
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong API key")


ApiKey = Depends(require_api_key)
