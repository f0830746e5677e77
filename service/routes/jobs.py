from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import func, select

from service import files, limits, ray_jobs, records, schemas
from service.db import ACTIVE, STATUSES, TERMINAL, Job
from service.deps import SessionsDep, SettingsDep, TenantDep
from service.specs import KINDS

log = logging.getLogger("raylm.service")

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(max_length=64, description="The job's id, as returned by submit.")]


def rejected(e: records.Rejected) -> HTTPException:
    return HTTPException(e.status, e.errors)


async def spec_body(request: Request) -> Any:
    """The request body as JSON (the body-size middleware has already refused an oversized one)."""
    body = await request.body()
    try:
        return limits.parse_json(body)
    except ValueError as e:
        raise HTTPException(422, [{"loc": ["body"], "msg": f"the body is not JSON: {limits.short(str(e), 120)}",
                                   "type": "json_invalid"}]) from None


# The body is read and validated by hand (records.parse_spec), so that authentication and the quota
# come before validation and validation runs once; its schema is published all the same.
SPEC_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/JobSpec"}}}}}


def load(sessions, tenant, job_id: str) -> Job:
    """The tenant's job, or 404 (also for another tenant's job: its existence is not revealed)."""
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant.name))
        if job is None:
            raise HTTPException(404, f"job {job_id!r} not found")
        job.events  # noqa: B018 (load the history while the session is open)
        return job


def fresh(sessions, settings, tenant, job_id: str) -> Job:
    """The job after reconciling it with the cluster (the stored record if the cluster is unreachable)."""
    load(sessions, tenant, job_id)
    try:
        records.reconcile(sessions, settings, job_id)
    except ray_jobs.ClusterUnavailable:
        pass
    return load(sessions, tenant, job_id)


@router.post("", status_code=201, response_model=schemas.Job, openapi_extra=SPEC_BODY,
             responses={200: {"model": schemas.Job, "description": "The job first submitted with this Idempotency-Key"},
                        409: {"description": "Idempotency-Key reused with a different spec, or another server job "
                                             "(serve) is running"},
                        413: {"description": "The body is over the service's max_body_bytes"},
                        422: {"description": "Invalid spec, a path outside the tenant's prefixes, over a per-job "
                                             "limit, or over a request limit (list lengths, numbers, nesting)"},
                        429: {"description": "Over the tenant's max_concurrent_jobs"}})
def submit(tenant: TenantDep, raw: Annotated[Any, Depends(spec_body)], settings: SettingsDep, sessions: SessionsDep,
           response: Response,
           idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")] = None,
           ) -> schemas.Job:
    """Submit a job. The spec is the job's own config (`kind` selects which); the service writes it to
    a file and runs `python -m jobs.<kind> --config <that file>` on the cluster once the cluster has
    room for it (status QUEUED until then)."""
    try:
        spec = records.parse_spec(raw, tenant, settings, sessions, idempotency_key)
        job, created = records.submit(sessions, settings, tenant, spec, idempotency_key)
    except records.Rejected as e:
        raise rejected(e) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return records.to_schema(job)


@router.get("", response_model=schemas.JobList)
def list_jobs(sessions: SessionsDep, tenant: TenantDep,
              kind: Annotated[Literal[KINDS] | None, Query()] = None,  # type: ignore[valid-type]
              status_: Annotated[Literal[STATUSES] | None, Query(alias="status")] = None,  # type: ignore[valid-type]
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> schemas.JobList:
    """The tenant's jobs, newest first."""
    where = [Job.tenant == tenant.name]
    if kind:
        where.append(Job.kind == kind)
    if status_:
        where.append(Job.status == status_)
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Job).where(*where))
        rows = s.scalars(select(Job).where(*where).order_by(Job.seq.desc()).limit(limit).offset(offset)).all()
    return schemas.JobList(items=[records.to_schema(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=schemas.JobDetail)
def get_job(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep) -> schemas.JobDetail:
    """Spec, status and its history, timings, last metrics, artifacts and lineage."""
    return records.detail(fresh(sessions, settings, tenant, job_id), tenant.prefixes)


@router.get("/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "The log, or its stream with follow"}})
def logs(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep,
         tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines")] = None,
         follow: Annotated[bool, Query(description="Stream until the job ends")] = False) -> Response:
    """The job's log: from Ray while it runs, from artifact storage once it has ended."""
    job = fresh(sessions, settings, tenant, job_id)
    if follow and job.status in ACTIVE:
        return StreamingResponse(_follow(settings, sessions, job.id, job.submission_id), media_type="text/plain")
    try:  # the archived log, streamed from storage (it can be large)
        f = records.open_log(settings, job)
    except (files.NotAllowed, OSError):
        text = ray_jobs.logs(settings, job.submission_id) or ""
        if tail:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return PlainTextResponse(text)
    start = f.tail_start(tail) if tail else 0
    return StreamingResponse(f.chunks(start), media_type="text/plain; charset=utf-8",
                             headers={"Content-Length": str(f.size - start)})


async def _follow(settings, sessions, job_id: str, submission_id: str):
    # A queued job is not on the cluster yet: wait for the service to hand it over.
    said = False
    while (st := await run_in_threadpool(_status, sessions, job_id)) in ("QUEUED", "SUBMITTING"):
        if not said:
            said = True
            yield "[raylm] queued: the job starts when the cluster has room for it\n"
        await asyncio.sleep(1.0)
    if st not in ACTIVE:
        return  # stopped (or failed) before it reached the cluster
    try:
        async for chunk in ray_jobs.follow_logs(settings, submission_id):
            yield chunk
    except Exception as e:  # the response has started: the error can only be reported in the stream
        log.warning("following the log of %s: %s", submission_id, e)
        yield f"\n[raylm] log stream ended early ({type(e).__name__}); fetch the log again\n"


def _status(sessions, job_id: str) -> str | None:
    with sessions() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))


@router.post("/{job_id}/stop", status_code=202, response_model=schemas.Job,
             responses={409: {"description": "The job has already ended"}})
def stop(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep) -> schemas.Job:
    """Ask the cluster to stop the job; its status becomes STOPPED once Ray has stopped it."""
    job = fresh(sessions, settings, tenant, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} has already ended ({job.status})")
    if job.status == "QUEUED" and records.stop_queued(sessions, job.id):
        return records.to_schema(load(sessions, tenant, job_id))
    try:
        ray_jobs.stop(settings, job.id, job.submission_id)
    except ray_jobs.ClusterUnavailable as e:
        log.warning("stopping job %s: %s", job.id, e)
        raise HTTPException(503, "the cluster could not be reached; try again") from None
    return records.to_schema(fresh(sessions, settings, tenant, job_id))


@router.delete("/{job_id}", status_code=204, responses={409: {"description": "The job has not ended"}})
def delete(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep) -> Response:
    """Delete an ended job's record (its outputs and archived log stay in storage)."""
    job = fresh(sessions, settings, tenant, job_id)
    if job.status not in TERMINAL:
        raise HTTPException(409, f"job {job_id} is {job.status}; stop it first")
    with sessions() as s:
        s.delete(s.get(Job, job.seq))
        s.commit()
    ray_jobs.forget(settings, job.id, job.submission_id)
    return Response(status_code=204)
