"""The control API's `kubernetes` target: one KubeRay RayJob per raylm job.

KubeRay starts a Ray cluster sized for the job, runs `python -m jobs.<kind> --config FILE` on its
head, and deletes the cluster when the job ends. The entrypoint is built only from the allowlist
`JOB_KINDS` and a fixed path; no text from a request ever reaches it.

The job's config travels inside the RayJob: the head pod carries it as the annotation
`raylm.io/job-config`, and a downward-API volume turns that annotation into the file at
`CONFIG_PATH`. One object therefore holds the whole job, and deleting it leaves nothing behind
(a ConfigMap beside it would need its own cleanup and could outlive a failed submission).

The names below (`ARTIFACTS_CLAIM`, `STORAGE_CONFIG_MAP`, `S3_SECRET`) are the objects that
`k8s/base` creates; tests/test_k8s.py checks that they agree.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

JOB_KINDS = ("prepare", "pretrain", "tune", "generate", "export", "sft", "dpo", "reward", "rl", "evaluate")

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CONFIG_ANNOTATION = "raylm.io/job-config"
CONFIG_DIR = "/etc/raylm/job"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
ARTIFACTS_CLAIM = "raylm-artifacts"
ARTIFACTS_MOUNT = "/mnt/raylm"
STORAGE_CONFIG_MAP = "raylm-storage"
S3_SECRET = "raylm-s3"
NAME_PREFIX = "raylm-"

# KubeRay names the job's cluster "<rayjob>-xxxxx" and its services "<cluster>-serve-svc"; it
# refuses RayJob names longer than this so that those stay within Kubernetes' 63 characters.
MAX_RAYJOB_NAME = 47
# Kubernetes caps all annotations of one object at 256 KiB; KubeRay adds a few of its own.
MAX_CONFIG_BYTES = 200 * 1024
# Keep the finished job's cluster a minute, so `kubectl logs` of its head still works right after.
TTL_AFTER_FINISHED = 60
# The ray image runs as uid 1000 in group 100 ("users"); fsGroup lets it write the volumes.
POD_SECURITY = {"fsGroup": 100}

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class KubeRayError(RuntimeError):
    """A RayJob could not be created, read or deleted; the message says which and why."""


class RayJobNotFound(KubeRayError):
    """The RayJob does not exist (deleted, or its namespace is wrong)."""


def rayjob_name(job_id: str) -> str:
    """The RayJob's name for a raylm job id: `raylm-<id>`, lowercased (UUIDs and ULIDs fit)."""
    name = NAME_PREFIX + str(job_id).lower()
    if not _DNS_1035.match(name):
        raise ValueError(f"job_id {job_id!r}: only letters, digits and '-' may follow 'raylm-' in a "
                         f"RayJob name, and it must end with a letter or digit")
    if len(name) > MAX_RAYJOB_NAME:
        raise ValueError(f"job_id {job_id!r}: the RayJob name {name!r} has {len(name)} characters, "
                         f"KubeRay accepts at most {MAX_RAYJOB_NAME}")
    return name


def entrypoint(kind: str) -> str:
    """The fixed command a RayJob runs for `kind`; anything outside JOB_KINDS is refused."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind {kind!r} is not a raylm job; expected one of {', '.join(JOB_KINDS)}")
    # RAYLM_NO_LINKS: the job and its workers follow no link in the tenant's storage (cluster.storage).
    return f"RAYLM_NO_LINKS=1 python -m jobs.{kind} --config {CONFIG_PATH}"


def installed_ray_version() -> str:
    """Ray in this environment; the control API runs the same image as the jobs it submits."""
    return importlib.metadata.version("ray")


def _resources(cpus: int, memory: str, gpus: int = 0) -> dict:
    amount = {"cpu": str(cpus), "memory": memory}
    limits = {**amount, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"requests": amount, "limits": limits}


def _storage(artifacts_claim: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(envFrom, volumes, volumeMounts) that give a Ray container the artifact storage settings."""
    env_from = [{"configMapRef": {"name": STORAGE_CONFIG_MAP}},
                # Only S3 users create this Secret (AWS credentials); PVC users have none.
                {"secretRef": {"name": S3_SECRET, "optional": True}}]
    volumes: list[dict] = []
    mounts: list[dict] = []
    if artifacts_claim:
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": artifacts_claim}})
        mounts.append({"name": "artifacts", "mountPath": ARTIFACTS_MOUNT})
    return env_from, volumes, mounts


def rayjob_manifest(
    job_id: str,
    kind: str,
    config_yaml: str,
    *,
    image: str,
    namespace: str,
    ray_version: str | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    worker_cpus: int = 4,
    worker_memory: str = "16Gi",
    head_cpus: int = 2,
    head_memory: str = "8Gi",
    artifacts_claim: str | None = ARTIFACTS_CLAIM,
    active_deadline_seconds: int = 7 * 24 * 3600,
    backoff_limit: int = 0,
) -> dict[str, Any]:
    """The RayJob (a plain dict, ready for `submit_rayjob`) that runs one raylm job on its own cluster.

    The cluster has a head without GPUs (it runs only the driver) and one worker group of exactly
    `num_workers` pods, each with one GPU when `use_gpu`. `artifacts_claim` is the PVC mounted at
    /mnt/raylm on every pod; None for S3-only storage. `backoff_limit` retries start a fresh cluster
    and rerun the whole job.
    """
    name = rayjob_name(job_id)
    command = entrypoint(kind)
    if not isinstance(config_yaml, str) or not config_yaml.strip():
        raise ValueError("config_yaml: the job's config is empty")
    size = len(config_yaml.encode())
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"config_yaml: {size} bytes; a RayJob carries at most {MAX_CONFIG_BYTES} "
                         f"(Kubernetes limits a pod's annotations to 256 KiB)")
    if not image:
        raise ValueError("image: no container image given for the RayJob")
    if not (_DNS_1123_LABEL.match(namespace or "") and len(namespace) <= 63):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    if num_workers < 1:
        raise ValueError(f"num_workers: {num_workers}; a RayJob needs at least one worker")
    for field, value in (("worker_cpus", worker_cpus), ("head_cpus", head_cpus)):
        if value < 1:
            raise ValueError(f"{field}: {value}; at least 1 CPU")
    for field, value in (("worker_memory", worker_memory), ("head_memory", head_memory)):
        if not _QUANTITY.match(str(value)):
            raise ValueError(f"{field}: {value!r} is not a Kubernetes quantity such as '16Gi'")
    if active_deadline_seconds < 1:
        raise ValueError(f"active_deadline_seconds: {active_deadline_seconds}; must be positive")
    if backoff_limit < 0:
        raise ValueError(f"backoff_limit: {backoff_limit}; must be 0 or more")
    ray_version = ray_version or installed_ray_version()

    labels = {"app.kubernetes.io/part-of": "raylm", "app.kubernetes.io/component": "job",
              "raylm.io/kind": kind}
    if _LABEL_VALUE.match(str(job_id)) and len(str(job_id)) <= 63:
        labels["raylm.io/job-id"] = str(job_id)
    env_from, volumes, mounts = _storage(artifacts_claim)

    head = {
        "rayStartParams": {"num-cpus": "0"},  # the driver only: no tasks or actors on the head
        "template": {
            "metadata": {"labels": dict(labels), "annotations": {CONFIG_ANNOTATION: config_yaml}},
            "spec": {
                "securityContext": dict(POD_SECURITY),
                "containers": [{
                    "name": "ray-head",
                    "image": image,
                    "resources": _resources(head_cpus, head_memory),
                    "envFrom": env_from,
                    "ports": [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}],
                    "volumeMounts": [{"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
                                     *mounts],
                }],
                "volumes": [{"name": "job-config", "downwardAPI": {"items": [{
                    "path": CONFIG_PATH.rsplit("/", 1)[1],
                    "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"},
                }]}}, *volumes],
            },
        },
    }
    worker_spec: dict[str, Any] = {
        "securityContext": dict(POD_SECURITY),
        "containers": [{
            "name": "ray-worker",
            "image": image,
            "resources": _resources(worker_cpus, worker_memory, 1 if use_gpu else 0),
            "envFrom": env_from,
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
        }],
        # NCCL and the object store need more shared memory than a container's default 64 MiB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes],
    }
    if use_gpu:
        worker_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    worker = {
        "groupName": "gpu" if use_gpu else "cpu",
        "replicas": num_workers,
        "minReplicas": num_workers,
        "maxReplicas": num_workers,
        "rayStartParams": {},
        "template": {"metadata": {"labels": dict(labels)}, "spec": worker_spec},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": command,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            "activeDeadlineSeconds": active_deadline_seconds,
            "backoffLimit": backoff_limit,
            "rayClusterSpec": {
                "rayVersion": ray_version,
                # KubeRay generates a token for this cluster and gives it to the submitter too.
                "authOptions": {"mode": "token"},
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


@functools.lru_cache(maxsize=1)
def custom_objects_api() -> client.CustomObjectsApi:
    """A client for the cluster this process runs in, else for the current kubeconfig context."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise KubeRayError(f"no Kubernetes credentials: not running in a pod and no usable "
                               f"kubeconfig ({e})") from None
    return client.CustomObjectsApi()


def _explain(action: str, what: str, e: Exception, api: client.CustomObjectsApi) -> KubeRayError:
    if isinstance(e, ApiException):
        hints = {
            403: "the control API's ServiceAccount lacks RBAC for rayjobs.ray.io in this namespace",
            404: ("the namespace does not exist or the KubeRay operator (RayJob CRD) is not installed"
                  if action == "creating" else "no such RayJob"),
            409: "a RayJob of that name already exists",
            422: "the API server rejected the manifest",
        }
        hint = hints.get(e.status, e.reason or "")
        detail = (e.body or "").strip()[:500] if isinstance(e.body, str) else ""
        error = RayJobNotFound if e.status == 404 and action == "reading" else KubeRayError
        return error(f"{action} {what}: HTTP {e.status}: {hint}" + (f": {detail}" if detail else ""))
    host = api.api_client.configuration.host
    return KubeRayError(f"{action} {what}: cannot reach the Kubernetes API at {host}: {e}")


def submit_rayjob(manifest: dict, namespace: str, api: client.CustomObjectsApi | None = None) -> dict:
    """Create the RayJob in `namespace`; returns the object the API server stored."""
    api = api or custom_objects_api()
    name = manifest.get("metadata", {}).get("name", "?")
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest,
                                                   _request_timeout=30)
    except (ApiException, HTTPError) as e:
        raise _explain("creating", f"RayJob {namespace}/{name}", e, api) from None


@dataclass(frozen=True)
class RayJobStatus:
    """Where a RayJob stands, in the control API's terms plus KubeRay's own fields."""

    name: str
    state: str
    """pending, running, succeeded, failed or stopped."""
    job_status: str
    """Ray's job status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), empty before submission."""
    deployment_status: str
    """KubeRay's (Initializing, Running, Complete, Failed, Suspended, ...)."""
    message: str
    ray_cluster: str
    start_time: str | None
    end_time: str | None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "stopped")


_RAY_STATES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped", "RUNNING": "running"}


def rayjob_state(status: dict) -> str:
    """The control API's state for a RayJob's `.status`."""
    job = status.get("jobStatus") or ""
    deployment = status.get("jobDeploymentStatus") or ""
    if job in _RAY_STATES:
        return _RAY_STATES[job]
    # The deadline, the retry limit or an invalid spec fail the RayJob before Ray has a status.
    if deployment in ("Failed", "ValidationFailed"):
        return "failed"
    if deployment in ("Suspended", "Suspending"):
        return "stopped"
    return "pending"


def get_rayjob_status(name: str, namespace: str, api: client.CustomObjectsApi | None = None) -> RayJobStatus:
    """Read a RayJob's status; RayJobNotFound when there is none, KubeRayError when it cannot be read."""
    api = api or custom_objects_api()
    try:
        obj = api.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                      _request_timeout=30)
    except (ApiException, HTTPError) as e:
        raise _explain("reading", f"RayJob {namespace}/{name}", e, api) from None
    status = obj.get("status") or {}
    return RayJobStatus(
        name=name,
        state=rayjob_state(status),
        job_status=status.get("jobStatus") or "",
        deployment_status=status.get("jobDeploymentStatus") or "",
        message=status.get("message") or status.get("reason") or "",
        ray_cluster=status.get("rayClusterName") or "",
        start_time=status.get("startTime"),
        end_time=status.get("endTime"),
    )


def delete_rayjob(name: str, namespace: str, api: client.CustomObjectsApi | None = None) -> bool:
    """Delete a RayJob, which stops its Ray job and removes its cluster; False if it was not there."""
    api = api or custom_objects_api()
    try:
        # Background: return at once; the garbage collector removes the cluster and submitter.
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            propagation_policy="Background", _request_timeout=30)
    except ApiException as e:
        if e.status == 404:
            return False
        raise _explain("deleting", f"RayJob {namespace}/{name}", e, api) from None
    except HTTPError as e:
        raise _explain("deleting", f"RayJob {namespace}/{name}", e, api) from None
    return True
