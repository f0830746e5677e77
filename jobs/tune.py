"""Tune: learning-rate sweeps on a small proxy model, transferred to the target pretraining run.

    python -m jobs.tune --config configs/tune-demo.yaml

Every trial is a short run of the real pretraining loop (jobs.train.sweep; Ray Train
+ DeepSpeed) on a proxy model made by overriding a few fields of the target model. A bridge
callback forwards each eval loss to Ray Tune, where ASHA stops weak trials early. The chosen lr
is rescaled to the target width (see docs/tune.md) and written as a ready pretraining config.

The output (trials, trials.csv, loss_vs_lr.png, best.yaml, sweep.json) and how a rerun resumes
are described in jobs.train.sweep and docs/tune.md.
"""

from __future__ import annotations

from jobs.config import main
from jobs.report import write_report
from jobs.train.config import TuneConfig
from jobs.train.sweep import sweep

__all__ = ["TuneConfig", "run"]


def run(cfg: TuneConfig) -> dict:
    summary = sweep(cfg)
    print(f"report: {write_report(cfg.output)}")
    return summary


if __name__ == "__main__":
    main(TuneConfig, run)
