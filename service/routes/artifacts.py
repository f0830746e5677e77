from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import Response

from cluster import storage
from service import records, schemas
from service.deps import SessionsDep, TenantDep
from service.routes.jobs import JobId, load

router = APIRouter(prefix="/jobs", tags=["artifacts"])


@router.get("/{job_id}/artifacts", response_model=schemas.Artifacts)
def list_artifacts(job_id: JobId, sessions: SessionsDep, tenant: TenantDep) -> schemas.Artifacts:
    """The job's output: checkpoints, shard manifests, metrics, plots, its archived log and the rest."""
    return records.artifacts(load(sessions, tenant, job_id))


@router.get("/{job_id}/artifacts/{path:path}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def get_artifact(job_id: JobId, path: Annotated[str, PathParam(max_length=1024)], sessions: SessionsDep,
                 tenant: TenantDep) -> Response:
    """One file of the job's output, by its path in the listing."""
    job = load(sessions, tenant, job_id)
    uri = records.artifact_uri(job, path)  # only names from the listing: nothing outside the output
    if uri is None:
        raise HTTPException(404, f"no artifact {path!r} in job {job_id}")
    media = "image/png" if uri.endswith(".png") else "application/json" if uri.endswith(".json") else \
        "application/octet-stream"
    return Response(storage.read_bytes(uri), media_type=media)
