"""Tasks: build demo instruction data, preference pairs and eval tasks from the Shakespeare corpus.

    python -m jobs.tasks --config configs/posttrain-demo.yaml

The items (kinds, and how held-out documents are chosen) are made by jobs.data.tasks.

Output (local or s3://):

    sft_train.jsonl, sft_val.jsonl       {"messages": [...]} for jobs.sft
    pairs_train.jsonl, pairs_val.jsonl   {"prompt", "chosen", "rejected"} for jobs.dpo / jobs.reward
    eval/<kind>.jsonl                    held-out items for jobs.evaluate
    prompts.jsonl                        a few held-out questions as chat prompts, for jobs.generate
    manifest.json                        counts and the resolved config
"""

from __future__ import annotations

from jobs.config import main
from jobs.data.config import TasksConfig
from jobs.data.tasks import build_tasks

__all__ = ["TasksConfig", "run"]


def run(cfg: TasksConfig) -> dict:
    return build_tasks(cfg)


if __name__ == "__main__":
    main(TasksConfig, run)
