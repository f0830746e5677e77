"""Job records: submission, reconciliation with the cluster, lineage, logs and artifacts.

Plain functions over a SQLAlchemy session. Status changes are conditional updates (`WHERE status
= <what we saw>`), so the background reconciler, request handlers and a second API process can
all reconcile the same job without writing an event twice.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

import yaml
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cluster import storage
from jobs.config import JobConfig
from service import ray_jobs, schemas
from service.db import ACTIVE, TERMINAL, Event, Job, now
from service.security import PathRejected, Tenant, check_path
from service.settings import Settings
from service.specs import nested_models, path_values, resources, with_values

log = logging.getLogger("raylm.service")

# A record still SUBMITTING after this long was left behind by a process that died mid-submit.
SUBMIT_GRACE_S = 120
MAX_LISTED_FILES = 2000


class Rejected(Exception):
    """A request the service refuses; `status` is the HTTP code, `errors` FastAPI-style details."""

    def __init__(self, status: int, errors: list[dict] | str):
        self.status = status
        self.errors = errors
        super().__init__(str(errors))


def field_error(loc: tuple, msg: str, type_: str) -> dict:
    return {"loc": ["body", *loc], "msg": f"{'.'.join(map(str, loc))}: {msg}", "type": type_}


# ----------------------------------------------------------------------------- submission


def check_raw_spec(raw: Any, cls: type[JobConfig] | None) -> None:
    """Refuse, before validation, what validation itself would act on: nested configs given as
    file names (the validator would read that file on the API host) and model presets that are
    paths (ModelConfig reads the package data `model/presets/<preset>.yaml`)."""
    errors = []
    if isinstance(raw, dict) and cls is not None:
        for name in nested_models(cls):
            if isinstance(raw.get(name), str):
                errors.append(field_error((name,), "must be given inline; the service reads no config files",
                                          "inline_required"))

    def walk(node, loc):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "preset" and isinstance(v, str) and ("/" in v or "\\" in v or ".." in v):
                    errors.append(field_error((*loc, k), "a preset is a name, not a path", "invalid_preset"))
                walk(v, (*loc, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*loc, i))

    walk(raw, ())
    if errors:
        raise Rejected(422, errors)


def checked_spec(spec: JobConfig, tenant: Tenant) -> JobConfig:
    """The spec with every path resolved as the job will see it, or Rejected naming each bad field."""
    errors, resolved = [], {}
    for loc, value in path_values(spec):
        try:
            resolved[loc] = check_path(value, tenant)
        except (PathRejected, ValueError, OSError) as e:  # ValueError: e.g. unencodable characters
            errors.append(field_error(loc, f"{value!r}: {e}", "path_not_allowed"))
    if errors:
        raise Rejected(422, errors)
    return with_values(spec, resolved) if resolved else spec


def check_job_limits(spec: JobConfig, tenant: Tenant) -> dict[str, float]:
    res = resources(spec)
    errors = []
    fields = tuple(f for f in ("num_workers", "cpus_per_worker") if f in type(spec).model_fields) or ("kind",)
    if res["cpus"] > tenant.max_cpus_per_job:
        errors.append(field_error(fields, f"the job needs {res['cpus']:g} CPUs, over the tenant's "
                                  f"max_cpus_per_job of {tenant.max_cpus_per_job:g}", "quota_exceeded"))
    if res["gpus"] > tenant.max_gpus_per_job:
        gfields = tuple(f for f in ("num_workers", "use_gpu") if f in type(spec).model_fields) or ("kind",)
        errors.append(field_error(gfields, f"the job needs {res['gpus']:g} GPUs, over the tenant's "
                                  f"max_gpus_per_job of {tenant.max_gpus_per_job:g}", "quota_exceeded"))
    if errors:
        raise Rejected(422, errors)
    return res


def _same_or_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def input_lineage(session: Session, spec: JobConfig, tenant: str) -> dict[str, Any]:
    """Config hash, the parent job (whose `output` this spec reads), and the input manifest's hashes."""
    lineage: dict[str, Any] = {"config_sha256": spec.sha256()}
    inputs = [v for loc, v in path_values(spec) if loc[0] != "output"]
    earlier = session.execute(select(Job.id, Job.spec).where(Job.tenant == tenant).order_by(Job.seq.desc()).limit(1000))
    for job_id, jspec in earlier:
        out = jspec.get("output")
        if isinstance(out, str) and any(_same_or_under(v, out) for v in inputs):
            lineage["parent_job"] = job_id
            break
    data = getattr(spec, "data", None)
    if isinstance(data, str):
        manifest_uri = storage.join(data, "manifest.json")
        try:
            raw = storage.read_bytes(manifest_uri)
            lineage["input_manifest"] = manifest_uri
            lineage["input_manifest_sha256"] = storage.sha256_bytes(raw)
            lineage["tokenizer_sha256"] = json.loads(raw).get("tokenizer_sha256")
        except (OSError, ValueError):
            pass  # data is not a prepare output (e.g. JSONL records), or not written yet
    return lineage


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:15]


def submit(sessions: sessionmaker[Session], settings: Settings, tenant: Tenant, spec: JobConfig,
           idempotency_key: str | None) -> tuple[Job, bool]:
    """(record, created). An idempotency key seen before returns the first record, never a new job."""
    spec = checked_spec(spec, tenant)
    res = check_job_limits(spec, tenant)
    spec_json = spec.resolved()
    spec_sha = spec.sha256()
    with sessions() as s:
        if idempotency_key:
            if (existing := _by_key(s, tenant.name, idempotency_key)) is not None:
                return _same_spec(existing, spec_sha), False
        job_id = new_job_id()
        t = now()
        job = Job(id=job_id, tenant=tenant.name, kind=spec_json["kind"], status="SUBMITTING", spec=spec_json,
                  spec_sha256=spec_sha, idempotency_key=idempotency_key, submission_id=f"raylm-{job_id}",
                  resources=res, lineage=input_lineage(s, spec, tenant.name), created_at=t, updated_at=t)
        job.events.append(Event(status="SUBMITTING", at=t))
        s.add(job)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            existing = _by_key(s, tenant.name, idempotency_key)
            if existing is None:
                raise
            return _same_spec(existing, spec_sha), False
        # Counted after the insert, over committed rows: of two racing submissions at the limit the
        # later one always sees the other, so the limit is never exceeded.
        active = s.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant.name,
                                                                      Job.status.in_(ACTIVE)))
        if active > tenant.max_concurrent_jobs:
            s.execute(delete(Job).where(Job.id == job_id))
            s.commit()
            raise Rejected(429, f"tenant {tenant.name!r} has {active - 1} unfinished jobs; "
                                f"max_concurrent_jobs is {tenant.max_concurrent_jobs}")
    config_yaml = yaml.safe_dump(spec_json, sort_keys=False)
    try:
        ray_jobs.submit(settings, job_id, job.submission_id, job.kind, config_yaml, res, tenant.name)
    except ray_jobs.ClusterUnavailable as e:
        # The request may have reached Ray even though the reply did not reach us.
        try:
            on_cluster = ray_jobs.state(settings, job_id, job.submission_id)
        except ray_jobs.ClusterUnavailable:
            on_cluster = None
        if on_cluster is None:
            with sessions() as s:
                s.execute(delete(Job).where(Job.id == job_id))
                s.commit()
            raise Rejected(503, f"the job was not submitted: {e}") from e
    with sessions() as s:
        _transition(s, job_id, "SUBMITTING", "PENDING", None)
        return s.get(Job, job.seq), True


def _by_key(s: Session, tenant: str, key: str | None) -> Job | None:
    return s.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)) if key else None


def _same_spec(job: Job, spec_sha: str) -> Job:
    if job.spec_sha256 != spec_sha:
        raise Rejected(409, f"Idempotency-Key was already used for job {job.id} with a different spec")
    return job


# ----------------------------------------------------------------------------- reconciliation


def _transition(s: Session, job_id: str, old: str, new: str, message: str | None,
                ended_at: float | None = None) -> bool:
    t = now()
    values: dict[str, Any] = {"status": new, "updated_at": t}
    if message is not None:
        values["message"] = message
    if new == "RUNNING":
        values["started_at"] = t
    if new in TERMINAL:
        values["ended_at"] = ended_at or t
    changed = s.execute(update(Job).where(Job.id == job_id, Job.status == old).values(**values)).rowcount == 1
    if changed:
        s.add(Event(job_id=job_id, status=new, at=t, message=message))
    s.commit()
    return changed


def reconcile(sessions: sessionmaker[Session], settings: Settings, job_id: str,
              states: dict[str, ray_jobs.RayState] | None = None) -> None:
    """Bring one record up to date with the cluster, and finalize it once it has ended."""
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None or (job.status in TERMINAL and job.finalized):
            return
        if job.status in ACTIVE:
            if states is not None and settings.submit_target == "ray":
                st = states.get(job.submission_id)
            else:
                st = ray_jobs.state(settings, job.id, job.submission_id)
            if st is None:
                if job.status == "SUBMITTING" and now() - job.created_at < SUBMIT_GRACE_S:
                    return
                _transition(s, job.id, job.status, "FAILED",
                            "the cluster has no record of this job (the cluster restarted, or the "
                            "submitting process died before Ray accepted it)")
            elif st.status != job.status:
                if job.status == "SUBMITTING" and st.status != "PENDING":
                    _transition(s, job.id, "SUBMITTING", "PENDING", None)
                    job.status = "PENDING"
                _transition(s, job.id, job.status, st.status, st.message, st.end_time)
            s.refresh(job)
        if job.status in TERMINAL and not job.finalized:
            finalize(s, settings, job)


def reconcile_all(sessions: sessionmaker[Session], settings: Settings) -> int:
    with sessions() as s:
        ids = list(s.scalars(select(Job.id).where((Job.status.in_(ACTIVE)) | (Job.finalized.is_(False)))))
    if not ids:
        return 0
    states = ray_jobs.all_states(settings) if settings.submit_target == "ray" else None
    for job_id in ids:
        try:
            reconcile(sessions, settings, job_id, states)
        except Exception:
            log.exception("reconciling job %s failed", job_id)
    return len(ids)


def reconcile_forever(sessions: sessionmaker[Session], settings: Settings, stop: threading.Event,
                      interval_s: float = 2.0) -> None:
    while not stop.wait(interval_s):
        try:
            reconcile_all(sessions, settings)
        except ray_jobs.ClusterUnavailable as e:
            log.warning("reconciler: %s", e)
        except Exception:
            log.exception("reconciler pass failed")


def logs_uri(settings: Settings, job: Job) -> str:
    return storage.join(storage.absolute(settings.artifacts), "jobs", job.tenant, job.id, "logs.txt")


def finalize(s: Session, settings: Settings, job: Job) -> None:
    """Once per ended job: archive its log where it outlives the cluster, record what it produced."""
    text = ray_jobs.logs(settings, job.submission_id)
    if text is None and settings.submit_target == "ray" and ray_jobs.state(settings, job.id, job.submission_id):
        return  # Ray still has the job but did not hand over its log: try again on the next pass
    uri = None
    if text is not None:
        uri = logs_uri(settings, job)
        storage.write_text(uri, text)
    lineage = dict(job.lineage or {})
    lineage.update(produced(job.spec.get("output")))
    s.execute(update(Job).where(Job.id == job.id).values(finalized=True, logs_uri=uri, lineage=lineage))
    s.commit()


def produced(output: Any) -> dict[str, Any]:
    """What a finished job left in its output: a shard manifest's hashes, its newest checkpoint."""
    if not isinstance(output, str):
        return {}
    out: dict[str, Any] = {}
    try:
        raw = storage.read_bytes(storage.join(output, "manifest.json"))
        out["output_manifest_sha256"] = storage.sha256_bytes(raw)
        out["output_tokenizer_sha256"] = json.loads(raw).get("tokenizer_sha256")
    except (OSError, ValueError):
        pass
    try:
        from jobs.checkpoint.layout import latest_checkpoint

        out["checkpoint"] = latest_checkpoint(output)
    except (OSError, FileNotFoundError):
        pass
    return out


# ----------------------------------------------------------------------------- reading


def to_schema(job: Job) -> schemas.Job:
    return schemas.Job(
        id=job.id, kind=job.kind, status=job.status, tenant=job.tenant, submission_id=job.submission_id,
        message=job.message, idempotency_key=job.idempotency_key, resources=job.resources, spec=job.spec,
        timings=timings(job), lineage=job.lineage or {})


def timings(job: Job) -> schemas.Timings:
    end = job.ended_at or (now() if job.status == "RUNNING" else None)
    return schemas.Timings(
        created_at=job.created_at, started_at=job.started_at, ended_at=job.ended_at,
        queued_s=(job.started_at - job.created_at) if job.started_at else None,
        run_s=(end - job.started_at) if job.started_at and end else None)


def detail(job: Job) -> schemas.JobDetail:
    return schemas.JobDetail(
        **to_schema(job).model_dump(),
        history=[schemas.StatusEvent(status=e.status, at=e.at, message=e.message) for e in job.events],
        metrics=last_metrics(job.spec.get("output")), artifacts=artifacts(job))


def last_metrics(output: Any) -> dict | None:
    if not isinstance(output, str):
        return None
    try:
        lines = storage.read_text(storage.join(output, "metrics.jsonl")).splitlines()
    except (OSError, ValueError):
        return None
    for line in reversed(lines):
        if line.strip():
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _files(output: str) -> list[tuple[str, int | None]]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(output, info.size)]
    if info.type != pafs.FileType.Directory:
        return []
    prefix = "s3://" if storage.is_s3(output) else ""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((prefix + i.path, i.size) for i in infos if i.type == pafs.FileType.File)


def artifacts(job: Job) -> schemas.Artifacts:
    output = job.spec.get("output")
    out = schemas.Artifacts(output=output if isinstance(output, str) else None, logs=job.logs_uri)
    if not isinstance(output, str):
        return out
    try:
        files = _files(output)
    except OSError:
        return out
    out.truncated = len(files) > MAX_LISTED_FILES
    base = output.rstrip("/")
    checkpoints: dict[str, list[str]] = {}
    for uri, size in files[:MAX_LISTED_FILES]:
        rel = uri[len(base) + 1:] if uri.startswith(base + "/") else uri.rsplit("/", 1)[-1]
        name = rel.rsplit("/", 1)[-1]
        top = rel.split("/", 1)[0]
        f = schemas.ArtifactFile(path=rel, uri=uri, size=size)
        if top.startswith("checkpoint_") and "/" in rel:
            checkpoints.setdefault(top, []).append(rel.split("/", 1)[1])
        elif name == "manifest.json" or name.endswith(".manifest.json"):
            out.manifests.append(f)
        elif name.endswith(".jsonl") and "metrics" in name or name.endswith(".csv"):
            out.metrics.append(f)
        elif name.endswith((".png", ".svg")):
            out.plots.append(f)
        else:
            out.other.append(f)
    out.checkpoints = [schemas.Checkpoint(name=n, uri=storage.join(base, n), files=fs)
                       for n, fs in sorted(checkpoints.items())]
    return out


def artifact_uri(job: Job, rel: str) -> str | None:
    """The URI of one file of the job's output, if `rel` names one (no escaping the output)."""
    output = job.spec.get("output")
    if not isinstance(output, str):
        return None
    for uri, _ in _files(output)[: MAX_LISTED_FILES * 10]:
        r = uri[len(output.rstrip("/")) + 1:] if uri.startswith(output.rstrip("/") + "/") else uri.rsplit("/", 1)[-1]
        if r == rel:
            return uri
    return None
