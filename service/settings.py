"""Service settings, read from `RAYLM_*` environment variables."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYLM_", use_attribute_docstrings=True)

    database_url: str = "sqlite:///raylm-service.db"
    """SQLAlchemy URL of the job store (SQLite file by default; e.g. postgresql+psycopg://... in production)."""
    tokens_file: Path | None = None
    """YAML/JSON file with the tenants, their tokens and limits (see docs/api.md)."""
    tokens: str | None = None
    """The same document inline (YAML/JSON), for deployments that pass secrets as environment variables."""
    ray_address: str | None = None
    """Dashboard URL of the Ray cluster (http://head:8265). Unset: attach to a local Ray, or start one."""
    artifacts: str = "runs/service"
    """Where the service keeps what must outlive the cluster (job logs); a local path or s3:// prefix."""
    submit_target: Literal["ray", "kubernetes"] = "ray"
    """Submit through Ray's job API, or as KubeRay RayJobs."""
    k8s_namespace: str = "default"
    """Namespace of the RayJobs when submit_target is kubernetes."""
    k8s_image: str | None = None
    """Container image of the RayJobs when submit_target is kubernetes."""


@functools.cache
def get_settings() -> Settings:
    return Settings()
