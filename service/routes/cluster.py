from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException

from service import ray_jobs, schemas
from service.deps import SettingsDep, TenantDep

router = APIRouter(tags=["cluster"])


@router.get("/cluster", response_model=schemas.Cluster)
def cluster(settings: SettingsDep, tenant: TenantDep) -> schemas.Cluster:
    """Nodes of the Ray cluster with their total and free CPUs/GPUs."""
    try:
        nodes = [schemas.Node(**n) for n in ray_jobs.cluster_resources(settings)["nodes"]]
    except ray_jobs.ClusterUnavailable as e:
        logging.getLogger("raylm.service").warning("cluster: %s", e)  # the details name internal addresses
        raise HTTPException(503, "the cluster could not be reached; try again") from None
    alive = [n for n in nodes if n.state in (None, "ALIVE")]
    return schemas.Cluster(nodes=nodes, cpus=sum(n.cpus for n in alive), gpus=sum(n.gpus for n in alive),
                           free_cpus=sum(n.free_cpus for n in alive), free_gpus=sum(n.free_gpus for n in alive))


@router.get("/tenant", response_model=schemas.Tenant)
def whoami(tenant: TenantDep) -> schemas.Tenant:
    """The calling tenant and its limits."""
    return schemas.Tenant(**tenant.model_dump(exclude={"tokens"}))
