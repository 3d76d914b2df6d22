"""Liveness and readiness probes (no API key: load balancers call them)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import SettingsDep, StoreDep
from workers.jobs.celery_app import ping_broker

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Database and broker reachable: 200, else 503 with what failed."""
    checks: dict[str, str] = {}
    try:
        await anyio.to_thread.run_sync(store.ping)
        checks["database"] = "ok"
    except Exception as err:
        checks["database"] = f"unreachable: {err}"
    try:
        await anyio.to_thread.run_sync(ping_broker, settings.broker_url)
        checks["broker"] = "ok"
    except Exception as err:
        checks["broker"] = f"unreachable: {err}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )
