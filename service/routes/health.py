from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service import schemas
from service.deps import SessionsDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=schemas.Health)
def health(sessions: SessionsDep) -> schemas.Health:
    """Liveness and store reachability; the one endpoint that needs no token."""
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
        ok = True
    except Exception:
        ok = False
    return schemas.Health(status="ok" if ok else "degraded", database=ok)
