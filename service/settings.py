"""Service settings, read from `RAYLM_*` environment variables."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
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
    """Where the service keeps what must outlive the cluster (job logs); a local path or s3:// prefix.
    Must not lie inside any tenant's prefixes."""
    submit_target: Literal["ray", "kubernetes"] = "ray"
    """Submit through Ray's job API, or as KubeRay RayJobs."""
    k8s_namespace: str = "default"
    """Namespace of the RayJobs when submit_target is kubernetes."""
    k8s_image: str | None = None
    """Container image of the RayJobs when submit_target is kubernetes."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body accepted (413 above it)."""
    max_list_items: int = Field(1000, ge=1)
    """Most items in any one list or mapping of a spec (e.g. `inputs`, `prompts`)."""
    serve_hosts: list[str] = ["127.0.0.1"]
    """Interfaces a `serve` job may bind; add 0.0.0.0 only to let tenants expose servers off the node."""
    serve_ports: tuple[int, int] = (8100, 8199)
    """Inclusive range of ports a `serve` job may bind; a spec without `port` gets the lowest free one."""

    @field_validator("serve_ports")
    @classmethod
    def _check_ports(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1024 <= v[0] <= v[1] <= 65535:
            raise ValueError(f"need 1024 <= low <= high <= 65535, got {list(v)}")
        return v


@functools.cache
def get_settings() -> Settings:
    return Settings()
