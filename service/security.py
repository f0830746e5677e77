"""Tenants, bearer tokens, quotas and the storage-path rules of the control API.

The tenants document (RAYLM_TOKENS_FILE, or inline in RAYLM_TOKENS) is YAML or JSON:

    tenants:
      alice:
        tokens: ["sha256:9f86d0...", "a-plain-token"]   # hashes preferred; plain ones are hashed on load
        max_concurrent_jobs: 4
        max_cpus_per_job: 8
        max_gpus_per_job: 0
        prefixes: ["/data/alice", "s3://lm-bucket/alice"]

Tokens are kept only as SHA-256 digests and every presented token is compared with each of them
in constant time, so neither the store nor the comparison reveals a token.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import hmac
import os
import re
from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.settings import Settings


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Tenant name (also a directory name under the artifact root)."""
    tokens: list[str] = Field(min_length=1)
    """Bearer tokens: `sha256:<hex>` digests, or plain tokens (hashed on load)."""
    max_concurrent_jobs: int = Field(4, ge=0)
    """Jobs not yet finished (submitted, pending or running) at any one time."""
    max_cpus_per_job: float = Field(8, ge=0)
    """CPUs one job may reserve (see service.specs.resources)."""
    max_gpus_per_job: float = Field(0, ge=0)
    """GPUs one job may reserve."""
    prefixes: list[str] = Field(default_factory=list)
    """Storage the tenant's specs may name: absolute local directories or s3://bucket/prefix."""

    @field_validator("tokens")
    @classmethod
    def _hash(cls, v: list[str]) -> list[str]:
        return [t.removeprefix("sha256:") if t.startswith("sha256:") else token_digest(t) for t in v]

    @field_validator("prefixes")
    @classmethod
    def _check_prefixes(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            if p.startswith("s3://"):
                out.append(p.rstrip("/"))
            elif os.path.isabs(p):
                out.append(os.path.realpath(p))
            else:
                raise ValueError(f"prefix {p!r} must be an absolute directory or an s3:// URI")
        return out


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def load_tenants(tokens_file: str | None, tokens: str | None) -> tuple[Tenant, ...]:
    docs = []
    if tokens_file:
        docs.append(yaml.safe_load(Path(tokens_file).read_text()) or {})
    if tokens:
        docs.append(yaml.safe_load(tokens) or {})
    out: list[Tenant] = []
    for doc in docs:
        for name, body in (doc.get("tenants") or {}).items():
            out.append(Tenant(name=name, **body))
    return tuple(out)


def tenants(settings: Settings) -> tuple[Tenant, ...]:
    return load_tenants(str(settings.tokens_file) if settings.tokens_file else None, settings.tokens)


def authenticate(settings: Settings, token: str) -> Tenant | None:
    digest = token_digest(token)
    found = None
    # Compare against every token, so the time taken does not depend on which one matched.
    for tenant in tenants(settings):
        for known in tenant.tokens:
            if hmac.compare_digest(digest, known):
                found = tenant
    return found


# ----------------------------------------------------------------------------- storage paths


class PathRejected(ValueError):
    """A spec names storage outside the tenant's prefixes, or in a form the service does not accept."""


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_GLOB = re.compile(r"[*?\[]")


MAX_PATH_CHARS = 4096
MAX_COMPONENTS = 64
MAX_COMPONENT_BYTES = 255
MAX_GLOB_MATCHES = 10_000


def check_path(value: str, tenant: Tenant) -> str:
    """The path as the job will use it (absolute, links resolved) if the tenant may use it; else raise.

    Rejected: other URL schemes (file:, http:, gs: ...), `..`, percent-encoding (storage layers
    that decode it would see a different path than the one checked), backslashes and control
    characters, paths over 4096 characters, 64 components or 255 bytes a component, and anything,
    after following links, outside every prefix. Relative local paths are taken relative to the
    tenant's first local prefix. The messages never say where a path leads: that would reveal the
    server's file system (`/proc/self/cwd`) or what another tenant's link points to.
    """
    if not value or value != value.strip():
        raise PathRejected("empty, or surrounded by whitespace")
    if len(value) > MAX_PATH_CHARS:
        raise PathRejected(f"longer than {MAX_PATH_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or "\\" in value:
        raise PathRejected("control characters and backslashes are not allowed")
    if _PERCENT.search(value):
        raise PathRejected("percent-encoded characters are not allowed")
    parts = [p for p in value.split("/") if p]
    if len(parts) > MAX_COMPONENTS:
        raise PathRejected(f"more than {MAX_COMPONENTS} components")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in parts):
        raise PathRejected(f"a component longer than {MAX_COMPONENT_BYTES} bytes")
    if value.startswith("s3://"):
        return _check_s3(value, tenant)
    if _SCHEME.match(value):
        raise PathRejected(f"URL scheme {value.split(':', 1)[0][:20]!r} is not allowed (local paths and s3:// only)")
    if ".." in PurePosixPath(value).parts:
        raise PathRejected("'..' is not allowed")
    local = [p for p in tenant.prefixes if not p.startswith("s3://")]
    if not os.path.isabs(value):
        if not local:
            raise PathRejected("relative path, and the tenant has no local prefix to resolve it against")
        value = os.path.join(local[0], value)
    value = os.path.normpath(value)
    outside = PathRejected("outside the tenant's prefixes (after following links)")
    # A glob: the literal directories before the first wildcard must stay inside (checked before
    # anything is listed, so a pattern like /*/*/* never walks the server's disk), then every match.
    literal = value if not _GLOB.search(value) else os.path.dirname(value[: _GLOB.search(value).start()] + "x")
    if not any(_under(os.path.realpath(literal), p) for p in local):
        raise outside
    if not _GLOB.search(value):
        real = os.path.realpath(value)
        if not any(_under(real, p) for p in local):
            raise outside
        return real
    for n, match in enumerate(glob.iglob(value)):
        if n >= MAX_GLOB_MATCHES:
            raise PathRejected(f"the pattern matches more than {MAX_GLOB_MATCHES} paths")
        if not any(_under(os.path.realpath(match), p) for p in local):
            raise PathRejected("a match of the pattern is outside the tenant's prefixes (after following links)")
    return value


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _check_s3(value: str, tenant: Tenant) -> str:
    rest = value[len("s3://"):]
    parts = rest.rstrip("/").split("/")
    if not parts[0] or any(p in ("", ".", "..") for p in parts):
        raise PathRejected("empty, '.' or '..' components are not allowed in s3:// URIs")
    clean = "s3://" + "/".join(parts)
    if not any(_under(clean, p) for p in tenant.prefixes if p.startswith("s3://")):
        raise PathRejected("outside the tenant's prefixes")
    return clean
