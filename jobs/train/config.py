"""Configs of the training jobs: the fields every trainer shares (`TrainConfig`), pretraining
and learning-rate sweeps. Plain pydantic: importable without torch or Ray.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from jobs.config import JobConfig, Section, load_config
from model import ModelConfig


class TrainConfig(JobConfig):
    """What every Ray Train + DeepSpeed job shares: workers, ZeRO, batch, AdamW, schedule, checkpoints.

    Subclasses add their data, their model source and their own defaults.
    """

    output: str
    """Run directory (local or s3://): checkpoints, metrics.jsonl, config.json."""
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (one per GPU on GPU clusters), or [min, max] for elastic training: after
    losing workers the run continues with fewer (at least min), resharding ZeRO state."""
    use_gpu: bool = False
    """Train on GPUs (bf16, NCCL); otherwise CPU (fp32, gloo)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker (also its torch thread count)."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters."""
    global_batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step, across all workers and accumulation steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one worker; accumulation makes up the rest."""
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay on matmul weights (never on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = Field(100, ge=1)
    """Evaluate every this many steps (and at the end)."""
    checkpoint_every: int = Field(200, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept in storage."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train may do after a failure (-1: unlimited); training resumes
    from the newest complete checkpoint."""
    seed: int = 0
    """Seeds initialisation and the data order."""

    @model_validator(mode="after")
    def _check_training(self):
        lo, hi = self.worker_range
        if not 1 <= lo <= hi:
            raise ValueError(f"num_workers: need 1 <= min <= max, got {self.num_workers}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        for w in range(lo, hi + 1):  # every world size an elastic run may shrink to
            self.check_world(w)
        return self

    def check_world(self, world: int) -> None:
        """Refuse a world size the batch cannot be split over, naming the fields."""
        dp = world // self.model_parallel_size
        if world % self.model_parallel_size:
            raise ValueError(f"num_workers ({world}) must be divisible by {self.model_parallel_field} "
                             f"({self.model_parallel_size})")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size * "
                f"data-parallel workers ({self.micro_batch_size} * {dp})")

    model_parallel_field: ClassVar[str] = "model parallel degree"

    @property
    def model_parallel_size(self) -> int:
        """Workers that hold one model replica between them (pipeline stages in pretraining)."""
        return 1

    @property
    def worker_range(self) -> tuple[int, int]:
        w = self.num_workers
        return (w, w) if isinstance(w, int) else (w[0], w[1])

    def grad_accum_for(self, world: int) -> int:
        """Accumulation steps that keep the global batch fixed whatever the world size."""
        return self.global_batch_size // (self.micro_batch_size * (world // self.model_parallel_size))

    @property
    def grad_accum(self) -> int:
        return self.grad_accum_for(self.worker_range[1])


class PretrainConfig(TrainConfig):
    """Pretrain a decoder-only transformer on the shards written by jobs.prepare."""

    kind: Literal["pretrain"] = "pretrain"
    data: str
    """Output of jobs.prepare: a directory or s3:// prefix holding manifest.json."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"))
    """Architecture, e.g. `{preset: tiny}` plus overrides. vocab_size always comes from the tokenizer."""
    pipeline_stages: int = Field(1, ge=1)
    """Pipeline-parallel stages (DeepSpeed PipelineModule); data parallelism runs across pipelines.
    Stages hold n_layers / pipeline_stages blocks, the first ones one more when that is uneven."""
    tensor_parallel: int = Field(1, ge=1)
    """Tensor-parallel degree (DeepSpeed AutoTP, the Megatron split): every block's attention heads
    and MLP hidden units are divided over this many workers, which read the same micro-batches;
    the embedding, norms and output head stay whole on each. num_workers = tensor_parallel x
    pipeline_stages x data-parallel replicas. On GPUs a tensor-parallel group must sit on one node
    (checked at start-up), so make it divide the GPUs per node."""
    offload_optimizer: bool = False
    """ZeRO-3 only: keep optimizer state in CPU memory (frees GPU memory, costs PCIe traffic)."""
    init_from: str | None = None
    """Initial weights: a raylm checkpoint directory or a Hugging Face export (fresh optimizer)."""
    worker_memory_gib: float | None = Field(None, gt=0)
    """Memory per worker that the planner checks its estimate against. Default: the GPU's memory
    (80 GiB, an H100) with use_gpu, else the Ray nodes' memory shared among the workers."""
    eval_batches: int = Field(4, ge=1)
    """Global batches of validation data per evaluation."""

    @property
    def model_parallel_field(self) -> str:  # type: ignore[override]
        if self.tensor_parallel > 1:
            return "tensor_parallel * pipeline_stages" if self.pipeline_stages > 1 else "tensor_parallel"
        return "pipeline_stages"

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_stages

    @model_validator(mode="after")
    def _check_parallel(self):
        lo, hi = self.worker_range
        if self.pipeline_stages > 1 and self.zero_stage >= 2:
            # PipelineEngine asserts this at start-up: ZeRO-2/3 partition gradients, which the
            # pipeline schedule reduces itself.
            raise ValueError(f"zero_stage ({self.zero_stage}) must be 0 or 1 with pipeline_stages > 1: "
                             f"DeepSpeed does not combine ZeRO-2/3 with pipeline parallelism")
        if self.pipeline_stages > 1 and self.model.n_layers < self.pipeline_stages:
            raise ValueError(f"model.n_layers ({self.model.n_layers}) must be at least pipeline_stages "
                             f"({self.pipeline_stages}): every stage holds one block or more")
        if self.pipeline_stages > 1 and lo != hi:
            raise ValueError("num_workers: elastic ranges are supported with data parallelism only "
                             "(pipeline_stages = 1)")
        if self.pipeline_stages > 1 and self.init_from:
            raise ValueError("init_from: not supported with pipeline_stages > 1; start the pipeline run "
                             "from a checkpoint of its own or train data-parallel")
        if self.offload_optimizer and self.zero_stage != 3:
            raise ValueError("offload_optimizer needs zero_stage 3")
        if self.tensor_parallel > 1:
            self._check_tensor_parallel()
        return self

    def _check_tensor_parallel(self) -> None:
        t, m = self.tensor_parallel, self.model
        # AutoTP cuts wq/wk/wv and the MLP's gate/up by output rows, wo/down by input columns, in
        # equal parts: a degree that does not divide them would split a head or leave a rank
        # without a kv head.
        for field, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads), ("model.d_ff", m.ff_dim)):
            if value % t:
                raise ValueError(f"tensor_parallel ({t}) must divide {field} ({value}): each tensor-parallel "
                                 f"worker holds an equal share of the heads and of the MLP width")
        if m.dropout:
            # Every TP rank draws the same dropout masks (same seed): right for the residual branch,
            # wrong inside attention, where each rank's head group would repeat the others' masks.
            raise ValueError(f"model.dropout ({m.dropout}) must be 0 with tensor_parallel > 1")
        if self.offload_optimizer:
            raise ValueError("offload_optimizer is not supported with tensor_parallel > 1 (not tested together)")


# ----------------------------------------------------------------------------- sweeps

# Each trial's Tune actor drives its Train run and holds a CPU of its own (quotas count it too).
TRIAL_DRIVER_CPUS = 1
# Trial settings the sweep owns: where a trial writes, and no retries (divergence is deterministic).
TRIAL_FIXED = {"output", "data", "model", "max_failures"}
SWEPT = ("lr", "warmup_steps", "weight_decay", "global_batch_size")


class SearchSpace(Section):
    """What to sweep. `lr` always; the others only when listed."""

    lr: tuple[float, float] = (1e-4, 1e-1)
    """[low, high] learning rate of the proxy, sampled log-uniformly (`grid`: log-spaced points)."""
    warmup_steps: list[int] | None = None
    """Warm-up lengths to try, in trial steps. Omitted: the trial's own value."""
    weight_decay: list[float] | None = None
    """Weight decays to try. Omitted: the trial's own value."""
    global_batch_size: list[int] | None = None
    """Global batch sizes to try (each a multiple of micro_batch_size * num_workers). Omitted: the trial's own."""

    @field_validator("lr")
    @classmethod
    def _check_lr(cls, v):
        low, high = v
        if not 0 < low < high:
            raise ValueError(f"expected 0 < low < high, got [{low}, {high}]")
        return v

    @field_validator("warmup_steps", "weight_decay", "global_batch_size")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v:
            raise ValueError("list at least one value, or leave the key out")
        return v

    def listed(self) -> dict[str, list]:
        return {k: getattr(self, k) for k in SWEPT[1:] if getattr(self, k) is not None}


class TuneConfig(JobConfig):
    """Sweep the learning rate of a pretraining config on a proxy model and transfer it to the target."""

    kind: Literal["tune"] = "tune"
    pretrain: PretrainConfig
    """The target run (data, target model, batch, schedule), inline or as a path to a config file.
    best.yaml is this config with the chosen values."""
    output: str
    """Sweep directory (local or s3://): trials, trials.csv, loss_vs_lr.png, best.yaml, Tune's state."""
    proxy: dict[str, Any] = Field(default_factory=dict)
    """Overrides of pretrain.model that make the proxy, e.g. {d_model: 64, n_layers: 2}. Empty: sweep the target."""
    trial: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the pretrain config for every trial, e.g. {max_steps: 100, eval_every: 20, num_workers: 1}."""
    search: SearchSpace = Field(default_factory=SearchSpace)
    """The search space."""
    searcher: Literal["random", "grid", "optuna"] = "random"
    """`random` samples the space; `grid` tries every combination; `optuna` is Bayesian (TPE)."""
    num_samples: int = Field(8, ge=1)
    """Trials (`grid`: log-spaced lr points, each tried with every listed value of the other keys)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Trials running at once. Default: as many as the cluster's CPUs (and GPUs) fit; never more."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA: steps every trial runs before it can be stopped. Default: the trial's eval_every."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: keep the best 1/reduction_factor of trials at each rung."""
    seed: int = 0
    """Seeds the searcher."""

    @field_validator("pretrain", mode="before")
    @classmethod
    def _load_pretrain(cls, v):
        if isinstance(v, str):
            return load_config(PretrainConfig, v).model_dump()
        return v

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, v, info: ValidationInfo):
        if "preset" in v:
            raise ValueError("give field overrides of pretrain.model (e.g. d_model, n_layers), not a preset")
        if "pretrain" in info.data:
            proxy_model(info.data["pretrain"], v)
        return v

    @field_validator("trial")
    @classmethod
    def _check_trial(cls, v, info: ValidationInfo):
        fixed = sorted(TRIAL_FIXED & set(v))
        if fixed:
            raise ValueError(f"{fixed} are set by the sweep (the model through `proxy`)")
        unknown = sorted(set(v) - set(PretrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown pretrain keys {unknown}")
        if "pretrain" in info.data and "proxy" in info.data:
            trial_base(info.data["pretrain"], info.data["proxy"], v)
        return v

    @field_validator("search")
    @classmethod
    def _check_search(cls, v: SearchSpace, info: ValidationInfo):
        if not {"pretrain", "proxy", "trial"} <= set(info.data):
            return v
        pretrain, proxy, trial = info.data["pretrain"], info.data["proxy"], info.data["trial"]
        base = trial_base(pretrain, proxy, trial)
        for key, values in {"lr": list(v.lr), **v.listed()}.items():
            for value in values:
                try:
                    PretrainConfig.model_validate({**base, key: value})
                except ValueError as e:
                    raise ValueError(f"{key}: {value!r} does not make a valid trial: {_first_error(e)}") from None
                try:
                    target_config(pretrain, proxy, trial, {key: value} if key != "lr" else {"lr": value})
                except ValueError as e:
                    raise ValueError(f"{key}: {value!r} does not transfer to a valid target config: "
                                     f"{_first_error(e)}") from None
        return v

    # ------------------------------------------------------------------ derived configs

    def proxy_model(self) -> ModelConfig:
        return proxy_model(self.pretrain, self.proxy)

    def trial_base(self) -> dict:
        return trial_base(self.pretrain, self.proxy, self.trial)

    @property
    def width_ratio(self) -> float:
        """Proxy width over target width: the factor the transfer rule multiplies lr by."""
        return self.proxy_model().d_model / self.pretrain.model.d_model

    def target_config(self, chosen: dict) -> PretrainConfig:
        return target_config(self.pretrain, self.proxy, self.trial, chosen)


def proxy_model(pretrain: PretrainConfig, proxy: dict) -> ModelConfig:
    """The target model with the proxy's overrides."""
    try:
        return ModelConfig.model_validate({**pretrain.model.model_dump(), **proxy})
    except ValueError as e:
        raise ValueError(f"the proxy model is invalid: {_first_error(e)}") from None


def trial_base(pretrain: PretrainConfig, proxy: dict, trial: dict) -> dict:
    """The pretrain config of every trial, before the swept values and its output are filled in."""
    base = {**pretrain.model_dump(), **trial, "model": proxy_model(pretrain, proxy).model_dump(), "max_failures": 0}
    # One checkpoint per trial, at its end, unless asked: checkpoints are not what a sweep is for.
    if "checkpoint_every" not in trial:
        base["checkpoint_every"] = base["max_steps"]
    try:
        PretrainConfig.model_validate(base)
    except ValueError as e:
        raise ValueError(f"the trial config is invalid: {_first_error(e)}") from None
    return base


def target_config(pretrain: PretrainConfig, proxy: dict, trial: dict, chosen: dict) -> PretrainConfig:
    """The target PretrainConfig for the proxy values `chosen`: the transfer rule of docs/tune.md."""
    width_ratio = proxy_model(pretrain, proxy).d_model / pretrain.model.d_model
    update: dict[str, Any] = {}
    if "lr" in chosen:
        update["lr"] = chosen["lr"] * width_ratio
    if "warmup_steps" in chosen:
        update["warmup_steps"] = round(chosen["warmup_steps"] / trial_base(pretrain, proxy, trial)["max_steps"]
                                       * pretrain.max_steps)
    for key in ("weight_decay", "global_batch_size"):
        if key in chosen:
            update[key] = chosen[key]
    return PretrainConfig.model_validate({**pretrain.model_dump(), **update})


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(e)
