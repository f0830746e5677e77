"""Evaluate: perplexity, bits-per-byte and task scores of one or more checkpoints, side by side.

    python -m jobs.evaluate --config configs/posttrain-demo.yaml

* Language modelling: mean loss, perplexity and bits-per-byte on the held-out (`val`) shards of a
  jobs.prepare output. Bits-per-byte divides the summed loss by the UTF-8 bytes the targets
  decode to, so models with different tokenizers compare fairly.
* Multiple-choice tasks, JSONL `{"prompt", "choices": [...], "answer": <index>}`: each choice is
  scored by its log-likelihood after the prompt; `accuracy` picks the highest sum, `accuracy_norm`
  the highest per byte of the choice.
* Generative tasks, JSONL `{"prompt", "answer"}`: greedy decoding, then `exact` match (after
  trimming whitespace and surrounding punctuation) or `number` match (GSM8K-style extraction: the
  number after `####` if present, else the last number in the output).

Chat checkpoints (SFT/DPO, train_state says `chat_template`) see each prompt as a user turn and
answer as the assistant (choices are scored as the reply plus <|end|>); base checkpoints see the
raw prompt and continue it (a generated answer is its first non-empty line). Results go to
`output/results.json` (with the resolved config) and `output/results.md`, and print as a table.
"""

from __future__ import annotations

from cluster import storage
from jobs.checkpoint.load import resolve_source
from jobs.config import main
from jobs.report import write_report
from jobs.infer.config import EvaluateConfig
from jobs.infer.evaluate import evaluate_checkpoint, markdown_table, read_task, table_rows

__all__ = ["EvaluateConfig", "run"]


def run(cfg: EvaluateConfig) -> dict:
    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.ray_utils import init_ray

    cfg = cfg.model_copy(update={
        "checkpoints": [storage.absolute(c) for c in cfg.checkpoints],
        "data": storage.absolute(cfg.data) if cfg.data else None,
        "tasks": [t.model_copy(update={"task_file": storage.absolute(t.task_file)}) for t in cfg.tasks],
        "output": storage.absolute(cfg.output),
    })
    resolved = [resolve_source(c)[2] for c in cfg.checkpoints]  # verified before any task starts
    for spec in cfg.tasks:  # fail on a malformed task file before any model loads
        read_task(spec)
    init_ray()
    task = ray.remote(num_gpus=1 if cfg.use_gpu else 0)(evaluate_checkpoint)
    results = ray.get([task.remote(cfg, c) for c in resolved])
    for given, r in zip(cfg.checkpoints, results):
        r["label"] = given.rstrip("/").split("/")[-1] if "/checkpoint_" not in given else "/".join(given.split("/")[-2:])
    header, rows = table_rows(cfg, results)
    report = {"config": cfg.resolved(), "results": results, "table": {"header": header, "rows": rows}}
    storage.makedirs(cfg.output)
    storage.write_json(storage.join(cfg.output, "results.json"), report)
    storage.write_text(storage.join(cfg.output, "results.md"), markdown_table(header, rows))
    t = Table(title=f"evaluate -> {cfg.output}")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
    print(f"report: {write_report(cfg.output)}")
    return report


if __name__ == "__main__":
    main(EvaluateConfig, run)
