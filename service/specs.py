"""Job specs: the jobs' own config models, combined as one discriminated union on `kind`.

A new kind plugs in by adding its config class to `SPEC_CLASSES`; its module `jobs.<kind>` is
what the service runs. Nothing else in the service names a kind.

Path fields. A spec's string values that name storage are found by field name: `output`, `data`,
`run`, `checkpoint`, `checkpoints`, `inputs`, `tokenizer`, `init_from`, and any name ending in `_path`, `_dir` or
`_file`, at any depth (nested models, lists, dicts). Job authors keep that naming so the API checks
every path a job will touch; see service/security.py for the rules a path must pass.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Iterator, Union

from pydantic import BaseModel, Field, TypeAdapter

# The config modules only: they import neither torch nor Ray, so the API starts in a second.
from jobs.checkpoint.config import ExportConfig
from jobs.config import JobConfig, job_kind
from jobs.data.config import PrepareConfig, TasksConfig
from jobs.infer.config import EvaluateConfig, GenerateConfig, ServeConfig
from jobs.posttrain.config import DPOConfig, RewardConfig, RLConfig, SFTConfig
from jobs.train.config import TRIAL_DRIVER_CPUS, PretrainConfig, TuneConfig

SPEC_CLASSES: tuple[type[JobConfig], ...] = (
    PrepareConfig, PretrainConfig, TuneConfig, GenerateConfig, ExportConfig, SFTConfig, DPOConfig, RewardConfig,
    EvaluateConfig, TasksConfig, ServeConfig, RLConfig,
)

JobSpec = Annotated[Union[SPEC_CLASSES], Field(discriminator="kind")]  # noqa: UP007 (a tuple needs Union[])
spec_adapter: TypeAdapter[JobConfig] = TypeAdapter(JobSpec)
KINDS: tuple[str, ...] = tuple(job_kind(c) for c in SPEC_CLASSES)
CLASS_BY_KIND: dict[str, type[JobConfig]] = {job_kind(c): c for c in SPEC_CLASSES}

PATH_FIELDS = frozenset({"output", "data", "run", "checkpoint", "checkpoints", "inputs", "tokenizer", "init_from"})
PATH_SUFFIXES = ("_path", "_dir", "_file")

Loc = tuple[str | int, ...]


def is_path_field(name: str) -> bool:
    return name in PATH_FIELDS or name.endswith(PATH_SUFFIXES)


def path_values(model: BaseModel, loc: Loc = ()) -> Iterator[tuple[Loc, str]]:
    """(location, value) of every string in a path field of a validated spec."""
    for name in type(model).model_fields:
        yield from _walk(getattr(model, name), (*loc, name), is_path_field(name))


def _walk(value: Any, loc: Loc, is_path: bool) -> Iterator[tuple[Loc, str]]:
    if isinstance(value, BaseModel):
        yield from path_values(value, loc)
    elif isinstance(value, str):
        if is_path:
            yield loc, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, (*loc, i), is_path)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, (*loc, str(k)), is_path or is_path_field(str(k)))


def with_values(spec: JobConfig, replacements: dict[Loc, str]) -> JobConfig:
    """The spec with the strings at `replacements`' locations replaced, validated again."""
    data = spec.model_dump(mode="json")
    for loc, value in replacements.items():
        node = data
        for key in loc[:-1]:
            node = node[key]
        node[loc[-1]] = value
    return spec_adapter.validate_python(data)


def nested_models(cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields typed as a model (optionally `| None`), with that model: they must arrive inline, never
    as a file name.

    Some configs accept a path to a YAML file in place of a nested config (tune's `pretrain`); the
    service must not read files on its own host because a request names them. The CLI inlines
    such files on the user's side (service/cli.py).
    """
    out = {}
    for name, field in cls.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                out[name] = a
    return out


def most(value: Any) -> int:
    """The largest value of a count that may be an elastic [min, max] range."""
    return max(value) if isinstance(value, (tuple, list)) else value


def resources(spec: JobConfig) -> dict[str, float]:
    """CPUs and GPUs a job's work holds at its peak (its driver's CPU not included), derived from
    the spec: what quotas and the service's admission are checked against.

    Training-style jobs reserve `num_workers` x `cpus_per_worker`, an elastic range by its maximum
    (and a GPU per worker with `use_gpu`); RL's split placement adds `rollout_workers` x
    `rollout_cpus` (and a GPU per rollout actor with `use_gpu`); `serve` runs `num_replicas`
    replicas of one CPU (and GPU) each; a sweep runs up to `max_concurrent` trials at once (all
    `num_samples` when unset), each a Tune actor plus the trial's workers; a job without workers
    runs in one task.
    """
    if isinstance(spec, TuneConfig):
        one = resources(PretrainConfig.model_validate(spec.trial_base()))
        n = spec.max_concurrent or spec.num_samples
        return {"cpus": (TRIAL_DRIVER_CPUS + one["cpus"]) * n, "gpus": one["gpus"] * n}
    units = most(getattr(spec, "num_workers", 1)) * getattr(spec, "num_replicas", 1)
    # RL's split placement adds its rollout actors to the training workers
    rollout = getattr(spec, "rollout_workers", 0)
    cpus = units * getattr(spec, "cpus_per_worker", 1) + rollout * getattr(spec, "rollout_cpus", 0)
    gpus = units + rollout if getattr(spec, "use_gpu", False) else 0
    return {"cpus": cpus, "gpus": gpus}


def resource_fields(spec: JobConfig) -> tuple[Loc, str, Loc]:
    """(field to name for CPUs, how the CPU figure is made up, field to name for GPUs): what a quota
    error points at, as the tenant wrote it."""
    if isinstance(spec, TuneConfig):
        trial = PretrainConfig.model_validate(spec.trial_base())
        count = ("max_concurrent",) if spec.max_concurrent else ("num_samples",)
        how = (f"{spec.max_concurrent or spec.num_samples} trials at once ({count[0]}) x ({TRIAL_DRIVER_CPUS} "
               f"Tune actor + num_workers {most(trial.num_workers)} x cpus_per_worker {trial.cpus_per_worker})")
        return count, how, ("trial" if "use_gpu" in spec.trial else "pretrain", "use_gpu")
    fields = type(spec).model_fields
    if "num_replicas" in fields:
        return ("num_replicas",), f"num_replicas {spec.num_replicas} x 1", ("use_gpu",)
    if "num_workers" in fields:
        w = spec.num_workers
        how = f"num_workers {most(w)}{' (the maximum of ' + str(list(w)) + ')' if isinstance(w, tuple) else ''}"
        if "cpus_per_worker" in fields:
            how += f" x cpus_per_worker {spec.cpus_per_worker}"
        return ("num_workers",), how, ("use_gpu",)
    return ("kind",), "one task", ("use_gpu",) if "use_gpu" in fields else ("kind",)


def sizes_to_cluster(kind: str) -> bool:
    """Jobs that size their own concurrency to the cluster (a sweep runs as many trials as fit):
    admitted with at most the whole cluster, whatever their spec's peak."""
    return CLASS_BY_KIND.get(kind) is TuneConfig
