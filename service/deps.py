"""Request dependencies: settings, job store, and the owner behind the API key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from workers.jobs.settings import Settings
from workers.jobs.store import JobStore

_bearer = HTTPBearer(auto_error=False, description="an API key from SLIDEPIPE_API_KEYS")


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_store(request: Request) -> JobStore:
    return request.app.state.store


def app_enqueue(request: Request) -> Callable[[str], None]:
    return request.app.state.enqueue


SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[JobStore, Depends(app_store)]
EnqueueDep = Annotated[Callable[[str], None], Depends(app_enqueue)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_owner(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The owner of the request's API key; 401 without a valid ``Bearer`` key."""
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    if not settings.api_key_owners():
        raise _unauthorized("this server has no API keys configured (SLIDEPIPE_API_KEYS)")
    owner = settings.owner_for_key(credentials.credentials)
    if owner is None:
        raise _unauthorized("invalid API key")
    return owner


OwnerDep = Annotated[str, Depends(require_owner)]
