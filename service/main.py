"""The control API: `uvicorn service.main:app`, or `raylm serve`."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from service.db import session_factory
from service.records import reconcile_forever
from service.routes import artifacts, cluster, health, jobs
from service.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    stop = threading.Event()
    # Statuses move on while nobody asks, and logs must be archived when a job ends.
    t = threading.Thread(target=reconcile_forever, args=(session_factory(settings.database_url), settings, stop),
                         name="raylm-reconciler", daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=10)


app = FastAPI(title="raylm control API", version="1", lifespan=lifespan,
              description="Submit and follow raylm jobs (prepare, pretrain, tune, ...) on a shared Ray cluster.")
v1 = APIRouter(prefix="/v1")
for module in (health, jobs, artifacts, cluster):
    v1.include_router(module.router)
app.include_router(v1)
