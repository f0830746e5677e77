"""Connecting to Ray: an existing cluster when one is configured, else a local one."""

from __future__ import annotations

import os

import ray

# Environment every Ray worker of a raylm job needs.
WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # CPU-only nodes: make DeepSpeed pick its CPU accelerator instead of probing for CUDA.
    **({"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]} if "DS_ACCELERATOR" in os.environ else {}),
    # A job the control API runs refuses links in tenant storage in every process (cluster.storage).
    **({"RAYLM_NO_LINKS": os.environ["RAYLM_NO_LINKS"]} if "RAYLM_NO_LINKS" in os.environ else {}),
}


def storage_env() -> dict[str, str]:
    """The driver's S3 settings (credentials, endpoint, region), for Ray tasks and workers that
    read or write storage: a cluster's processes do not inherit the submitting shell's variables."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process.

    `address` (or RAY_ADDRESS) joins a running cluster; that is also how jobs started by
    `ray job submit` attach to theirs. Without one, start a local Ray. A small machine gets at least
    4 logical CPUs, so that 2 training workers plus the Ray Data/driver tasks can be scheduled,
    and the dashboard on 127.0.0.1 (its address is printed).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # The S3 settings too, so that tasks that touch storage need no runtime env of their own: one
    # sends them to a separate worker pool of fresh processes (jobs.prepare.storage_remote_args).
    runtime_env = {"env_vars": {**WORKER_ENV, **storage_env()}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    ray.init(
        address="local",  # never attach by accident to another `ray start` cluster on this machine
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls every
        # second (it frees the workers' CPUs of a controller that died): without it the cleaner
        # cannot work and logs a warning a second. ~2 s more to start; loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )
