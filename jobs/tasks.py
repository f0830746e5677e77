"""Tasks: build demo instruction data, preference pairs and eval tasks from the Shakespeare corpus,
and verifiable tasks for RL.

    python -m jobs.tasks --config configs/posttrain-demo.yaml

The items (kinds, and how held-out documents are chosen) are made by jobs.data.tasks, the
verifiable ones (a `verifiable:` section) by jobs.data.verifiable.

Output (local or s3://):

    sft_train.jsonl, sft_val.jsonl       {"messages": [...]} for jobs.sft
    pairs_train.jsonl, pairs_val.jsonl   {"prompt", "chosen", "rejected"} for jobs.dpo / jobs.reward
    eval/<kind>.jsonl                    held-out items for jobs.evaluate
    prompts.jsonl                        a few held-out questions as chat prompts, for jobs.generate

with a `verifiable:` section (without `data`, only these):

    rl_train.jsonl                       {"task", "prompt", "answer", "match"}: RL prompts and how to check them
    rl_eval.jsonl                        the held-out items in the same form
    eval/<task>.jsonl                    the held-out items for jobs.evaluate (generative; match `number`
                                         for addition, `exact` for reverse and first_word)
    verifiable_sft_train.jsonl           {"messages": [...]}: SFT warm-start conversations
    verifiable_sft_val.jsonl             the held-out items as conversations (SFT's eval_file)
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
