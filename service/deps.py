"""FastAPI dependencies: settings, the job store, and the authenticated tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.db import session_factory
from service.security import Tenant, authenticate
from service.settings import Settings, get_settings

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_sessions(settings: SettingsDep) -> sessionmaker[Session]:
    return session_factory(settings.database_url)


SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]

_bearer = HTTPBearer(auto_error=False, description="A tenant's token from RAYLM_TOKENS_FILE / RAYLM_TOKENS.")


def current_tenant(settings: SettingsDep,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    tenant = authenticate(settings, creds.credentials) if creds else None
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing or invalid bearer token" if creds else "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]
