"""Learning-rate sweeps on a small proxy model, transferred to the target pretraining run
(`python -m jobs.tune` is the command line; docs/tune.md).

Every trial is a short run of the real pretraining loop (jobs.train.loop through the trainer
factory: Ray Train + DeepSpeed) on a proxy model made by overriding a few fields of the target
model. A bridge callback forwards each eval loss to Ray Tune, where ASHA stops weak trials early.
The chosen lr is rescaled to the target width (see docs/tune.md) and written as a ready
pretraining config.

Output layout (local directory or s3:// prefix):

    tune_config.json    the sweep's resolved config (a rerun must match it to resume)
    tuner/              Ray Tune's experiment state of the latest run (never read back)
    trials/<values>/    each trial's pretraining run (attempts.jsonl, metrics.jsonl, checkpoints) and
                        the sweep's record of it (reports.jsonl, outcome.json once it ended):
                        rerunning the command replays finished trials from these and runs the rest
    trials.csv          one row per trial: swept values, steps, loss, val_loss, status
    loss_vs_lr.png      eval loss against lr
    best.yaml           the target's PretrainConfig with the chosen values
    sweep.json          summary: best trial, transfer, wall time
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
from datetime import datetime, timezone

import ray
import ray.train
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from cluster import storage
from jobs.config import ConfigError
from jobs.train.config import SWEPT, TRIAL_DRIVER_CPUS, PretrainConfig, TuneConfig
from jobs.train.loop import loop_config, prepare_run, train_loop_per_worker
from jobs.train.trainer import make_trainer

METRIC = "val_loss"


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
REPORTS = "reports.jsonl"
OUTCOME = "outcome.json"


def trial_loop(config: dict) -> None:
    """The pretraining loop, after rank 0 has noted its Train run's placement group for release."""
    pg = ray.util.get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0:
        storage.write_text(storage.join(config["cfg"]["output"], PLACEMENT_GROUP), pg.id.hex())
    train_loop_per_worker(config)


def trial_name(config: dict) -> str:
    """A trial's directory under trials/: its swept values, then a hash of them.

    It depends on the values alone, so a rerun of the sweep finds the records of a trial that
    the interrupted run finished.
    """
    shown = "_".join(f"{k}={config[k]:.4g}" for k in SWEPT if k in config)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{shown}-{digest}"


class RecordTrials(tune.Callback):
    """The sweep's own record of each trial, in the driver: every eval result Tune received
    (reports.jsonl) and, once the trial ends, how it ended (outcome.json). A rerun of the sweep
    replays a finished trial from these instead of training it again (see `run_trial`): Ray
    Tune's own experiment state is pickled, and nothing in a tenant's storage is unpickled.

    It also frees the Train workers' CPUs of every trial that ends. When ASHA stops a trial, Tune
    ends the trial's actor while its Train run is mid-flight. The workers die with their
    controller, but the run's placement group is job-scoped: Ray Train's detached
    PlacementGroupCleaner should remove it, and it cannot when the Ray State API is unreachable
    (no dashboard, or several Ray instances on one machine), leaving the CPUs reserved until the
    sweep ends, so that later trials wait for workers forever.
    """

    def __init__(self, trials_dir: str, max_steps: int):
        self.trials_dir, self.max_steps = trials_dir, max_steps

    def _dir(self, trial) -> str:
        return storage.join(self.trials_dir, trial_name(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("replayed"):
            return
        uri = storage.join(self._dir(trial), REPORTS)
        prior = storage.read_text(uri) if storage.exists(uri) else ""
        rec = {k: result[k] for k in ("step", "loss", METRIC, "diverged") if k in result}
        storage.write_text(uri, prior + json.dumps(rec) + "\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)
        last = trial.last_result or {}
        if last.get("replayed"):
            return
        status = "diverged" if last.get("diverged") else "completed" if last.get("step") == self.max_steps else "stopped"
        storage.write_json(storage.join(self._dir(trial), OUTCOME), {"status": status, "step": last.get("step")})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def _release(self, trial) -> None:
        marker = storage.join(self._dir(trial), PLACEMENT_GROUP)
        if not storage.exists(marker):
            return
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(storage.read_text(marker).strip())))
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)


def replay(trial_dir: str) -> bool:
    """Report a finished trial's recorded results to Tune again; False if it has not finished."""
    if not storage.exists(storage.join(trial_dir, OUTCOME)):
        return False
    reports = [json.loads(x) for x in storage.read_text(storage.join(trial_dir, REPORTS)).splitlines() if x]
    for rec in reports:
        tune.report({**rec, "replayed": True})
    return True


def run_trial(config: dict, base: dict, trials_dir: str) -> None:
    """One Tune trial: a short pretraining run with the sampled values, on its own output."""
    name = trial_name(config)
    out = storage.join(trials_dir, name)
    if replay(out):
        print(f"trial {name}: finished in an earlier run of the sweep; its results replayed", flush=True)
        return
    cfg = PretrainConfig.model_validate({**base, **config, "output": out})
    cfg, manifest, mcfg = prepare_run(cfg)
    # One line per start: a resumed sweep must not start a finished trial again.
    attempts = storage.join(cfg.output, "attempts.jsonl")
    prior = storage.read_text(attempts) if storage.exists(attempts) else ""
    line = json.dumps({"started": datetime.now(timezone.utc).isoformat(), "config": config})
    storage.write_text(attempts, prior + line + "\n")
    try:
        make_trainer(cfg, trial_loop, loop_config(cfg, manifest, mcfg), callbacks=[EvalReportCallback()]).fit()
    except Exception as e:
        step = diverged_at(e)
        if step is None:
            raise
        # Reported here rather than by the bridge: Train may handle the worker's failure before the
        # report the worker made just before it, and then the divergence would never reach Tune.
        # A result (not an error) with val_loss=inf ends this trial and lets the sweep carry on.
        tune.report({"step": step, "loss": math.nan, METRIC: math.inf, "diverged": True})
        print(f"trial {name}: diverged at step {step} with lr={cfg.lr:g}", flush=True)


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
    workers = trial.worker_range[1]  # an elastic trial may grow to its maximum
    cpus = TRIAL_DRIVER_CPUS + workers * trial.cpus_per_worker
    fit = int(resources.get("CPU", 0) // cpus)
    if trial.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // workers))
    if fit < 1:
        raise ConfigError(
            f"trial: one trial needs {cpus} CPUs ({TRIAL_DRIVER_CPUS} driver + num_workers {workers} * "
            f"cpus_per_worker {trial.cpus_per_worker}){' and GPUs' if trial.use_gpu else ''}, more than the cluster "
            f"has ({resources}); lower trial.num_workers")
    return min(fit, cfg.max_concurrent or fit)


def make_tuner(cfg: TuneConfig, out: str):
    """The sweep's Tuner. A rerun starts a new one: finished trials replay their records."""
    from ray.tune.schedulers import ASHAScheduler

    trials_dir = storage.join(out, "trials")
    base = cfg.trial_base()
    # Trials run in Tune's working directories: paths relative to here must not be read from there.
    base.update({k: storage.absolute(base[k]) for k in ("data", "init_from") if base.get(k)})
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, trials_dir=trials_dir),
                                    {"CPU": TRIAL_DRIVER_CPUS})
    fs, path = storage.resolve(out)
    fs.delete_dir_contents(f"{path}/tuner", missing_dir_ok=True)  # never read back: only ours is
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
                                  callbacks=[RecordTrials(trials_dir, trial_steps)]),
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
        row = {"trial_id": trial_name(r.config)}
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


def sweep(cfg: TuneConfig) -> dict:
    """Run (or resume) the sweep and write its outputs; returns the summary (sweep.json)."""
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
