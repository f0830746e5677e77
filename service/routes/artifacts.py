from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, StreamingResponse

from service import files, records, schemas
from service.deps import SessionsDep, TenantDep
from service.limits import short
from service.routes.jobs import JobId, load

router = APIRouter(prefix="/jobs", tags=["artifacts"])


@router.get("/{job_id}/artifacts", response_model=schemas.Artifacts)
def list_artifacts(job_id: JobId, sessions: SessionsDep, tenant: TenantDep) -> schemas.Artifacts:
    """The job's output: checkpoints, shard manifests, metrics, plots, its archived log and the rest.
    Links are listed only if they lead to a file inside the output."""
    return records.artifacts(load(sessions, tenant, job_id), tenant.prefixes)


@router.get("/{job_id}/artifacts/{path:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       404: {"description": "No such file in the job's output, or a link that leads out of it"}})
def get_artifact(job_id: JobId, path: Annotated[str, PathParam(max_length=4096)], sessions: SessionsDep,
                 tenant: TenantDep) -> StreamingResponse:
    """One file of the job's output, by its path in the listing, streamed. Served only if its real
    path (links resolved) is inside the job's output and the tenant's prefixes."""
    job = load(sessions, tenant, job_id)
    try:
        f = records.open_artifact(job, path, tenant.prefixes)
    except (files.NotAllowed, OSError):
        # one answer for "missing" and "leads outside": which it is would say what is out there
        raise HTTPException(404, f"no artifact {short(path)} in job {job_id}") from None
    media = "image/png" if path.endswith(".png") else "application/json" if path.endswith(".json") else \
        "application/octet-stream"
    return StreamingResponse(f.chunks(), media_type=media, headers={"Content-Length": str(f.size)})


@router.get("/{job_id}/metrics", response_model=schemas.Metrics)
def metrics(job_id: JobId, sessions: SessionsDep, tenant: TenantDep,
            max_points: Annotated[int, Query(ge=2, le=10_000)] = 1000) -> schemas.Metrics:
    """The numeric fields of the job's metrics.jsonl (loss, val_loss, lr, ...), for a curve: at most
    `max_points` training records and as many evaluation records, evenly thinned, the newest kept."""
    job = load(sessions, tenant, job_id)
    return records.metric_series(job.spec.get("output"), tenant.prefixes, max_points)


# The report is one self-contained page (inline styles and SVG, no script). Served sandboxed: even
# opened directly, nothing in it runs with this origin's privileges or loads anything.
REPORT_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"


@router.get("/{job_id}/report", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {}}, "description": "The run report (docs/report.md)"}})
def report(job_id: JobId, sessions: SessionsDep, tenant: TenantDep) -> Response:
    """The job's run report: its report.html artifact, or, for a job that wrote none (yet), a page
    built from its output's files (checkpoints listed, not verified)."""
    job = load(sessions, tenant, job_id)
    page = records.open_report(job, tenant.prefixes)
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    if isinstance(page, str):
        return HTMLResponse(page, headers=headers)
    return StreamingResponse(page.chunks(), media_type="text/html; charset=utf-8",
                             headers={**headers, "Content-Length": str(page.size)})
