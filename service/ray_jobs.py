"""The cluster side of the service: submit, inspect, stop and read logs of jobs on Ray (or KubeRay).

The entrypoint is always `python -m jobs.<kind> --config job.yaml`, with `<kind>` taken from the
validated spec class and `job.yaml` the resolved spec the service wrote; no request text reaches
it. The runtime_env is fixed by the service: the job's own directory (holding only job.yaml) as
working_dir, and the `jobs`, `model` and `cluster` packages as py_modules (content-hashed, so each
code version is uploaded once; Ray caps a package at 512 MiB, these are well under 1 MiB). Nothing
of the runtime_env comes from the request.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("jobs", "model", "cluster")
CONFIG_NAME = "job.yaml"
DRIVER_CPUS = 1


class ClusterUnavailable(RuntimeError):
    """The Ray cluster (or Kubernetes) could not be reached or refused the request."""


@dataclass
class RayState:
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str | None = None
    start_time: float | None = None
    end_time: float | None = None


def entrypoint(kind: str) -> str:
    from service.specs import KINDS

    if kind not in KINDS:  # the kinds of the spec classes: the only entrypoints there are
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    # cluster.interpreter first: a node whose PATH finds the wrong `python` gets told what to do
    # instead of dying on an import. RAYLM_NO_LINKS: the job and its workers follow no link in the
    # tenant's storage (cluster.storage.local_path).
    return f"python -m cluster.interpreter && RAYLM_NO_LINKS=1 python -m jobs.{kind} --config {CONFIG_NAME}"


def ray_auth_token() -> str | None:
    """Ray's own token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), passed on to the dashboard."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


@functools.cache
def _local_dashboard() -> str:
    import ray

    from cluster.ray_utils import WORKER_ENV

    try:  # a Ray started with `ray start --head` on this machine
        ctx = ray.init(address="auto", runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    except ConnectionError:
        ctx = ray.init(include_dashboard=True, num_cpus=max(4, os.cpu_count() or 1),
                       runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    return "http://" + ctx.dashboard_url


def dashboard_url(settings: Settings) -> str:
    return (settings.ray_address or _local_dashboard()).rstrip("/")


def dashboard_port(settings: Settings) -> int:
    """The Ray dashboard's port (no job may bind it)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(settings.ray_address or "").port or 8265
    except ValueError:
        return 8265


def _headers() -> dict[str, str]:
    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@functools.cache
def _client(url: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers=_headers())


def client(settings: Settings):
    try:
        return _client(dashboard_url(settings))
    except Exception as e:  # the client checks the connection (and the token) when it is built
        raise ClusterUnavailable(f"Ray dashboard unreachable: {e}") from e


def _kuberay():
    from service import (
        kuberay,  # imported only for this target: it needs the kubernetes client
    )

    return kuberay


def submit(settings: Settings, job_id: str, submission_id: str, kind: str, config_yaml: str,
           resources: dict, tenant: str) -> None:
    if settings.submit_target == "kubernetes":
        k = _kuberay()
        if not settings.k8s_image:
            raise ClusterUnavailable("RAYLM_K8S_IMAGE is not set: no image to run the RayJob with")
        from service.specs import spec_adapter

        spec = spec_adapter.validate_python(yaml.safe_load(config_yaml))
        from service.specs import most

        manifest = k.rayjob_manifest(job_id, kind, config_yaml, image=settings.k8s_image,
                                     namespace=settings.k8s_namespace,
                                     num_workers=most(getattr(spec, "num_workers", 1)),
                                     use_gpu=resources["gpus"] > 0,
                                     worker_cpus=int(max(1, getattr(spec, "cpus_per_worker", 1))))
        try:
            k.submit_rayjob(manifest, settings.k8s_namespace)
        except k.KubeRayError as e:
            raise ClusterUnavailable(str(e)) from e
        return
    c = client(settings)
    with tempfile.TemporaryDirectory(prefix="raylm-job-") as d:
        (Path(d) / CONFIG_NAME).write_text(config_yaml)
        try:
            c.submit_job(
                entrypoint=entrypoint(kind),
                submission_id=submission_id,
                # No env_vars: the job's own ray.init (cluster.ray_utils) sets the worker environment,
                # and Ray refuses to merge two runtime_envs that both set env_vars.
                runtime_env={"working_dir": d, "py_modules": [str(REPO / p) for p in CODE_PACKAGES]},
                # The driver holds a CPU, counted with its work by the service's admission
                # (service.records.admit), which hands Ray only jobs that fit beside the others.
                entrypoint_num_cpus=DRIVER_CPUS,
                metadata={"raylm_job": job_id, "tenant": tenant, "kind": kind},
            )
        except Exception as e:
            raise ClusterUnavailable(f"Ray refused the job: {e}") from e


def name_for(settings: Settings, job_id: str, submission_id: str) -> str:
    return _kuberay().rayjob_name(job_id) if settings.submit_target == "kubernetes" else submission_id


def state(settings: Settings, job_id: str, submission_id: str) -> RayState | None:
    """The job's state on the cluster; None when the cluster has no such job."""
    if settings.submit_target == "kubernetes":
        k = _kuberay()
        try:
            st = k.get_rayjob_status(k.rayjob_name(job_id), settings.k8s_namespace)
        except k.RayJobNotFound:
            return None
        except k.KubeRayError as e:
            raise ClusterUnavailable(str(e)) from e
        return RayState(status=st.state.upper(), message=getattr(st, "message", None) or None)
    try:
        info = client(settings).get_job_info(submission_id)
    except ClusterUnavailable:
        raise
    except Exception as e:
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise ClusterUnavailable(f"reading the job from Ray failed: {e}") from e
    return _ray_state(info)


def all_states(settings: Settings) -> dict[str, RayState]:
    """Every job Ray knows, by submission id (one request, for the reconciler)."""
    try:
        jobs = client(settings).list_jobs()
    except ClusterUnavailable:
        raise
    except Exception as e:
        raise ClusterUnavailable(f"listing Ray jobs failed: {e}") from e
    return {j.submission_id: _ray_state(j) for j in jobs if j.submission_id}


def _ray_state(j) -> RayState:
    return RayState(status=str(getattr(j.status, "value", j.status)), message=j.message,
                    start_time=j.start_time / 1000 if j.start_time else None,
                    end_time=j.end_time / 1000 if j.end_time else None)


def stop(settings: Settings, job_id: str, submission_id: str) -> None:
    try:
        if settings.submit_target == "kubernetes":
            k = _kuberay()
            k.delete_rayjob(k.rayjob_name(job_id), settings.k8s_namespace)
        else:
            client(settings).stop_job(submission_id)
    except ClusterUnavailable:
        raise
    except Exception as e:
        raise ClusterUnavailable(f"stopping the job failed: {e}") from e


def forget(settings: Settings, job_id: str, submission_id: str) -> None:
    """Remove a finished job's record from the cluster (best effort: it may be gone already)."""
    try:
        if settings.submit_target == "kubernetes":
            k = _kuberay()
            k.delete_rayjob(k.rayjob_name(job_id), settings.k8s_namespace)
        else:
            client(settings).delete_job(submission_id)
    except Exception:
        pass


def logs(settings: Settings, submission_id: str) -> str | None:
    """The job's whole log from Ray; None when Ray no longer has it (or the target keeps logs elsewhere)."""
    if settings.submit_target == "kubernetes":
        return None
    try:
        return client(settings).get_job_logs(submission_id)
    except Exception:
        return None


async def follow_logs(settings: Settings, submission_id: str):
    """Yield log chunks as Ray produces them, until the job ends."""
    async for chunk in client(settings).tail_job_logs(submission_id):
        yield chunk


_totals_lock = threading.Lock()
_totals: dict[str, tuple[float, dict[str, float]]] = {}
TOTALS_TTL_S = 5.0


def cluster_totals(settings: Settings) -> dict[str, float]:
    """CPUs and GPUs of the cluster's alive nodes (what admission fills), cached for a few seconds."""
    url = dashboard_url(settings)
    with _totals_lock:
        at, totals = _totals.get(url, (0.0, {}))
        if time.monotonic() - at < TOTALS_TTL_S:
            return totals
        nodes = [n for n in cluster_resources(settings)["nodes"] if n["state"] in (None, "ALIVE")]
        totals = {"cpus": sum(n["cpus"] for n in nodes), "gpus": sum(n["gpus"] for n in nodes)}
        _totals[url] = (time.monotonic(), totals)
        return totals


def cluster_resources(settings: Settings) -> dict:
    """Nodes with their total and available CPUs/GPUs, from the dashboard's state API."""
    url = dashboard_url(settings)
    try:
        r = httpx.get(f"{url}/api/v0/nodes", params={"detail": "1", "limit": "1000"}, headers=_headers(), timeout=30)
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
        s = httpx.get(f"{url}/api/cluster_status", params={"format": "0"}, headers=_headers(), timeout=30)
        s.raise_for_status()
        usage = (s.json()["data"]["clusterStatus"] or {}).get("loadMetricsReport", {}).get("usageByNode") or {}
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise ClusterUnavailable(f"Ray dashboard unreachable: {e}") from e
    out = []
    for n in nodes:
        total = n.get("resources_total") or {}
        used = usage.get(n.get("node_id"), {})
        out.append({
            "node_id": n.get("node_id"), "ip": n.get("node_ip"), "state": n.get("state"),
            "is_head": bool(n.get("is_head_node")),
            "cpus": total.get("CPU", 0.0), "gpus": total.get("GPU", 0.0),
            "free_cpus": _free(used, "CPU", total), "free_gpus": _free(used, "GPU", total),
        })
    return {"nodes": out}


def _free(used: dict, key: str, total: dict) -> float:
    # usageByNode maps a resource to [used, total]; a node missing from it is idle.
    if key in used and isinstance(used[key], (list, tuple)) and len(used[key]) == 2:
        return float(used[key][1]) - float(used[key][0])
    return float(total.get(key, 0.0))
