"""SFT: supervised fine-tuning of a base model on chat conversations, on Ray Train with DeepSpeed.

    python -m jobs.sft --config configs/posttrain-demo.yaml

Data is JSONL in the messages format, one conversation per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Only assistant tokens carry loss (jobs.posttrain.sft). Checkpoints have pretraining's layout, so
generate/evaluate/export/serve load them.
"""

from __future__ import annotations

from jobs.config import main
from jobs.data.chat import IGNORE
from jobs.posttrain.config import SFTConfig
from jobs.posttrain.sft import load_examples, train_loop_per_worker
from jobs.posttrain.worker import absolute_paths, fit, loop_config, resolve_init
from jobs.report import write_report

__all__ = ["SFTConfig", "run"]


def run(cfg: SFTConfig) -> dict:
    from model.tokenizer import load_tokenizer

    cfg = absolute_paths(cfg)
    init_dir = resolve_init(cfg.init_from)
    config = loop_config(cfg, init_dir)
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    # Validate and count on the driver, so a bad line fails before any worker starts.
    rows, truncated = load_examples(cfg.data, tok, max_len)
    n_eval = len(load_examples(cfg.eval_file, tok, max_len)[0]) if cfg.eval_file else 0
    print(f"sft: {len(rows)} conversations ({truncated} truncated to {max_len} tokens), {n_eval} held out; "
          f"{sum(sum(t != IGNORE for t in y) for _, y in rows)} assistant tokens; from {init_dir}")
    summary = fit(cfg, train_loop_per_worker, config)
    print(f"report: {write_report(cfg.output)}")
    return summary


if __name__ == "__main__":
    main(SFTConfig, run)
