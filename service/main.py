"""The control API: `uvicorn service.main:app`, or `raylm serve`."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi

from cluster import storage
from service import files, limits
from service.db import session_factory
from service.records import reconcile_forever
from service.routes import artifacts, cluster, health, jobs, ui
from service.security import tenants
from service.settings import Settings, get_settings
from service.specs import spec_adapter


def check_layout(settings: Settings) -> None:
    """Refuse to start when a tenant could write where the service keeps its own files: the
    archived logs are served as the job's log, so they must be out of every tenant's reach."""
    root = storage.absolute(settings.artifacts).rstrip("/")
    for t in tenants(settings):
        for p in t.prefixes:
            if files.under(root, p) or files.under(p, root):
                raise RuntimeError(f"RAYLM_ARTIFACTS ({root}) overlaps tenant {t.name!r}'s prefix {p}: keep the "
                                   "service's artifacts out of every tenant's storage")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    check_layout(settings)
    stop = threading.Event()
    # Statuses move on while nobody asks, logs must be archived when a job ends, and queued jobs
    # are admitted as others end.
    t = threading.Thread(target=reconcile_forever, args=(session_factory(settings.database_url), settings, stop),
                         name="raylm-reconciler", daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=10)


app = FastAPI(title="raylm control API", version="1", lifespan=lifespan,
              description="Submit and follow raylm jobs (prepare, pretrain, tune, ...) on a shared Ray cluster.")
app.add_middleware(limits.BodySizeLimit)
app.add_exception_handler(RequestValidationError, limits.validation_error_handler)
v1 = APIRouter(prefix="/v1")
for module in (health, jobs, artifacts, cluster):
    v1.include_router(module.router)
app.include_router(v1)
app.include_router(ui.router)


def openapi() -> dict:
    """FastAPI's schema plus the job specs (POST /v1/jobs reads its body by hand: see routes/jobs.py)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                         description=app.description, routes=app.routes)
    spec = spec_adapter.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, body in {**spec.pop("$defs", {}), "JobSpec": spec}.items():
        if components.get(name, body) != body:
            raise RuntimeError(f"two different schemas are named {name!r}")
        components[name] = body
    app.openapi_schema = schema
    return schema


app.openapi = openapi
