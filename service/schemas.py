"""Response bodies of the control API (shared by the server and the SDK)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class StatusEvent(BaseModel):
    status: str
    at: float
    message: str | None = None


class Timings(BaseModel):
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    queued_s: float | None = None
    """From submission until Ray reported the job running."""
    run_s: float | None = None
    """From running until the end (or until now, while running)."""


class ArtifactFile(BaseModel):
    path: str
    """Relative to the job's output; the download path under /v1/jobs/{id}/artifacts/."""
    uri: str
    size: int | None = None


class Checkpoint(BaseModel):
    name: str
    uri: str
    files: list[str]


class Artifacts(BaseModel):
    output: str | None = None
    checkpoints: list[Checkpoint] = []
    manifests: list[ArtifactFile] = []
    metrics: list[ArtifactFile] = []
    plots: list[ArtifactFile] = []
    logs: str | None = None
    """Where the job's log was archived when it ended."""
    other: list[ArtifactFile] = []
    truncated: bool = False


class Job(BaseModel):
    id: str
    kind: str
    status: str
    tenant: str
    submission_id: str
    message: str | None = None
    idempotency_key: str | None = None
    resources: dict[str, float]
    spec: dict[str, Any]
    timings: Timings
    lineage: dict[str, Any] = {}


class JobDetail(Job):
    history: list[StatusEvent] = []
    metrics: dict[str, Any] | None = None
    """The last record of the job's metrics.jsonl, when it writes one."""
    artifacts: Artifacts | None = None


class Metrics(BaseModel):
    records: list[dict[str, int | float]] = []
    """Numeric fields of metrics.jsonl records (step, loss, val_loss, lr, ...), oldest first."""
    total: int = 0
    """Records read, before thinning."""
    truncated: bool = False
    """Only the newest part of a very long metrics.jsonl was read."""


class JobList(BaseModel):
    items: list[Job]
    total: int
    limit: int
    offset: int


class Node(BaseModel):
    node_id: str | None
    ip: str | None
    state: str | None
    is_head: bool
    cpus: float
    gpus: float
    free_cpus: float
    free_gpus: float


class Cluster(BaseModel):
    nodes: list[Node]
    cpus: float
    gpus: float
    free_cpus: float
    free_gpus: float


class Health(BaseModel):
    status: str
    database: bool


class Tenant(BaseModel):
    name: str
    max_concurrent_jobs: int
    max_cpus_per_job: float
    max_gpus_per_job: float
    prefixes: list[str]
