"""Prepare: raw corpus -> clean documents -> dedup -> BPE tokenizer -> packed token shards.

    python -m jobs.prepare --config configs/demo.yaml

The pipeline is jobs.data.prepare (docs/data.md); this module is its command line.
"""

from __future__ import annotations

from jobs.config import main
from jobs.data.config import PrepareConfig
from jobs.data.prepare import prepare, task_shuffles
from jobs.report import write_report

__all__ = ["PrepareConfig", "run"]


def run(cfg: PrepareConfig) -> dict:
    with task_shuffles():  # Ray Data datasets keep the context they were created in
        manifest = prepare(cfg)
    print(f"report: {write_report(cfg.output)}")
    return manifest


if __name__ == "__main__":
    main(PrepareConfig, run)
