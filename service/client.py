"""Python SDK of the control API.

    from service.client import Client
    c = Client("http://127.0.0.1:8000", token)
    job = c.submit({"kind": "prepare", "output": "/data/alice/shakespeare", "vocab_size": 4096})
    for chunk in c.logs(job.id, follow=True):
        print(chunk, end="")
    assert c.wait(job.id, timeout=600) == "SUCCEEDED"

Failures raise subclasses of `APIError`, chosen by HTTP status.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import BaseModel

from service import schemas

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class APIError(Exception):
    """The API refused a request; `status` is the HTTP status, `detail` its explanation."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {self.message}")

    @property
    def message(self) -> str:
        if isinstance(self.detail, list):
            return "; ".join(d.get("msg", str(d)) if isinstance(d, dict) else str(d) for d in self.detail)
        return str(self.detail)


class AuthError(APIError):
    """401: no token, or a token the service does not know."""


class NotFound(APIError):
    """404: no such job for this tenant."""


class Conflict(APIError):
    """409: the job is in the wrong state, or an Idempotency-Key was reused with another spec."""


class TooLarge(APIError):
    """413: the request body is over the service's limit (RAYLM_MAX_BODY_BYTES)."""


class InvalidSpec(APIError):
    """422: the spec is invalid, names a path outside the tenant's prefixes, or exceeds a per-job limit."""


class QuotaExceeded(APIError):
    """429: the tenant already runs its maximum number of jobs."""


class Unavailable(APIError):
    """503: the cluster could not be reached."""


class WaitTimeout(TimeoutError):
    """`wait` ran out of time before the job ended."""


_ERRORS = {401: AuthError, 404: NotFound, 409: Conflict, 413: TooLarge, 422: InvalidSpec, 429: QuotaExceeded,
           503: Unavailable}


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise _error(r)
        return r

    def submit(self, spec: dict | BaseModel, idempotency_key: str | None = None) -> schemas.Job:
        """Submit a job spec (a dict with `kind`, or a job's config object)."""
        body = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return schemas.Job.model_validate(self._request("POST", "/jobs", json=body, headers=headers).json())

    def get(self, job_id: str) -> schemas.JobDetail:
        return schemas.JobDetail.model_validate(self._request("GET", f"/jobs/{job_id}").json())

    def list(self, kind: str | None = None, status: str | None = None, limit: int = 50,
             offset: int = 0) -> schemas.JobList:
        params = {k: v for k, v in {"kind": kind, "status": status, "limit": limit, "offset": offset}.items()
                  if v is not None}
        return schemas.JobList.model_validate(self._request("GET", "/jobs", params=params).json())

    def logs(self, job_id: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """The job's log; with follow, chunks as they are written, until the job ends."""
        params: dict[str, Any] = {"follow": str(follow).lower()}
        if tail:
            params["tail"] = tail
        with self._http.stream("GET", f"/jobs/{job_id}/logs", params=params, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            yield from r.iter_text()

    def stop(self, job_id: str) -> schemas.Job:
        return schemas.Job.model_validate(self._request("POST", f"/jobs/{job_id}/stop").json())

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{job_id}")

    def artifacts(self, job_id: str) -> schemas.Artifacts:
        return schemas.Artifacts.model_validate(self._request("GET", f"/jobs/{job_id}/artifacts").json())

    def artifact(self, job_id: str, path: str) -> bytes:
        """One file of the job's output, whole (use `download` for large ones)."""
        return self._request("GET", f"/jobs/{job_id}/artifacts/{path}").content

    def download(self, job_id: str, path: str, dest: str) -> int:
        """Stream one file of the job's output to `dest`; returns the bytes written."""
        n = 0
        with self._http.stream("GET", f"/jobs/{job_id}/artifacts/{path}", timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    n += len(chunk)
        return n

    def cluster(self) -> schemas.Cluster:
        return schemas.Cluster.model_validate(self._request("GET", "/cluster").json())

    def health(self) -> schemas.Health:
        return schemas.Health.model_validate(self._request("GET", "/health").json())

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> str:
        """Block until the job ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                status = self.get(job_id).status
            except (httpx.TransportError, Unavailable):
                status = None  # the API restarting: keep waiting
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {status} after {timeout:g}s")
            time.sleep(poll)


def _error(r: httpx.Response) -> APIError:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return _ERRORS.get(r.status_code, APIError)(r.status_code, detail)
