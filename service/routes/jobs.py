from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import func, select

from cluster import storage
from service import ray_jobs, records, schemas
from service.db import ACTIVE, STATUSES, TERMINAL, Job
from service.deps import SessionsDep, SettingsDep, TenantDep
from service.specs import CLASS_BY_KIND, KINDS, JobSpec, spec_adapter

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(max_length=64, description="The job's id, as returned by submit.")]


def rejected(e: records.Rejected) -> HTTPException:
    return HTTPException(e.status, e.errors)


async def guard_raw_spec(request: Request, tenant: TenantDep) -> None:
    """Runs after authentication and before the body is validated into a spec: refuses what
    validation itself would act on (records.check_raw_spec), and turns a config validator that
    fails with something other than a ValueError into a 422 instead of a 500."""
    try:
        raw = await request.json()
    except ValueError:
        return  # not JSON: the body validation reports it
    cls = CLASS_BY_KIND.get(raw.get("kind")) if isinstance(raw, dict) and isinstance(raw.get("kind"), str) else None
    try:
        records.check_raw_spec(raw, cls)
    except records.Rejected as e:
        raise rejected(e) from None
    try:
        spec_adapter.validate_python(raw)
    except ValidationError:
        return  # reported by FastAPI's own body validation, in its usual shape
    except Exception as e:
        raise HTTPException(422, [{"loc": ["body"], "msg": f"invalid spec: {type(e).__name__}: {e}",
                                   "type": "value_error"}]) from None


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


@router.post("", status_code=201, response_model=schemas.Job, dependencies=[Depends(guard_raw_spec)],
             responses={200: {"model": schemas.Job, "description": "The job first submitted with this Idempotency-Key"},
                        409: {"description": "Idempotency-Key reused with a different spec"},
                        422: {"description": "Invalid spec, a path outside the tenant's prefixes, or over a per-job limit"},
                        429: {"description": "Over the tenant's max_concurrent_jobs"},
                        503: {"description": "The cluster could not take the job"}})
def submit(spec: JobSpec, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep, response: Response,
           idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")] = None,
           ) -> schemas.Job:
    """Submit a job. The spec is the job's own config (`kind` selects which); the service writes it to
    a file and runs `python -m jobs.<kind> --config <that file>` on the cluster."""
    try:
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
    return records.detail(fresh(sessions, settings, tenant, job_id))


@router.get("/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "The log, or its stream with follow"}})
def logs(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep,
         tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines")] = None,
         follow: Annotated[bool, Query(description="Stream until the job ends")] = False) -> Response:
    """The job's log: from Ray while it runs, from artifact storage once it has ended."""
    job = fresh(sessions, settings, tenant, job_id)
    if follow and job.status in ACTIVE:
        return StreamingResponse(_follow(settings, job.submission_id), media_type="text/plain")
    text = _log_text(settings, job)
    if tail:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    return PlainTextResponse(text)


def _log_text(settings, job: Job) -> str:
    if job.logs_uri:
        try:
            return storage.read_text(job.logs_uri)
        except OSError:
            pass
    return ray_jobs.logs(settings, job.submission_id) or ""


async def _follow(settings, submission_id: str):
    try:
        async for chunk in ray_jobs.follow_logs(settings, submission_id):
            yield chunk
    except Exception as e:  # the response has started: the error can only be reported in the stream
        yield f"\n[raylm] log stream ended: {e}\n"


@router.post("/{job_id}/stop", status_code=202, response_model=schemas.Job,
             responses={409: {"description": "The job has already ended"}})
def stop(job_id: JobId, settings: SettingsDep, sessions: SessionsDep, tenant: TenantDep) -> schemas.Job:
    """Ask the cluster to stop the job; its status becomes STOPPED once Ray has stopped it."""
    job = fresh(sessions, settings, tenant, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} has already ended ({job.status})")
    try:
        ray_jobs.stop(settings, job.id, job.submission_id)
    except ray_jobs.ClusterUnavailable as e:
        raise HTTPException(503, str(e)) from e
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
