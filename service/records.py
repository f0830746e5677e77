"""Job records: submission, reconciliation with the cluster, lineage, logs and artifacts.

Plain functions over a SQLAlchemy session. Status changes are conditional updates (`WHERE status
= <what we saw>`), so the background reconciler, request handlers and a second API process can
all reconcile the same job without writing an event twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import uuid
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cluster import storage
from jobs.checkpoint.layout import TRAIN_STATE, manifest_file
from jobs.config import JobConfig
from service import files, ray_jobs, schemas
from service.db import ACTIVE, ADMITTED, TERMINAL, AdmissionLock, Event, Job, now
from service.limits import clean_errors, shape_errors, short
from service.security import PathRejected, Tenant, check_path, tenants
from service.settings import Settings
from service.specs import (CLASS_BY_KIND, most, nested_models, path_values, resource_fields, resources,
                           sizes_to_cluster, spec_adapter, with_values)

log = logging.getLogger("raylm.service")

# A record still SUBMITTING after this long was left behind by a process that died mid-submit.
SUBMIT_GRACE_S = 120
MAX_LISTED_FILES = 2000
MAX_MANIFEST_BYTES = 16 << 20  # manifest.json files the service hashes for lineage
METRICS_TAIL_BYTES = 64 << 10  # the end of metrics.jsonl, where its last record is
METRICS_SERIES_BYTES = 32 << 20  # the most of metrics.jsonl read for a curve (its newest records)


class Rejected(Exception):
    """A request the service refuses; `status` is the HTTP code, `errors` FastAPI-style details."""

    def __init__(self, status: int, errors: list[dict] | str):
        self.status = status
        self.errors = errors
        super().__init__(str(errors))


def field_error(loc: tuple, msg: str, type_: str) -> dict:
    return {"loc": ["body", *loc], "msg": f"{'.'.join(map(str, loc))}: {msg}", "type": type_}


# ----------------------------------------------------------------------------- submission


def check_raw_spec(raw: Any, cls: type[JobConfig] | None, tenant: Tenant, settings: Settings) -> None:
    """Refuse, before validation, what is over a limit or what validation itself would act on.

    Limits: nesting, list lengths, numbers (service.limits.shape_errors), and worker counts over the
    tenant's CPU quota (an elastic `num_workers: [1, 10**9]` would otherwise make the config's
    validator check every world size). Acted on by validation: nested configs given as file names
    (the validator would read that file on the API host) and model presets that are paths
    (ModelConfig reads the package data `model/presets/<preset>.yaml`)."""
    errors = [field_error(loc, msg, type_) for loc, msg, type_ in shape_errors(raw, settings.max_list_items)]
    if errors:
        raise Rejected(422, errors)
    if isinstance(raw, dict) and cls is not None:
        for name in nested_models(cls):
            if isinstance(raw.get(name), str):
                errors.append(field_error((name,), "must be given inline; the service reads no config files",
                                          "inline_required"))
    stack: list[tuple[Any, tuple]] = [(raw, ())]
    while stack:
        node, loc = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "preset" and isinstance(v, str) and ("/" in v or "\\" in v or ".." in v):
                    errors.append(field_error((*loc, k), "a preset is a name, not a path", "invalid_preset"))
                if k in ("num_workers", "num_replicas") and _counts(v) and most(v) > tenant.max_cpus_per_job:
                    # each worker or replica holds at least one CPU
                    errors.append(field_error((*loc, k), f"{short(v)} would need at least {most(v)} CPUs, over the "
                                              f"tenant's max_cpus_per_job of {tenant.max_cpus_per_job:g}",
                                              "quota_exceeded"))
                stack.append((v, (*loc, k)))
        elif isinstance(node, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(node))
    if errors:
        raise Rejected(422, errors)


def _counts(v: Any) -> bool:
    """An int, or a list of ints (an elastic range), as a worker count is written."""
    ints = v if isinstance(v, list) and v else [v]
    return all(isinstance(x, int) and not isinstance(x, bool) for x in ints)


def check_room(sessions: sessionmaker[Session], tenant: Tenant, idempotency_key: str | None) -> None:
    """429 when the tenant already has max_concurrent_jobs unfinished, before any costly check (the
    exact, race-free count is taken again after the insert). A retry of a known Idempotency-Key
    passes: it creates nothing and is answered with its first job."""
    with sessions() as s:
        if idempotency_key and _by_key(s, tenant.name, idempotency_key) is not None:
            return
        active = s.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant.name,
                                                                      Job.status.in_(ACTIVE)))
    if active >= tenant.max_concurrent_jobs:
        raise Rejected(429, f"tenant {tenant.name!r} has {active} unfinished jobs; "
                            f"max_concurrent_jobs is {tenant.max_concurrent_jobs}")


def parse_spec(raw: Any, tenant: Tenant, settings: Settings, sessions: sessionmaker[Session],
               idempotency_key: str | None = None) -> JobConfig:
    """A request body (parsed JSON) as a validated spec; the cheap refusals first."""
    check_room(sessions, tenant, idempotency_key)
    if not isinstance(raw, dict):
        raise Rejected(422, [{"loc": ["body"], "msg": "a spec is a JSON object with a `kind`", "type": "dict_type"}])
    kind = raw.get("kind")
    cls = CLASS_BY_KIND.get(kind) if isinstance(kind, str) else None
    check_raw_spec(raw, cls, tenant, settings)
    try:
        return spec_adapter.validate_python(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise Rejected(422, clean_errors({**err, "loc": ("body", *err["loc"])} for err in errors)) from None
    except Exception as e:  # a validator that fails with something other than a ValueError
        log.warning("validating a %s spec raised %s: %s", short(kind, 20), type(e).__name__, e)
        raise Rejected(422, [{"loc": ["body"], "msg": f"invalid spec: its validation failed ({type(e).__name__})",
                              "type": "value_error"}]) from None


def checked_spec(spec: JobConfig, tenant: Tenant) -> JobConfig:
    """The spec with every path resolved as the job will see it, or Rejected naming each bad field."""
    errors, resolved = [], {}
    for loc, value in path_values(spec):
        try:
            resolved[loc] = check_path(value, tenant)
        except PathRejected as e:
            errors.append(field_error(loc, f"{short(value)}: {e}", "path_not_allowed"))
        except (ValueError, OSError):  # e.g. unencodable characters; the OS's message names paths
            errors.append(field_error(loc, f"{short(value)}: not a usable path", "path_not_allowed"))
    if errors:
        raise Rejected(422, errors)
    return with_values(spec, resolved) if resolved else spec


def check_job_limits(spec: JobConfig, tenant: Tenant) -> dict[str, float]:
    """The job's resources, or Rejected naming the one field to change (loc is a path to a single
    field; the message says how the figure is made up)."""
    res = resources(spec)
    cpu_loc, how, gpu_loc = resource_fields(spec)
    errors = []
    if res["cpus"] > tenant.max_cpus_per_job:
        errors.append(field_error(cpu_loc, f"the job needs {_num(res['cpus'])} CPUs ({how}), over the tenant's "
                                  f"max_cpus_per_job of {_num(tenant.max_cpus_per_job)}", "quota_exceeded"))
    if res["gpus"] > tenant.max_gpus_per_job:
        errors.append(field_error(gpu_loc, f"the job needs {_num(res['gpus'])} GPUs ({how}, one GPU each with "
                                  f"use_gpu), over the tenant's max_gpus_per_job of "
                                  f"{_num(tenant.max_gpus_per_job)}", "quota_exceeded"))
    if errors:
        raise Rejected(422, errors)
    return res


def _num(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e15 else f"{x:.3e}"


# ----------------------------------------------------------------------------- servers


def bind_server(s: Session, spec: JobConfig, settings: Settings, asked: set[str]) -> JobConfig:
    """A spec that runs a server (`host`/`port` fields: serve) with the address it may bind.

    Hosts: only settings.serve_hosts (loopback unless the operator adds 0.0.0.0). Ports: only
    settings.serve_ports, never the Ray dashboard's; a spec without `port` gets the lowest one no
    other unfinished job holds. Call with the admission lock held, so two submissions cannot take
    the same port. `asked`: the fields the tenant set. One such job at a time per cluster: a Ray cluster runs one Serve instance, and a
    second job's deployment would replace the first's application (another tenant's, perhaps).
    """
    fields = type(spec).model_fields
    if "port" not in fields:
        return spec
    others = [j for j in s.scalars(select(Job).where(Job.status.in_(ACTIVE))) if "port" in (j.spec or {})]
    if others:
        raise Rejected(409, "another server job (serve) is running or queued on this cluster; a cluster runs "
                            "one at a time, so wait for it to end")
    update: dict[str, Any] = {}
    errors = []
    if "host" in fields:
        if "host" in asked and spec.host not in settings.serve_hosts:
            errors.append(field_error(("host",), f"{short(spec.host)} is not allowed; a server job may bind "
                                      f"{settings.serve_hosts}", "host_not_allowed"))
        elif spec.host not in settings.serve_hosts:
            update["host"] = settings.serve_hosts[0]
    low, high = settings.serve_ports
    taken = {ray_jobs.dashboard_port(settings)}
    if "port" in asked:
        if not low <= spec.port <= high or spec.port in taken:
            errors.append(field_error(("port", ), f"{spec.port} is not allowed; a server job may bind a port in "
                                      f"{low}-{high}, or leave `port` out to be given one", "port_not_allowed"))
    else:
        free = next((p for p in range(low, high + 1) if p not in taken), None)
        if free is None:
            raise Rejected(409, "no port of the service's serve_ports is free")
        update["port"] = free
    if errors:
        raise Rejected(422, errors)
    return spec.model_copy(update=update) if update else spec


def _same_or_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def input_lineage(session: Session, spec: JobConfig, tenant: Tenant) -> dict[str, Any]:
    """Config hash, the parent job (whose `output` this spec reads), and the input manifest's hashes."""
    lineage: dict[str, Any] = {"config_sha256": spec.sha256()}
    inputs = [v for loc, v in path_values(spec) if loc[0] != "output"]
    earlier = session.execute(select(Job.id, Job.spec).where(Job.tenant == tenant.name).order_by(Job.seq.desc())
                              .limit(1000))
    for job_id, jspec in earlier:
        out = jspec.get("output")
        if isinstance(out, str) and any(_same_or_under(v, out) for v in inputs):
            lineage["parent_job"] = job_id
            break
    data = getattr(spec, "data", None)
    if isinstance(data, str):
        try:
            raw = files.read_bytes(data, "manifest.json", tenant.prefixes, MAX_MANIFEST_BYTES)
            doc = json.loads(raw)
            lineage["input_manifest"] = storage.join(data, "manifest.json")
            lineage["input_manifest_sha256"] = storage.sha256_bytes(raw)
            lineage["tokenizer_sha256"] = doc.get("tokenizer_sha256") if isinstance(doc, dict) else None
        except (files.NotAllowed, OSError, ValueError):
            pass  # data is not a prepare output (e.g. JSONL records), not written yet, or a link out
    return lineage


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:15]


def submit(sessions: sessionmaker[Session], settings: Settings, tenant: Tenant, spec: JobConfig,
           idempotency_key: str | None) -> tuple[Job, bool]:
    """(record, created). An idempotency key seen before returns the first record, never a new job.

    The record starts QUEUED; `admit` then hands it to the cluster once it fits, right away when
    the cluster has room."""
    asked = set(spec.model_fields_set)  # before checked_spec, whose revalidation marks every field set
    spec = checked_spec(spec, tenant)
    res = check_job_limits(spec, tenant)
    spec_sha = spec.sha256()  # of the spec as asked for (before the service picks a port): retries match
    with sessions() as s:
        if idempotency_key:
            if (existing := _by_key(s, tenant.name, idempotency_key)) is not None:
                return _same_spec(existing, spec_sha), False
        if "port" in type(spec).model_fields:
            _lock(s)  # held until the commit below: the port picked is not picked twice
            spec = bind_server(s, spec, settings, asked)
        spec_json = spec.resolved()
        job_id = new_job_id()
        t = now()
        job = Job(id=job_id, tenant=tenant.name, kind=spec_json["kind"], status="QUEUED", spec=spec_json,
                  spec_sha256=spec_sha, idempotency_key=idempotency_key, submission_id=f"raylm-{job_id}",
                  resources=res, lineage=input_lineage(s, spec, tenant), created_at=t, updated_at=t)
        job.events.append(Event(status="QUEUED", at=t))
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
    try:
        admit(sessions, settings)
    except ray_jobs.ClusterUnavailable as e:
        log.warning("admission after submit: %s", e)  # the job stays QUEUED; the reconciler retries
    with sessions() as s:
        return s.get(Job, job.seq), True


# ----------------------------------------------------------------------------- admission
#
# Every job's driver holds a CPU (ray_jobs.DRIVER_CPUS) and its work needs more (service.specs.
# resources). Handed to Ray all at once, a burst of jobs can fill every CPU with drivers whose work
# then waits forever. So the service admits a job only when its driver and its work fit the
# cluster's CPUs and GPUs beside every job already admitted: whatever the order Ray runs things
# in, each admitted job can get what it needs. Jobs wait QUEUED in submission order; one that
# needs more than the whole cluster waits with a message saying so and does not hold up the rest.


def _lock(s: Session) -> None:
    s.execute(update(AdmissionLock).where(AdmissionLock.id == 1).values(at=now()))


def need(job: Job, totals: dict[str, float]) -> dict[str, float]:
    res = job.resources or {}
    out = {"cpus": float(res.get("cpus", 1)) + ray_jobs.DRIVER_CPUS, "gpus": float(res.get("gpus", 0))}
    if sizes_to_cluster(job.kind):
        out = {k: min(v, totals[k]) for k, v in out.items()}
    return out


def admit(sessions: sessionmaker[Session], settings: Settings) -> list[str]:
    """Hand QUEUED jobs to the cluster, oldest first, while they fit; returns the ids handed over."""
    with sessions() as s:
        if not s.scalar(select(func.count()).select_from(Job).where(Job.status == "QUEUED")):
            return []
    unbounded = settings.submit_target == "kubernetes"  # a RayJob brings its own cluster
    totals = {"cpus": float("inf"), "gpus": float("inf")} if unbounded else ray_jobs.cluster_totals(settings)
    claimed: list[str] = []
    with sessions() as s:
        _lock(s)  # serializes admission across threads and API processes until the commit
        held = {"cpus": 0.0, "gpus": 0.0}
        for job in s.scalars(select(Job).where(Job.status.in_(ADMITTED))).all():
            for k, v in need(job, totals).items():
                held[k] += v
        for job in s.scalars(select(Job).where(Job.status == "QUEUED").order_by(Job.seq)).all():
            n = need(job, totals)
            if any(n[k] > totals[k] for k in n):
                _note(job, f"queued: needs {_num(n['cpus'])} CPUs and {_num(n['gpus'])} GPUs (driver included); "
                           f"the cluster has {_num(totals['cpus'])} and {_num(totals['gpus'])}")
                continue
            if any(held[k] + n[k] > totals[k] for k in n):
                _note(job, f"queued: waiting for {_num(n['cpus'])} CPUs and {_num(n['gpus'])} GPUs (driver "
                           f"included) to be free on the cluster")
                break  # first come, first served: a later, smaller job does not overtake it
            job.message = None  # the "queued: ..." note no longer holds
            if _transition(s, job.id, "QUEUED", "SUBMITTING", None, commit=False):
                claimed.append(job.id)
                for k in n:
                    held[k] += n[k]
        s.commit()
    for job_id in claimed:
        _hand_over(sessions, settings, job_id)
    return claimed


def _note(job: Job, message: str) -> None:
    if job.message != message:
        job.message = message


def _hand_over(sessions: sessionmaker[Session], settings: Settings, job_id: str) -> None:
    """Submit an admitted (SUBMITTING) job to the cluster; PENDING once Ray has it, FAILED if it refused."""
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        config_yaml = yaml.safe_dump(job.spec, sort_keys=False)
        try:
            ray_jobs.submit(settings, job.id, job.submission_id, job.kind, config_yaml, job.resources, job.tenant)
        except ray_jobs.ClusterUnavailable as e:
            # The request may have reached Ray even though the reply did not reach us.
            try:
                on_cluster = ray_jobs.state(settings, job.id, job.submission_id)
            except ray_jobs.ClusterUnavailable:
                on_cluster = None
            if on_cluster is None:
                log.warning("job %s: the cluster did not take it: %s", job.id, e)
                _transition(s, job.id, "SUBMITTING", "FAILED", "the cluster did not take the job (see the "
                            "service's log)")
                return
        _transition(s, job.id, "SUBMITTING", "PENDING", None)


def stop_queued(sessions: sessionmaker[Session], job_id: str) -> bool:
    """Stop a job the cluster has not been given yet; False if it has been admitted meanwhile."""
    with sessions() as s:
        return _transition(s, job_id, "QUEUED", "STOPPED", "stopped before it was admitted to the cluster")


def _by_key(s: Session, tenant: str, key: str | None) -> Job | None:
    return s.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)) if key else None


def _same_spec(job: Job, spec_sha: str) -> Job:
    if job.spec_sha256 != spec_sha:
        raise Rejected(409, f"Idempotency-Key was already used for job {job.id} with a different spec")
    return job


# ----------------------------------------------------------------------------- reconciliation


def _transition(s: Session, job_id: str, old: str, new: str, message: str | None,
                ended_at: float | None = None, commit: bool = True) -> bool:
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
    if commit:
        s.commit()
    return changed


def reconcile(sessions: sessionmaker[Session], settings: Settings, job_id: str,
              states: dict[str, ray_jobs.RayState] | None = None) -> None:
    """Bring one record up to date with the cluster, and finalize it once it has ended."""
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.status == "QUEUED" or (job.status in TERMINAL and job.finalized):
            return  # a QUEUED job is the service's alone: the cluster has not been given it
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
    admit(sessions, settings)  # jobs that ended have made room
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


def allowed_roots(settings: Settings, tenant: str) -> list[str]:
    """Where the service may read files for a tenant: its prefixes as configured now (a tenant
    removed from the configuration has none)."""
    return next((list(t.prefixes) for t in tenants(settings) if t.name == tenant), [])


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
    lineage.update(produced(job.spec.get("output"), allowed_roots(settings, job.tenant)))
    s.execute(update(Job).where(Job.id == job.id).values(finalized=True, logs_uri=uri, lineage=lineage))
    s.commit()


def produced(output: Any, allowed: list[str]) -> dict[str, Any]:
    """What a finished job left in its output: a shard manifest's hashes, its newest checkpoint."""
    if not isinstance(output, str) or not any(files.under(output.rstrip("/"), a) for a in allowed):
        return {}
    out: dict[str, Any] = {}
    try:
        raw = files.read_bytes(output, "manifest.json", allowed, MAX_MANIFEST_BYTES)
        doc = json.loads(raw)
        out["output_manifest_sha256"] = storage.sha256_bytes(raw)
        out["output_tokenizer_sha256"] = doc.get("tokenizer_sha256") if isinstance(doc, dict) else None
    except (files.NotAllowed, OSError, ValueError):
        pass
    try:
        if (ck := newest_checkpoint(output, allowed)) is not None:
            out["checkpoint"] = ck
    except OSError:
        pass
    return out


def newest_checkpoint(output: str, allowed: list[str]) -> str | None:
    """The newest `checkpoint_<step>/` of a run whose files are all there: its train_state.json
    names world_size rank manifests (written last by each rank; jobs.checkpoint.layout) and each
    names the files it wrote.

    Found through service.files (no link followed, a bounded listing) and without reading the
    weights: the API must not walk or hash whatever a tenant's output holds or links to. Checksums
    are verified by the jobs that load a checkpoint."""
    found, _ = files.list_files(output, allowed, MAX_LISTED_FILES * 10)
    by_dir: dict[str, set[str]] = {}
    for rel, _ in found:
        top, _, rest = rel.partition("/")
        if top.startswith("checkpoint_") and rest:
            by_dir.setdefault(top, set()).add(rest)
    for name in sorted(by_dir, reverse=True):
        have = by_dir[name]
        try:
            state = json.loads(files.read_bytes(output, f"{name}/{TRAIN_STATE}", allowed, 1 << 20))
            world = int(state["world_size"])
            if not 0 < world <= len(have):  # a tenant writes this file: no loop it sizes
                continue
            manifests = [manifest_file(r) for r in range(world)]
            if not set(manifests) <= have:
                continue
            if all(set(json.loads(files.read_bytes(output, f"{name}/{m}", allowed, MAX_MANIFEST_BYTES))["files"])
                   <= have for m in manifests):
                return storage.join(output.rstrip("/"), name)
        except (files.NotAllowed, OSError, ValueError, KeyError, TypeError):
            continue
    return None


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


def detail(job: Job, allowed: list[str]) -> schemas.JobDetail:
    return schemas.JobDetail(
        **to_schema(job).model_dump(),
        history=[schemas.StatusEvent(status=e.status, at=e.at, message=e.message) for e in job.events],
        metrics=last_metrics(job.spec.get("output"), allowed), artifacts=artifacts(job, allowed))


def last_metrics(output: Any, allowed: list[str]) -> dict | None:
    if not isinstance(output, str):
        return None
    try:
        lines = files.read_tail(output, "metrics.jsonl", allowed, METRICS_TAIL_BYTES).decode("utf-8", "replace")
    except (files.NotAllowed, OSError):
        return None
    for line in reversed(lines.splitlines()):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def metric_series(output: Any, allowed: list[str], max_points: int) -> schemas.Metrics:
    """The numeric fields of the job's metrics.jsonl, thinned to at most `max_points` records
    (evaluation records are thinned apart from the rest, so a sparse val curve keeps its points)."""
    out = schemas.Metrics()
    if not isinstance(output, str):
        return out
    try:
        f = files.open_file(output, "metrics.jsonl", allowed)
    except (files.NotAllowed, OSError):
        return out
    try:
        start = max(0, f.size - METRICS_SERIES_BYTES)
        text = f.read_at(start, f.size - start).decode("utf-8", "replace")
    finally:
        f.close()
    lines = text.splitlines()[1 if start else 0:]  # a cut first line is not a record
    out.truncated = start > 0
    train, evals = [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        rec = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)}
        (evals if any(k.startswith(("val_", "eval_")) for k in rec) else train).append(rec)
    out.total = len(train) + len(evals)
    out.records = sorted(_thin(train, max_points) + _thin(evals, max_points), key=lambda r: r["step"])
    return out


def _thin(recs: list[dict], n: int) -> list[dict]:
    if len(recs) <= n:
        return recs
    every = -(-len(recs) // n)
    return recs[::every][: n - 1] + recs[-1:]  # always the newest


def open_report(job: Job, allowed: list[str]) -> files.Opened | str:
    """The job's report.html artifact, opened; or, when it has none (yet), a page built from copies
    of the files the report reads, taken through service.files (checkpoints listed, not verified)."""
    from jobs.report import REPORT_FILE, build_html
    from jobs.report.files import report_inputs

    try:
        return open_artifact(job, REPORT_FILE, allowed)
    except (files.NotAllowed, OSError):
        pass
    a = artifacts(job, allowed)
    sizes = {f.path: f.size or 0 for f in (*a.manifests, *a.metrics, *a.plots, *a.other)}
    sizes.update({f"{ck.name}/{f}": 0 for ck in a.checkpoints for f in ck.files})
    with tempfile.TemporaryDirectory(prefix="raylm-report-") as tmp:
        for rel in report_inputs(sizes):
            try:
                f = open_artifact(job, rel, allowed)
            except (files.NotAllowed, OSError):
                continue  # gone, or a link out since it was listed
            dest = os.path.join(tmp, *files.check_rel(rel))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as w:
                for chunk in f.chunks():
                    w.write(chunk)
        return build_html(tmp, verify_checkpoints=False, origin=a.output)


def artifacts(job: Job, allowed: list[str]) -> schemas.Artifacts:
    """The job's output files, sorted into kinds. Links are listed only when they resolve inside
    the output (service.files); nothing outside it is listed."""
    output = job.spec.get("output")
    out = schemas.Artifacts(output=output if isinstance(output, str) else None, logs=job.logs_uri)
    if not isinstance(output, str):
        return out
    try:
        found, out.truncated = files.list_files(output, allowed, MAX_LISTED_FILES)
    except OSError:
        return out
    base = output.rstrip("/")
    single = len(found) == 1 and found[0][0] == base.rsplit("/", 1)[-1] and not _is_dir(base)
    checkpoints: dict[str, list[str]] = {}
    for rel, size in found:
        uri = base if single else storage.join(base, rel)
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


def _is_dir(uri: str) -> bool:
    if storage.is_s3(uri):
        import pyarrow.fs as pafs

        fs, path = storage.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory
    return os.path.isdir(uri) and not os.path.islink(uri)


def open_artifact(job: Job, rel: str, allowed: list[str]) -> files.Opened:
    """One file of the job's output by its path in the listing (files.NotAllowed for anything else,
    and for a link that leads out of the output)."""
    output = job.spec.get("output")
    if not isinstance(output, str):
        raise files.NotAllowed("the job has no output")
    base = output.rstrip("/")
    if not _is_dir(base):  # a single-file output: listed (and fetched) by its own name
        name = base.rsplit("/", 1)[-1]
        if rel != name:
            raise files.NotAllowed("no such file")
        return files.open_file(base.rsplit("/", 1)[0] or "/", name, allowed)
    return files.open_file(base, rel, allowed)


def open_log(settings: Settings, job: Job) -> files.Opened:
    """The job's archived log, if it is where the service archives this job's log."""
    expected = logs_uri(settings, job)
    if job.logs_uri != expected:
        raise files.NotAllowed("no archived log")
    root, name = expected.rsplit("/", 1)
    return files.open_file(root, name, [storage.absolute(settings.artifacts)])
