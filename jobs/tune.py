"""Tune: learning-rate sweeps on a small proxy model, transferred to the target pretraining run.

    python -m jobs.tune --config configs/tune-demo.yaml

Every trial is a short run of the real pretraining loop (`jobs.pretrain.make_trainer`, Ray Train
+ DeepSpeed) on a proxy model made by overriding a few fields of the target model. A bridge
callback forwards each eval loss to Ray Tune, where ASHA stops weak trials early. The chosen lr
is rescaled to the target width (see docs/tune.md) and written as a ready pretraining config.

Output layout (local directory or s3:// prefix):

    tune_config.json    the sweep's resolved config (a rerun must match it to resume)
    tuner/              Ray Tune's experiment state: rerunning the command restores from it
    trials/<trial_id>/  each trial's pretraining run (attempts.jsonl, metrics.jsonl, checkpoints)
    trials.csv          one row per trial: swept values, steps, loss, val_loss, status
    loss_vs_lr.png      eval loss against lr
    best.yaml           the target's PretrainConfig with the chosen values
    sweep.json          summary: best trial, transfer, wall time
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Literal

import ray
import ray.train
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from cluster import storage
from jobs.config import ConfigError, JobConfig, load_config, main
from jobs.pretrain import PretrainConfig, make_trainer, prepare_run, train_loop_per_worker
from model import ModelConfig

# Trial settings the sweep owns: where a trial writes, and no retries (divergence is deterministic).
TRIAL_FIXED = {"output", "data", "model", "max_failures"}
SWEPT = ("lr", "warmup_steps", "weight_decay", "global_batch_size")
METRIC = "val_loss"
DRIVER_CPUS = 1  # each trial's Tune actor drives its Train run; it needs a CPU slot of its own


class SearchSpace(BaseModel):
    """What to sweep. `lr` always; the others only when listed."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

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


# ----------------------------------------------------------------------------- trial


DIVERGED = re.compile(r"training diverged: loss is \S+ at step (\d+)")


def diverged_at(err: BaseException) -> int | None:
    """The step of a Train failure caused by the loop's FloatingPointError (non-finite loss) on any worker."""
    failures = getattr(err, "worker_failures", None) or {}
    for f in failures.values():
        if m := DIVERGED.search(f"{f!r} {f}"):
            return int(m.group(1))
    return None


class EvalReportCallback(TuneReportCallback):
    """The Train-to-Tune bridge: forwards eval reports.

    Runs in the Train controller. Reports without `val_loss` (a checkpoint between evals, the
    loop's divergence report) are dropped: ASHA and the searchers judge trials on eval loss only,
    and Tune rejects results that lack the metric. Divergence reaches Tune from `run_trial`.
    """

    def after_report(self, run_context, metrics, checkpoint):
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


PLACEMENT_GROUP = "placement_group.txt"


def trial_loop(config: dict) -> None:
    """The pretraining loop, after rank 0 has noted its Train run's placement group for release."""
    pg = ray.util.get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0:
        storage.write_text(storage.join(config["cfg"]["output"], PLACEMENT_GROUP), pg.id.hex())
    train_loop_per_worker(config)


class ReleasePlacementGroup(tune.Callback):
    """Frees the Train workers' CPUs of every trial that ends, in the sweep's driver.

    When ASHA stops a trial, Tune ends the trial's actor while its Train run is mid-flight. The
    workers die with their controller, but the run's placement group is job-scoped: Ray Train's
    detached PlacementGroupCleaner should remove it, and it cannot when the Ray State API is
    unreachable (no dashboard, or several Ray instances on one machine), leaving the CPUs
    reserved until the sweep ends, so that later trials wait for workers forever.
    """

    def __init__(self, trials_dir: str):
        self.trials_dir = trials_dir

    def _release(self, trial) -> None:
        marker = storage.join(self.trials_dir, trial.trial_id, PLACEMENT_GROUP)
        if not storage.exists(marker):
            return
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(storage.read_text(marker).strip())))
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


def run_trial(config: dict, base: dict, trials_dir: str) -> None:
    """One Tune trial: a short pretraining run with the sampled values, on its own output."""
    trial_id = tune.get_context().get_trial_id()
    cfg = PretrainConfig.model_validate({**base, **config, "output": storage.join(trials_dir, trial_id)})
    cfg, manifest, mcfg = prepare_run(cfg)
    # One line per start: a restored sweep must not start a finished trial again.
    attempts = storage.join(cfg.output, "attempts.jsonl")
    prior = storage.read_text(attempts) if storage.exists(attempts) else ""
    line = json.dumps({"started": datetime.now(timezone.utc).isoformat(), "config": config})
    storage.write_text(attempts, prior + line + "\n")
    try:
        make_trainer(cfg, manifest, mcfg, callbacks=[EvalReportCallback()], loop=trial_loop).fit()
    except Exception as e:
        step = diverged_at(e)
        if step is None:
            raise
        # Reported here rather than by the bridge: Train may handle the worker's failure before the
        # report the worker made just before it, and then the divergence would never reach Tune.
        # A result (not an error) with val_loss=inf ends this trial and lets the sweep carry on.
        tune.report({"step": step, "loss": math.nan, METRIC: math.inf, "diverged": True})
        print(f"trial {trial_id}: diverged at step {step} with lr={cfg.lr:g}", flush=True)


# ----------------------------------------------------------------------------- sweep


def param_space(cfg: TuneConfig) -> dict:
    import numpy as np

    low, high = cfg.search.lr
    listed = cfg.search.listed()
    if cfg.searcher == "grid":
        space = {"lr": tune.grid_search([float(x) for x in np.geomspace(low, high, cfg.num_samples)])}
        return {**space, **{k: tune.grid_search(v) for k, v in listed.items()}}
    return {"lr": tune.loguniform(low, high), **{k: tune.choice(v) for k, v in listed.items()}}


def search_algorithm(cfg: TuneConfig, max_concurrent: int):
    """The searcher, limited to `max_concurrent` trials in flight."""
    if cfg.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=cfg.seed)), max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent)


def concurrency(cfg: TuneConfig, resources: dict) -> int:
    """Trials that fit the cluster at once: a driver CPU plus the trial's Train workers each."""
    trial = PretrainConfig.model_validate({**cfg.trial_base(), "output": "-"})
    cpus = DRIVER_CPUS + trial.num_workers * trial.cpus_per_worker
    fit = int(resources.get("CPU", 0) // cpus)
    if trial.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // trial.num_workers))
    if fit < 1:
        raise ConfigError(
            f"trial: one trial needs {cpus} CPUs ({DRIVER_CPUS} driver + num_workers {trial.num_workers} * "
            f"cpus_per_worker {trial.cpus_per_worker}){' and GPUs' if trial.use_gpu else ''}, more than the cluster "
            f"has ({resources}); lower trial.num_workers")
    return min(fit, cfg.max_concurrent or fit)


def make_tuner(cfg: TuneConfig, out: str):
    """A fresh Tuner, or the interrupted one restored from `out`/tuner (finished trials kept)."""
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.trial_base(), trials_dir=storage.join(out, "trials")),
        {"CPU": DRIVER_CPUS})
    fs, path = storage.resolve(out)
    exp = f"{path}/tuner"
    if tune.Tuner.can_restore(exp, storage_filesystem=fs):
        print(f"resuming the sweep in {storage.join(out, 'tuner')}", flush=True)
        return tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=fs)
    trial_steps = cfg.trial_base()["max_steps"]
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min",
            search_alg=search_algorithm(cfg, concurrency(cfg, ray.cluster_resources())),
            scheduler=ASHAScheduler(time_attr="step", max_t=trial_steps,
                                    grace_period=cfg.grace_period or cfg.trial_base()["eval_every"],
                                    reduction_factor=cfg.reduction_factor),
            num_samples=1 if cfg.searcher == "grid" else cfg.num_samples,
        ),
        run_config=tune.RunConfig(name="tuner", storage_path=path, storage_filesystem=fs, verbose=1,
                                  callbacks=[ReleasePlacementGroup(storage.join(out, "trials"))]),
    )


def trial_rows(results, cfg: TuneConfig) -> list[dict]:
    """One row per trial: its swept values, how far it got, its losses and why it ended."""
    trial_steps = cfg.trial_base()["max_steps"]
    rows = []
    for r in results:
        m = r.metrics or {}
        if r.error:
            status = "error"
        elif m.get("diverged"):
            status = "diverged"
        elif m.get("step") == trial_steps:
            status = "completed"
        else:
            status = "stopped"  # by ASHA, at a rung below the cut
        row = {"trial_id": m.get("trial_id") or r.path.rstrip("/").rsplit("/", 1)[-1]}
        row.update({k: r.config[k] for k in SWEPT if k in r.config})
        row.update({"steps": m.get("step"), "loss": m.get("loss"), "val_loss": m.get(METRIC), "status": status,
                    "error": str(r.error).splitlines()[0] if r.error else ""})
        rows.append(row)
    return sorted(rows, key=lambda x: x["lr"])


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["status"] == "completed" and r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    return min(done, key=lambda r: r["val_loss"]) if done else None


def write_table(rows: list[dict], path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    storage.write_text(path, buf.getvalue())


def plot_sweep(rows: list[dict], best: dict | None, target_lr: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    top = max((r["val_loss"] for r in finite), default=1.0) * 1.05
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"completed": ("o", "C0"), "stopped": ("s", "C1"), "diverged": ("x", "C3"), "error": ("x", "gray")}
    for status, (marker, color) in styles.items():
        pts = [r for r in rows if r["status"] == status]
        if pts:
            ys = [r["val_loss"] if r["val_loss"] is not None and math.isfinite(r["val_loss"]) else top for r in pts]
            ax.scatter([r["lr"] for r in pts], ys, marker=marker, c=color, s=50, label=status, zorder=3)
    done = sorted((r for r in finite if r["status"] == "completed"), key=lambda r: r["lr"])
    if len(done) > 1:
        ax.plot([r["lr"] for r in done], [r["val_loss"] for r in done], c="C0", lw=1, alpha=0.5)
    if best:
        ax.scatter([best["lr"]], [best["val_loss"]], marker="*", s=250, c="gold", edgecolors="k", zorder=4,
                   label=f"best lr {best['lr']:.3g} (target {target_lr:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("proxy learning rate")
    ax.set_ylabel("eval loss (nats/token); diverged at top")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def run(cfg: TuneConfig) -> dict:
    from cluster.ray_utils import init_ray

    t0 = time.perf_counter()
    out = storage.absolute(cfg.output)
    config_file = storage.join(out, "tune_config.json")
    if storage.exists(config_file) and storage.read_json(config_file)["sha256"] != cfg.sha256():
        raise ConfigError(f"output: {out} holds a sweep with a different config; resume it with that config, "
                          f"or choose another output")
    init_ray()
    storage.makedirs(out)
    storage.write_json(config_file, {"sha256": cfg.sha256(), "config": cfg.resolved()})
    proxy, target = cfg.proxy_model(), cfg.pretrain.model
    print(f"proxy: {proxy.num_params() / 1e6:.2f} M parameters (d_model {proxy.d_model}, {proxy.n_layers} layers); "
          f"target: {target.num_params() / 1e6:.2f} M (d_model {target.d_model}, {target.n_layers} layers)", flush=True)

    results = make_tuner(cfg, out).fit()
    rows = trial_rows(results, cfg)
    write_table(rows, storage.join(out, "trials.csv"))
    best = best_row(rows)
    chosen = {k: best[k] for k in SWEPT if best and k in best}
    target_cfg = cfg.target_config(chosen) if best else None
    plot_sweep(rows, best, target_cfg.lr if target_cfg else None, storage.join(out, "loss_vs_lr.png"))
    summary = {
        "output": out, "trials": len(rows), "wall_s": round(time.perf_counter() - t0, 1),
        "status": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "diverged", "error")},
        "best": best, "width_ratio": cfg.width_ratio,
        "target_lr": target_cfg.lr if target_cfg else None,
        "best_config": storage.join(out, "best.yaml") if best else None,
    }
    storage.write_json(storage.join(out, "sweep.json"), summary)
    for r in rows:
        print(f"  {r['trial_id']}: lr {r['lr']:.3g}  steps {r['steps']}  val_loss {r['val_loss']}  {r['status']}")
    if not best:
        raise RuntimeError(f"no trial completed with a finite eval loss (see {storage.join(out, 'trials.csv')}); "
                           f"lower search.lr or raise trial.max_steps")
    header = (f"# Written by jobs.tune from {out}: proxy lr {best['lr']:.4g} (d_model {proxy.d_model}, "
              f"val_loss {best['val_loss']:.4f}) -> target lr {target_cfg.lr:.4g} (d_model {target.d_model}),\n"
              f"# lr scaled by proxy/target width (docs/tune.md). Run: python -m jobs.pretrain --config <this file>\n")
    storage.write_text(summary["best_config"], header + yaml.safe_dump(target_cfg.resolved(), sort_keys=False))
    print(f"best proxy lr {best['lr']:.4g} (val_loss {best['val_loss']:.4f}) -> target lr {target_cfg.lr:.4g}; "
          f"{summary['best_config']}; {len(rows)} trials in {summary['wall_s']} s", flush=True)
    return summary


if __name__ == "__main__":
    main(TuneConfig, run)
