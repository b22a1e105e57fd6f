"""FastAPI dependencies: the running service state and the optional API key."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.state import ServiceState

#: declares the bearer scheme in the OpenAPI schema (the "Authorize" button of /docs); checking is ours
bearer_scheme = HTTPBearer(auto_error=False, description="the value of DINO_API_KEY, when the server has one")


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    """401 unless the request carries ``Authorization: Bearer <DINO_API_KEY>`` (no-op without a key)."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    # constant-time comparison: response timing must not reveal how much of the key was right
    if not supplied or not secrets.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def get_state(request: Request) -> ServiceState:
    """The loaded service, or 503 while the model is loading or the server is shutting down.

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop per request just to read ``app.state`` (9% of the server's Python samples under load)."""
    state: ServiceState | None = request.app.state.service
    if state is None or not state.ready:
        raise HTTPException(status_code=503, detail="the model is not ready yet", headers={"Retry-After": "1"})
    return state
